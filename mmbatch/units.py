"""The Ray wiring of ingest and preprocess: units of work run as one Ray Data job.

A job is a list of independent units (a canonical row group, an ingest shard). Each unit is one
block of a ``ray.data.from_items`` dataset; ``map_batches`` runs it on an actor pool of
:class:`_PoolActor`, whose actors build the stage's worker once (``make_worker(job)``: extractors,
models, lookups) and then run unit after unit; the driver reads the results with ``iter_rows`` and
receives only each unit's small result (a :class:`~mmbatch.commit.CommitRecord`), which it commits.
``from_items`` has no read task: on 2 CPUs a read task would wait behind actors holding every CPU.

A job may have a second step (``then``, :class:`Step`): a second actor pool of the same Ray Data
job whose actors get each unit's first result (one row, pickled) and return the final one. The
preprocess split shape runs a model's decode in the first (CPU actors) and its embed, fuse and
write in the second (one actor per GPU; docs/data-path.md, "The GPU shape").

The pool has a fixed size, :func:`pool_size`: what the cluster can hold once its autoscaler has
added every node it may (its node types' limits, as the autoscaler reports them to the GCS or the cluster
launcher's config on the head node says them), one worker per unit where neither says them, and at most
``ray.max_workers``. The
actors that do not fit yet are pending demand: the autoscaler starts nodes for them, and each takes
units as soon as its node joins. (Measured on Ray's fake autoscaling cluster: an autoscaling pool,
min < max, stayed on one node; docs/data-path.md.)

Faults, through Ray's and Ray Data's options:

- ``max_restarts=0`` (:data:`MAX_RESTARTS`): an actor whose process dies (SIGKILL, OOM, a lost
  node) is not restarted: a restart that never comes, when its node is gone and no other node has
  room, would hold its units for ever;
  except in a pool of one actor (a split shape's one GPU, ``ray.max_workers: 1``), which restarts it: Ray
  Data keeps a dead actor in its pool and never replaces it, so with no other actor the job would wait
  for ever (a restart that cannot come hangs it all the same);
- ``max_task_retries=0``: the unit it held is not retried on that actor ...
- ``DataContext.max_errored_blocks=-1`` (on this dataset only): ... its block is given up and the
  job goes on with the other actors;
- the driver reruns the units that came back from no worker in a new round (the live actors of
  the next pool take them). A unit lost ``max_deaths`` times fails the job with the unit named.

An exception inside a unit is returned as a value and fails the job on the driver with the unit
named (Ray Data's own error would name a block). A worker that cannot be built does the same for
each unit it gets.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

log = logging.getLogger("mmbatch")


MAX_RESTARTS = 0


class UnitFailed(RuntimeError):
    """A unit of work failed in its worker (the error names the unit and the cause)."""


@dataclass
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class Step:
    """One actor pool of a job: ``make_worker(job)`` builds each actor's worker; ``workers`` actors
    (None: one per unit) of ``resources`` each; ``name`` keys the actor in a result's ``actors``."""
    make_worker: Callable[[Any], Callable]
    workers: Optional[int] = None
    resources: Resources = field(default_factory=Resources)
    name: str = "unit"


class _PoolActor:
    """The Ray Data UDF: a callable class, one instance per actor (the name shows in ``ps``)."""

    def __init__(self, make_worker: Callable[[Any], Callable], job: Any, step: str = "unit"):
        import ray

        from mmbatch.runtime import pin_threads

        pin_threads()
        if isinstance(job, ray.ObjectRef):
            job = ray.get(job)
        self.node = ray.get_runtime_context().get_node_id()
        # where this step ran, stamped on results that keep it (a CommitRecord's ``actors``)
        self.where = {"pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}
        self.step = step
        # A worker that cannot be built (a missing tool, a bad model path) fails each unit with
        # its own error instead of dying: a dead actor would be restarted and fail again, silently.
        # What building it warns (a model with random weights, ...) goes to the driver with the first
        # result, which says each warning once per job instead of once per actor.
        with _captured_warnings() as self.notes:
            try:
                self.worker, self.error = make_worker(job), None
            except Exception as e:  # noqa: BLE001 - reported per unit
                self.worker, self.error = None, e

    def run(self, unit: Any) -> Any:
        if self.error is not None:
            raise self.error
        return self.worker(unit)

    def __call__(self, batch: dict) -> dict:
        """Rows ``i, value, error, notes``: ``value`` is a unit (the first step) or the previous step's
        result, pickled; a row that failed in a previous step passes through."""
        out = {"i": [], "value": [], "error": [], "notes": []}
        for i, blob, error, notes in zip(batch["i"], batch["value"], batch["error"], batch["notes"]):
            if not error:
                result = None
                try:
                    result = self.run(pickle.loads(blob))
                    if hasattr(result, "node"):
                        result.node = self.node
                    if hasattr(result, "actors"):
                        result.actors[self.step] = self.where
                except Exception as e:  # noqa: BLE001 - the driver raises UnitFailed with the unit named
                    error = f"{type(e).__name__}: {e}"
                    log.debug("unit failed:\n%s", traceback.format_exc())
                blob = pickle.dumps(result)
            out["i"].append(int(i))
            out["value"].append(blob)
            out["error"].append(error)
            out["notes"].append(json.dumps(json.loads(notes) + self.notes))
            self.notes = []
        return out


@contextlib.contextmanager
def _captured_warnings():
    """Collect the ``warnings`` and WARNING log records (``mmbatch`` loggers) raised inside, as text,
    instead of printing them."""
    notes: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    logger, handler = logging.getLogger("mmbatch"), Collect(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notes
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        for w in caught:
            notes.append(str(w.message))
        notes[:] = list(dict.fromkeys(notes))       # the same text from warnings and the log: once


def run_units(make_worker: Callable[[Any], Callable], job: Any, units: Iterable[Any],
              on_result: Callable[[Any, Any], None], *, workers: Optional[int],
              resources: Resources | None = None, max_deaths: int = 4, name: Callable[[Any], str] = str,
              label: str = "units", step: str = "unit", then: Optional[Step] = None) -> None:
    """Run ``make_worker(job)(unit)`` for every unit on a Ray Data actor pool of ``workers`` actors
    (None: one per unit; see :func:`pool_size`). With ``then``, each unit's result goes on to
    ``then.make_worker(job)(result)`` on a second pool, whose results are the units' results.
    ``step`` names the first pool's actors in a result's ``actors`` (``then.name`` the second's).

    ``on_result(unit, result)`` runs on the driver as each unit finishes, in completion order.
    Units are handed out in the given order (put the largest first). Units whose worker died are
    run again in a new round; a unit lost ``max_deaths`` times fails the job.
    """
    import ray

    todo = list(units)
    steps = [Step(make_worker, workers, resources or Resources(), step), *([then] if then else [])]
    job_ref = ray.put(job)          # the job travels once through the object store
    lost: dict[int, int] = {}       # unit index -> rounds it came back from no worker
    said: set[str] = set()          # the workers' warnings, said once
    index = list(range(len(todo)))
    while index:
        seen = set()
        ds = ray.data.from_items([{"i": i, "value": pickle.dumps(todo[i]), "error": "", "notes": "[]"}
                                  for i in index], override_num_blocks=len(index))
        ds.context.max_errored_blocks = -1          # a dead worker's unit: rerun below, not fatal
        ds.context.enable_progress_bars = ray.data.DataContext.get_current().enable_progress_bars
        # A fixed size: actors that do not fit yet are pending demand, which makes the autoscaler add
        # nodes, and they take units as their nodes join (an autoscaling pool, min < max, grows only
        # through Ray Data's cluster autoscaler, too slowly to matter: docs/data-path.md).
        for s in steps:
            res, size = s.resources, max(1, min(s.workers or len(index), len(index)))
            pool = ray.data.ActorPoolStrategy(size=size)
            with warnings.catch_warnings():     # max_restarts has no named parameter in Ray 2.60
                warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
                ds = ds.map_batches(_PoolActor, batch_size=1, compute=pool,
                                    fn_constructor_args=(s.make_worker, job_ref, s.name),
                                    num_cpus=res.num_cpus, num_gpus=res.num_gpus or None, zero_copy_batch=True,
                                    max_restarts=MAX_RESTARTS if size > 1 else -1, max_task_retries=0)
        ds.set_name(label)             # the job's name in the dashboard's Data view
        for row in ds.iter_rows():
            i = int(row["i"])
            seen.add(i)
            for note in json.loads(row["notes"]):
                if note not in said:
                    said.add(note)
                    log.warning("%s", note)
            if row["error"]:
                raise UnitFailed(f"unit {name(todo[i])}: {row['error']}")
            on_result(todo[i], pickle.loads(row["value"]))
        index = [i for i in index if i not in seen]
        for i in index:
            lost[i] = lost.get(i, 0) + 1
            if lost[i] >= max_deaths:
                raise UnitFailed(f"unit {name(todo[i])}: its worker died {max_deaths} times")
        if index:
            log.warning("%d unit(s) lost with their worker; running them again", len(index))


# --- what to ask the cluster for -------------------------------------------------------------------
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"    # where `ray up` puts the config on the head node


@dataclass
class NodeGroup:
    """One node type the autoscaler may start: its resources and its most nodes (-1: no limit)."""
    resources: dict
    max_count: int


@dataclass
class ClusterConfig:
    node_group_configs: list[NodeGroup]


def _autoscaler_config():
    """The node types of the cluster's autoscaler: as it reports them to the GCS (autoscaler v2,
    KubeRay: ``ray._private.state.state.get_cluster_config``, the call Ray Data's own cluster
    autoscaler uses), else, for the v1 autoscaler that does not report them, the cluster launcher's
    config on the head node (:func:`launcher_config`). None: no autoscaler, or its types unknown."""
    import ray
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - another Ray version, a client connection
        config = None
    if config is not None and config.node_group_configs:
        return config
    return launcher_config(_autoscaler_node_types())


def launcher_config(running_types: set[str], path: str = LAUNCHER_CONFIG) -> Optional[ClusterConfig]:
    """The node types of the launcher's config file (``ray up`` writes it on the head node, where job
    drivers run, and starts the v1 autoscaler on it: ``--autoscaling-config=~/ray_bootstrap_config.yaml``;
    Ray Tune looks for the same file). Used only while an autoscaler runs whose node types
    (``running_types``) are all in the file, so a file left from another cluster is not believed."""
    import yaml

    path = os.path.expanduser(path)
    if not running_types or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        types = config.get("available_node_types") or {}
    except (OSError, yaml.YAMLError, AttributeError) as e:
        log.debug("launcher config %s unreadable: %s", path, e)
        return None
    if not isinstance(types, dict) or not running_types <= set(types):
        log.debug("launcher config %s does not describe this cluster's node types %s", path, running_types)
        return None
    cap = config.get("max_workers", -1)
    groups = [NodeGroup({k: float(v) for k, v in (t.get("resources") or {}).items()},
                        1 if name == config.get("head_node_type") else int(t.get("max_workers", cap)))
              for name, t in types.items()]
    return ClusterConfig(groups)


def _autoscaler_node_types() -> set[str]:
    """The node types of the nodes that an autoscaler manages, as its status in the GCS key-value store
    maps them (v1: the cluster launcher's, ``ray start --autoscaling-config``). Empty where there is
    none: a local Ray, a fixed set of ``ray start`` nodes, whose read-only monitor names each node's
    type after its own id."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get
    try:
        status = json.loads(_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or "{}")
    except Exception:  # noqa: BLE001 - another Ray version, a client connection
        return set()
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return {t for n, t in mapping.items() if t != format_readonly_node_type(n)}


def cluster_capacity() -> Optional[dict[str, Optional[float]]]:
    """The most of each resource the cluster can have (a value None: a node type without a limit):
    its nodes' totals, or what its autoscaler's node types add up to. None: it has an autoscaler
    whose limits are unknown."""
    import ray

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    config = _autoscaler_config()
    if config is None:
        return None if _autoscaler_node_types() else now
    most: dict[str, Optional[float]] = {}
    for group in config.node_group_configs:
        for k, v in group.resources.items():
            if k in most and most[k] is None:
                continue
            most[k] = None if group.max_count < 0 else most.get(k, 0.0) + float(v) * group.max_count
    return {k: (None if most.get(k, 0.0) is None else max(now.get(k, 0.0), most.get(k, 0.0)))
            for k in {*now, *most}}


def gpu_share() -> float:
    """GPU per worker when nothing is asked: a GPU node's GPUs shared by its CPUs (one worker per CPU),
    the smallest share over the GPU nodes that run and the GPU node types the autoscaler can start.
    0: no GPU to be had (as far as the cluster tells)."""
    import ray

    kinds = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    config = _autoscaler_config()
    kinds += [g.resources for g in (config.node_group_configs if config else []) if g.max_count != 0]
    shares = [min(1.0, r["GPU"] / max(1.0, r.get("CPU", 1.0))) for r in kinds if r.get("GPU", 0) > 0]
    return min(shares) if shares else 0.0


def pool_size(res: Resources, max_workers: Optional[int] = None) -> Optional[int]:
    """How many unit workers of ``res`` the cluster can hold once its autoscaler has added every node
    it may, bounded by ``max_workers``. None: no limit known (an autoscaler that does not report its
    node types): one worker per unit, and the autoscaler's own limits decide how many start."""
    cap = cluster_capacity()
    if cap is None:
        return max_workers
    fits = [cap.get(key, 0.0) / need for key, need in (("CPU", res.num_cpus), ("GPU", res.num_gpus))
            if need and cap.get(key, 0.0) is not None]
    size = max(1, int(min(fits))) if fits else None
    return size if max_workers is None else min(size or max_workers, max_workers)
