"""Ray start-up and process settings shared by every command.

Kept thin: the stages themselves never call ``ray.init``.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

# One BLAS/torch thread per worker process: with N processes on N cores, the
# default (N threads each) oversubscribes the CPU (REFERENCE.md §5: 6x loss).
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

log = logging.getLogger("mmbatch")


def pin_threads() -> None:
    """Pin this process to one BLAS/torch thread (call inside CPU workers).

    torch is only touched when something already imported it: importing torch costs
    ~2 s per fresh worker process, which model-free extractors (HOG, log-mel, hashing)
    must not pay. Code that imports torch later calls this again after the import.
    """
    import sys

    for k, v in THREAD_ENV.items():
        os.environ.setdefault(k, v)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None,
             num_gpus: Optional[float] = None, object_store_memory: Optional[int] = None,
             quiet: bool = True) -> None:
    """Connect to a cluster (``address``) or start an embedded local Ray.

    A no-op when Ray is already initialised (tests share one session-wide Ray;
    a job submitted to a cluster runs with ``RAY_ADDRESS`` set by Ray).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(logging_level=logging.WARNING if quiet else logging.INFO, log_to_driver=True,
                  job_config=worker_path_job_config())
    if address in (None, "local"):
        # The embedded Ray's workers inherit this process's environment. A job-level
        # runtime_env would do the same job but makes Ray start a second set of worker
        # processes instead of using the ones it prestarts (measured: ~2 s of start-up
        # CPU per core before the first task; benchmarks/README figures).
        for k, v in THREAD_ENV.items():
            os.environ.setdefault(k, v)
        kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                      object_store_memory=object_store_memory)
        # "local", not None: ray.init(address=None) attaches to whatever cluster
        # /tmp/ray/ray_current_cluster names (the last `ray start` or test Cluster on this
        # machine, possibly dead), which hangs or fails instead of starting the embedded Ray.
        ray.init(address="local", **kwargs)
    else:
        ray.init(address=address, runtime_env={
            "env_vars": dict(THREAD_ENV), "worker_process_setup_hook": "mmbatch.runtime.quiet_worker_logs"},
            **kwargs)
    _quiet_ray_data()


class _WorkerCodePaths(list):
    """The folders Ray adds to the front of every worker's ``sys.path`` (``JobConfig._py_driver_sys_path``).

    At ``ray.init`` Ray extends this list with the driver's current folder and script folder
    (ray/_private/worker.py, "Add the directory containing the script ... Also add the current
    directory"); each worker then does ``sys.path.insert(0, p)`` for every entry, ahead of
    PYTHONPATH and site-packages. A folder that holds something named ``mmbatch`` other than the
    package this driver runs (a clone's top folder seen from its parent, a stale copy) would then
    shadow the installed package in the workers only. Such folders are left out; every other
    folder is kept, so Ray's behaviour is unchanged elsewhere.
    """

    def extend(self, paths) -> None:
        super().extend(p for p in paths if not shadows_package(p))

    def append(self, path) -> None:
        self.extend([path])


def shadows_package(folder: str) -> bool:
    """True when ``import mmbatch`` from ``folder`` would not be the package this process runs."""
    import mmbatch

    ours = os.path.realpath(os.path.dirname(mmbatch.__file__))
    for name in ("mmbatch", "mmbatch.py"):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate) and os.path.realpath(candidate) != ours:
            return True
    return False


def worker_path_job_config():
    """A ``JobConfig`` whose worker ``sys.path`` additions never shadow the installed package.

    Ray offers no public switch for this: the current folder is skipped only for Ray Client jobs
    or when ``runtime_env.working_dir`` is set, and a job-level runtime_env makes the embedded Ray
    start a second set of workers (see init_ray). So the list Ray extends is a filtering one.
    """
    from ray.job_config import JobConfig

    job_config = JobConfig()
    job_config._py_driver_sys_path = _WorkerCodePaths()
    return job_config


def quiet_worker_logs() -> None:
    """Keep Ray Train's per-report INFO lines out of the user's terminal.

    Runs in every worker of a cluster job (setup hook) and at the start of each
    training worker (the embedded Ray has no job-level hook, see init_ray).
    """
    for name in ("ray.train", "ray.data", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _quiet_ray_data() -> None:
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False


def cluster_gpus() -> float:
    import ray
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    import ray
    return float(ray.cluster_resources().get("CPU", 1.0))
