"""The Ray wiring of ingest and preprocess: a pool of long-lived actors runs units of work.

Each actor builds its worker once (``make_worker(job)``: extractors, models,
lookups) and then runs unit after unit; the driver keeps ``in_flight`` units
queued per actor (so an actor never waits for the driver between units) and
receives only each unit's small :class:`~mmbatch.commit.CommitRecord`.

Why actors and not a Ray Data pipeline: a job of this shape (independent
units, each read -> compute -> write by one worker) needs no streaming
executor, no block shuffling between stages and no object-store traffic. On
a 2-core machine Ray Data's executor, its service actors and its imports cost
several CPU seconds per job (benchmarks/README figures), which this pool does
not pay.

Faults: an actor whose process dies (SIGKILL, OOM, a lost node) is not restarted in place
(``max_restarts=0``): the units it held go to live actors at once and a fresh actor replaces it,
getting work only once it answers. Ray's in-place restart is not used because a unit handed to a
restarting actor waits for that restart, which never comes when the actor's node is gone and no
other node has room (a lost node hung the job that way). A unit that kills ``max_deaths`` workers
fails the job with the unit named; workers that keep dying before they answer fail it too.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable


class UnitFailed(RuntimeError):
    """A unit of work failed in its worker (the error names the unit and the cause)."""


class _PoolActor:
    """The actor class (``ray.remote`` is applied in :func:`run_units`, so importing this module
    does not import Ray)."""

    def __init__(self, make_worker: Callable[[Any], Callable], job: Any):
        # A worker that cannot be built (a missing tool, a bad model path) fails each unit with
        # its own error instead of dying: a dead actor would be replaced and fail again, silently.
        try:
            self.worker, self.error = make_worker(job), None
        except Exception as e:  # noqa: BLE001 - re-raised by run()
            self.worker, self.error = None, e

    def run(self, unit: Any) -> Any:
        if self.error is not None:
            raise self.error
        return self.worker(unit)

    def ready(self) -> bool:
        return True


@dataclass
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


def run_units(make_worker: Callable[[Any], Callable], job: Any, units: Iterable[Any],
              on_result: Callable[[Any, Any], None], *, num_workers: int,
              resources: Resources | None = None, in_flight: int = 2, max_deaths: int = 4,
              name: Callable[[Any], str] = str) -> None:
    """Run ``make_worker(job)(unit)`` for every unit on ``num_workers`` actors.

    ``on_result(unit, result)`` runs on the driver as each unit finishes, in completion order.
    Units are handed out in the given order (put the largest first). A unit whose worker died
    (SIGKILL, OOM, a lost node) is handed to a live worker; a new worker replaces the dead one
    and gets work once it answers. A unit that killed ``max_deaths`` workers fails the job, and
    so do ``max_deaths`` workers in a row that die before they answer.
    """
    import ray
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

    queue = deque(units)
    if not queue:
        return
    res = resources or Resources()
    actor_cls = ray.remote(_PoolActor).options(
        num_cpus=res.num_cpus, num_gpus=res.num_gpus or None, max_restarts=0, max_task_retries=0)
    job_ref = ray.put(job)          # the job travels once through the object store
    live = [actor_cls.remote(make_worker, job_ref) for _ in range(max(1, min(num_workers, len(queue))))]
    started = list(live)            # every actor made, for the final kill
    load = {a: 0 for a in live}     # units in flight per actor
    pending: dict = {}              # ref -> (actor, unit or None for a readiness probe)
    deaths: dict[int, int] = {}     # id(unit) -> workers that died holding it
    dead: set = set()
    start_deaths = 0                # replacements in a row that died before answering

    def submit(actor, unit=None) -> None:
        unit = queue.popleft() if unit is None else unit
        pending[actor.run.remote(unit)] = (actor, unit)
        load[actor] += 1

    def probe(actor) -> None:
        pending[actor.ready.remote()] = (actor, None)

    def replace(actor) -> None:
        """``actor`` is dead for good: start a new one, which gets work once it answers."""
        if actor in live:
            live.remove(actor)
        if actor not in dead:
            dead.add(actor)
            new = actor_cls.remote(make_worker, job_ref)
            started.append(new)
            load[new] = 0
            probe(new)

    try:
        for _ in range(in_flight):
            for a in live:
                if queue:
                    submit(a)
        # readiness probes do not keep a finished job open: a replacement may have nowhere to run
        # (its node is gone) and never answer
        while queue or any(u is not None for _, u in pending.values()):
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            actor, unit = pending.pop(ref)
            if unit is None:                                  # a readiness probe
                try:
                    ray.get(ref)
                except ActorDiedError:
                    if actor in dead:                         # already replaced (a unit saw it die)
                        continue
                    start_deaths += 1
                    if start_deaths >= max_deaths:
                        raise UnitFailed(f"{max_deaths} workers in a row died while starting "
                                         "(see the Ray worker logs)") from None
                    replace(actor)
                except RayActorError:                         # unreachable for now: ask again
                    probe(actor)
                else:
                    start_deaths = 0
                    if actor not in live:
                        live.append(actor)
                    while queue and load[actor] < in_flight:
                        submit(actor)
                continue
            load[actor] -= 1
            try:
                result = ray.get(ref)
            except RayActorError as e:
                died = isinstance(e, ActorDiedError)
                deaths[id(unit)] = deaths.get(id(unit), 0) + int(died)
                if deaths[id(unit)] >= max_deaths:
                    raise UnitFailed(f"unit {name(unit)}: its worker died {max_deaths} times") from None
                if died:
                    replace(actor)
                elif actor in live:                           # unreachable, maybe not dead: ask it
                    live.remove(actor)
                    probe(actor)
                if live:
                    submit(min(live, key=lambda a: load[a]), unit)
                else:
                    queue.appendleft(unit)          # no live worker: the first one to answer takes it
                continue
            except RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise UnitFailed(f"unit {name(unit)}: {type(cause).__name__}: {cause}") from cause
            on_result(unit, result)
            if queue and actor in live:
                submit(actor)
    finally:
        for a in started:
            ray.kill(a, no_restart=True)
