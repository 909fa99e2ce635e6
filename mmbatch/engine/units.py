"""The Ray wiring of ingest and preprocess: units of work run as one Ray Data job.

A job is a list of independent units (a canonical row group, an ingest shard). Each unit is one
block of a ``ray.data.from_items`` dataset; ``map_batches`` runs it on an actor pool of
:class:`_PoolActor`, whose actors build the stage's worker once (``make_worker(job)``: extractors,
models, lookups) and then run unit after unit; the driver reads the results with ``iter_rows`` and
receives only each unit's small result (a :class:`~mmbatch.engine.commit.CommitRecord`), which it commits.
``from_items`` has no read task: on 2 CPUs a read task would wait behind actors holding every CPU.

A job may have a second step (``then``, :class:`Step`): a second actor pool of the same Ray Data
job whose actors get each unit's first result (one row, pickled) and return the final one. The
preprocess split shape runs a model's decode in the first (CPU actors) and its embed, fuse and
write in the second (one actor per GPU; docs/data-path.md, "The GPU shape").

The pool has a fixed size, which the caller asks :func:`mmbatch.engine.capacity.pool_size`: what the cluster
can hold once its autoscaler has added every node it may (its node types' limits), at most one worker per
unit and ``ray.max_workers``. The actors that do not fit yet are pending demand: the autoscaler starts nodes for them, and each takes
units as soon as its node joins. (Measured on Ray's fake autoscaling cluster: an autoscaling pool,
min < max, stayed on one node; docs/data-path.md.)

Faults, through Ray's and Ray Data's options:

- ``max_restarts=0`` (:data:`MAX_RESTARTS`): an actor whose process dies (SIGKILL, OOM, a lost
  node) is not restarted: a restart that never comes, when its node is gone and no other node has
  room, would hold its units for ever;
  except in a pool of one actor (a split shape's one GPU, ``ray.max_workers: 1``), which restarts it: Ray
  Data keeps a dead actor in its pool and never replaces it, so with no other actor the job would wait
  for ever (a restart that cannot come hangs it all the same);
- ``max_task_retries=0``: the unit it held is not retried on that actor (``max_tasks_in_flight_per_actor=1``:
  an actor holds only the unit it runs, so a lost node costs its running units and the results it had not
  yet handed over) ...
- ``DataContext.max_errored_blocks=-1`` (on this dataset only): ... its block is given up and the
  job goes on with the other actors;
- ``DataContext.max_consecutive_actor_init_deaths`` (:data:`INIT_DEATHS`, each pool): an actor that
  dies while it starts is replaced by Ray Data (Ray's default, 0, fails the whole execution on the
  first such death): a rerun round's new actor may land on a node that is already gone but that the
  GCS still believes alive, until its health checks miss;
- the driver reruns the units that came back from no worker in a new round (the live actors of
  the next pool take them). Should a round still end on a lost worker (:func:`lost_worker`: more
  deaths in a row than allowed), its unfinished units are rerun the same way, after the time the
  GCS takes to declare a silent node dead. A unit lost ``max_deaths`` times fails the job with the
  unit named.

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
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

log = logging.getLogger("mmbatch")


MAX_RESTARTS = 0
INIT_DEATHS = 16      # DataContext.max_consecutive_actor_init_deaths of each pool


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

        from mmbatch.engine.runtime import pin_threads

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
    (None: one per unit; see :func:`mmbatch.engine.capacity.pool_size`). With ``then``, each unit's result goes on to
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
        seen, failed = set(), None
        try:
            for row in _round(steps, job_ref, todo, index, label).iter_rows():
                i = int(row["i"])
                seen.add(i)
                for note in json.loads(row["notes"]):
                    if note not in said:
                        said.add(note)
                        log.warning("%s", note)
                if row["error"]:
                    raise UnitFailed(f"unit {name(todo[i])}: {row['error']}")
                on_result(todo[i], pickle.loads(row["value"]))
        except Exception as e:  # noqa: BLE001 - only a lost worker is caught (re-raised otherwise)
            if not lost_worker(e):
                raise
            failed = e
            log.debug("the round ended on a lost worker", exc_info=e)
        index = [i for i in index if i not in seen]
        for i in index:
            lost[i] = lost.get(i, 0) + 1
            if lost[i] >= max_deaths:
                raise UnitFailed(f"unit {name(todo[i])}: its worker died {max_deaths} times"
                                 + (f" (last: {type(failed).__name__})" if failed else ""))
        if index:
            log.warning("%d unit(s) lost with their worker; running them again", len(index))
        if index and failed is not None:
            # actors kept dying as they started: a node that is gone but that the GCS still believes alive
            # takes each new actor placed on it. Let its health checks find it out before the next round.
            time.sleep(node_death_s())


def _round(steps: list[Step], job_ref: Any, todo: list, index: list[int], label: str):
    """The Ray Data job of one round: the units ``index`` of ``todo``, one block each, through ``steps``."""
    import ray

    ds = ray.data.from_items([{"i": i, "value": pickle.dumps(todo[i]), "error": "", "notes": "[]"}
                              for i in index], override_num_blocks=len(index))
    ctx = ds.context
    ctx.max_errored_blocks = -1          # a dead worker's unit: rerun by the driver, not fatal
    ctx.enable_progress_bars = ray.data.DataContext.get_current().enable_progress_bars
    # an actor that dies while it starts (its node lost, maybe not yet known dead) is replaced by Ray Data
    # instead of failing the round: up to INIT_DEATHS in a row per pool
    ctx.max_consecutive_actor_init_deaths = INIT_DEATHS
    # A fixed size: actors that do not fit yet are pending demand, which makes the autoscaler add
    # nodes, and they take units as their nodes join (an autoscaling pool, min < max, grows only
    # through Ray Data's cluster autoscaler, too slowly to matter: docs/data-path.md).
    for s in steps:
        res, size = s.resources, max(1, min(s.workers or len(index), len(index)))
        # one unit in flight per actor (Ray Data's default: 2): a lost actor takes only the unit it runs
        pool = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)
        with warnings.catch_warnings():     # max_restarts has no named parameter in Ray 2.60
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
            ds = ds.map_batches(_PoolActor, batch_size=1, compute=pool,
                                fn_constructor_args=(s.make_worker, job_ref, s.name),
                                num_cpus=res.num_cpus, num_gpus=res.num_gpus or None, zero_copy_batch=True,
                                max_restarts=MAX_RESTARTS if size > 1 else -1, max_task_retries=0)
    ds.set_name(label)             # the job's name in the dashboard's Data view
    return ds


def lost_worker(e: BaseException) -> bool:
    """Whether ``e`` (raised by a Ray Data job) says a worker or its node was lost, rather than a bug."""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.NodeDiedError, rex.ActorUnavailableError, rex.ObjectLostError,
            rex.WorkerCrashedError, rex.LocalRayletDiedError)
    for _ in range(8):              # the error, the cause it wraps (RayTaskError.cause, raise ... from)
        if e is None or isinstance(e, lost):
            return e is not None
        e = getattr(e, "cause", None) or e.__cause__
    return False


def node_death_s() -> float:
    """How long the GCS takes, at most, to declare a silent node dead (its health checks: period x
    failure threshold, plus one check's timeout)."""
    try:
        from ray._raylet import Config
        return (Config.health_check_period_ms() * Config.health_check_failure_threshold()
                + Config.health_check_timeout_ms()) / 1000
    except Exception:  # noqa: BLE001 - another Ray version
        return 30.0
