"""Ray start-up and process settings shared by every command.

Kept thin: the stages themselves never call ``ray.init``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
from typing import Optional

# One BLAS/torch thread per worker process: with N processes on N cores, the
# default (N threads each) oversubscribes the CPU (measured on 2 cores: a 2-process
# pool of log-mel + image features ran about 6x slower with the default threads).
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

log = logging.getLogger("mmbatch")

VERBOSE = False        # `mmbatch --verbose`: Ray's INFO logs, worker chatter and Ray Data's own progress


def pin_threads() -> None:
    """Pin this process to one BLAS/torch thread (call inside CPU workers).

    torch and OpenCV are only touched when something already imported them: importing
    torch costs ~2 s per fresh worker process, which model-free extractors (HOG,
    log-mel, hashing) must not pay, and an audio-only worker has no use for OpenCV
    (~0.2 s). Code that imports either later calls this again after the import.
    """
    import sys

    for k, v in THREAD_ENV.items():
        os.environ.setdefault(k, v)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setNumThreads(1)


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
    quiet = quiet and not VERBOSE
    if quiet:
        _quiet_ray_logs()
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
        with _children_ignore_sigint():
            ray.init(address="local", **kwargs)
    else:
        check_token_auth(address)
        ray.init(address=address, runtime_env={
            "env_vars": dict(THREAD_ENV), "worker_process_setup_hook": "mmbatch.engine.runtime.quiet_worker_logs"},
            **kwargs)
    if _on_sigterm is not None:       # ray.init replaces the SIGTERM handler with its own sys.exit
        signal.signal(signal.SIGTERM, _on_sigterm)
    _quiet_ray_data(quiet)
    if quiet:
        _filter_worker_logs()


def ensure_ray() -> None:
    """Start Ray as Ray Data's own auto-start (a plain ``ray.init()``) would, when it is not running, but with
    :func:`worker_path_job_config`: run from the folder above a clone, Ray's workers would otherwise import
    that folder's ``mmbatch/`` (a namespace package without ``__version__``). For library use
    (:mod:`mmbatch.data`): no thread pinning or log filtering, which are the CLI's choices."""
    import ray

    if not ray.is_initialized():
        ray.init(job_config=worker_path_job_config())


def check_token_auth(address: str) -> None:
    """Fail with one line naming the fix when the cluster at ``address`` wants a token this process
    will not send (Ray >= 2.52 `ray start --head` turns token auth on). Without it, ray.init logs
    ``InvalidAuthToken`` about once a second for ~20 s before its ConnectionError."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" or address.startswith("ray://"):
        return
    import grpc
    from ray._private.services import canonicalize_bootstrap_address
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    from mmbatch.errors import UsageError

    try:
        target = canonicalize_bootstrap_address(address)
    except Exception:  # noqa: BLE001 - ray.init reports a bad address itself
        return
    if not target:
        return
    with grpc.insecure_channel(target) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=10)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise UsageError(
                    f"the Ray cluster at {address} uses token authentication: set RAY_AUTH_MODE=token "
                    "(the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)") from None


# --- interrupts ------------------------------------------------------------------------------
_on_sigterm = None     # the CLI's SIGTERM handler, put back after ray.init replaced it


def handle_sigterm_as_interrupt() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread, like Ctrl-C (the CLI calls this)."""
    global _on_sigterm

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt
    _on_sigterm = on_sigterm
    signal.signal(signal.SIGTERM, on_sigterm)


@contextlib.contextmanager
def _children_ignore_sigint():
    """Start Ray's processes with SIGINT ignored.

    Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the embedded Ray's
    gcs_server, raylet, monitor and workers died at once while the driver still needed them,
    and the driver then waited ~60 s for the GCS before giving up. An ignored signal stays
    ignored across fork and exec (and Python keeps it ignored), so the daemons and the workers
    the raylet starts later leave Ctrl-C to the driver, which shuts them down (shutdown_ray).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def shutdown_ray(grace_s: float = 2.0) -> None:
    """Stop Ray now: ``ray.shutdown`` (which stops the embedded Ray's processes), then SIGKILL any
    process this driver started that is still alive after ``grace_s`` seconds (raylet, gcs_server,
    workers, monitor, log_monitor), so nothing outlives the command."""
    import ray

    children = _descendants(os.getpid())
    done = threading.Event()

    def stop():
        try:
            ray.shutdown()
        except Exception:     # a half-dead Ray: the kill below finishes the job
            pass
        done.set()
    threading.Thread(target=stop, daemon=True, name="ray-shutdown").start()
    done.wait(grace_s)
    children |= _descendants(os.getpid())
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(e))
    out, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


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
    """True when ``import mmbatch`` from ``folder`` would not be the package this process runs (this file's
    folder: ``mmbatch.__file__`` is None when the driver itself already imported a shadowing namespace folder)."""
    ours = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # mmbatch/, above engine/
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


# Lines workers send to the driver's terminal that say nothing to a user (kept in Ray's log files):
NOISE_ACTORS = ("PlacementGroupCleaner",)   # Ray Train's cleaner polls the State API, which needs the
#                                            dashboard the embedded Ray does not start: a warning a second
# Ray's own daemons, whose lines the driver prints with these in place of a pid: the autoscaler's events
# ("Adding 3 node(s) of type ...", "Resized to ...", repeated by every driver), the raylet's and GCS's
# dumps when a node dies. They stay in Ray's log files (monitor.*, raylet.*, gcs_server.* of the session).
NOISE_SOURCES = ("autoscaler", "raylet", "gcs_server")
NOISE_LINES = ("has constructor arguments in the object store and max_restarts > 0",
               "Set ray log level from environment variable",        # each process, once RAY_BACKEND_LOG_LEVEL is set
               "Reporting training result ")                          # Ray Train: one per epoch per worker


# A warning that comes with its traceback, in the same batch of lines, and says itself it is safe to ignore:
# Ray Train's controller failing to reach Ray's autoscaling coordinator in time on a loaded machine.
NOISE_BATCHES = ("Failed to send resource request for train-",)
# A worker whose raylet died (a lost node) dumps a C++ fatal check and its stack before it exits: the check
# line ("[... C pid tid] core_worker.cc:515: An unexpected system state ..."), the banner, the frames, blank
# lines. They stay in the worker's own log files.
NOISE_PATTERN = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [CF] \d+ \d+\] |\*\*\* StackTrace Information \*\*\*"
                           r"|\(\S*\+0x[0-9a-f]+\) \[0x[0-9a-f]+\]|^\s*$")


def _filter_worker_logs() -> None:
    """Drop known noise from the worker output Ray forwards to the driver (log_to_driver); every
    other line, warnings and errors included, is printed as before."""
    try:
        from ray._private import worker as ray_worker
        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        print_logs = ray_worker.print_to_stdstream
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    except (ImportError, AttributeError):       # another Ray version: leave its output alone
        return

    def print_without_noise(data):
        if data.get("actor_name") in NOISE_ACTORS or data.get("pid") in NOISE_SOURCES:
            return
        if any(ln.startswith(NOISE_BATCHES) for ln in data.get("lines", [])):
            return
        lines = [ln for ln in data.get("lines", []) if not any(n in ln for n in NOISE_LINES)
                 and not NOISE_PATTERN.search(ln)]
        if lines:
            print_logs({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_without_noise)


def _quiet_ray_data(quiet: bool = True) -> None:
    """Ray Data's own progress (several bars per job on a terminal, a multi-line INFO block every few
    seconds in a log) only with --verbose: mmbatch shows one bar per step (mmbatch.engine.progress)."""
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = False
    if quiet:       # importing ray.data configures its loggers: set after the import
        for name in ("ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        consoles = [h for h in logging.getLogger("ray.data").handlers if not isinstance(h, logging.FileHandler)
                    and type(h).__name__ != "SessionFileHandler"]
        for h in consoles:          # Ray Data's log file (ray-data.log of the session) keeps everything
            if not any(isinstance(f, _RayDataConsole) for f in h.filters):
                h.addFilter(_RayDataConsole())
        if not consoles:            # another logging setup: at least no INFO on the terminal
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").addFilter(_DropMessages("Progress bars disabled"))


# Ray Data's terminal lines that mmbatch says otherwise or that say nothing to a user: a unit whose worker
# died is rerun with one line (mmbatch.engine.units) instead of Ray Data's per-block error and each dead
# actor's replacement; the "num_cpus and num_gpus ... experimental" warning of every GPU step.
RAY_DATA_NOISE = ("An exception was raised from a task of operator", "died during initialization",
                  "Specifying both num_cpus and num_gpus for map tasks is experimental",
                  # the actors of a pool sized from what the autoscaler can add wait for their nodes
                  "Cluster resources are not enough to run any task from")


class _RayDataConsole(logging.Filter):
    """On Ray Data's console handler: warnings and errors only, less :data:`RAY_DATA_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not any(n in record.getMessage() for n in RAY_DATA_NOISE)


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _quiet_ray_logs() -> None:
    """What Ray prints on the driver that is not a real warning, off unless --verbose.

    - "Token authentication is enabled for this Ray cluster..." at every start of the embedded Ray
      (token auth stays on; only the notice goes);
    - Ray Data's INFO lines (execution plans, "Progress will be logged...");
    Worker output forwarded to the driver is filtered in _filter_worker_logs.
    """
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _DropMessages("Token authentication is enabled for this Ray cluster"))
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)

