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
    """Pin this process to one BLAS/torch thread (call inside CPU workers)."""
    for k, v in THREAD_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import torch
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
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
    kwargs = dict(
        runtime_env={"env_vars": dict(THREAD_ENV),
                     "worker_process_setup_hook": "mmbatch.runtime.quiet_worker_logs"},
        logging_level=logging.WARNING if quiet else logging.INFO,
        log_to_driver=True,
    )
    if address in (None, "local"):
        kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                      object_store_memory=object_store_memory)
        # "local", not None: ray.init(address=None) attaches to whatever cluster
        # /tmp/ray/ray_current_cluster names (the last `ray start` or test Cluster on this
        # machine, possibly dead), which hangs or fails instead of starting the embedded Ray.
        ray.init(address="local", **kwargs)
    else:
        ray.init(address=address, **kwargs)
    _quiet_ray_data()


def quiet_worker_logs() -> None:
    """Runs in every Ray worker: keep Ray Train's per-report INFO lines out of the user's terminal."""
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
