"""mmbatch.engine.units.run_units (a Ray Data actor pool) on the shared real Ray (2 CPUs): every unit once,
dead workers replaced, failing units named, warnings said once. The worker factories are defined
inside functions so Ray ships them by value."""
from __future__ import annotations

import os
import threading

import pytest

from mmbatch.engine import capacity
from mmbatch.engine.units import Resources, Step, UnitFailed, run_units


def run_in_thread(deadline_s: float = 120, after_each=None, **kwargs) -> dict:
    """run_units with a deadline: a hung pool fails the test instead of hanging it. Returns unit ->
    results received for it; ``after_each(unit, result)`` runs after each one is recorded."""
    results: dict = {}
    box: dict = {}

    def on_result(unit, result):
        results.setdefault(unit, []).append(result)
        if after_each is not None:
            after_each(unit, result)

    def target():
        try:
            run_units(on_result=on_result, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(deadline_s)
    assert not t.is_alive(), f"run_units still running after {deadline_s} s"
    if "error" in box:
        raise box["error"]
    return results


def dies_once(flag: str, at_unit, after_s: float | None = None):
    """A worker factory whose worker returns its pid, and whose process exits at ``at_unit`` while
    ``flag`` exists (removing it): at once, holding the unit, or ``after_s`` after answering it."""
    def make_worker(job):
        def work(unit):
            if unit == at_unit and os.path.exists(flag):
                os.remove(flag)
                if after_s is None:
                    os._exit(1)
                threading.Timer(after_s, os._exit, (1,)).start()
            return os.getpid()
        return work
    return make_worker


def test_every_unit_runs_once_and_results_reach_the_driver(ray_session):
    def make_worker(job):
        return lambda unit: (unit * job, os.getpid())

    results = run_in_thread(make_worker=make_worker, job=3, units=range(20), workers=2,
                            resources=Resources(num_cpus=1))
    assert sorted(results) == list(range(20))
    assert all(len(r) == 1 and r[0][0] == u * 3 for u, r in results.items())
    assert len({r[0][1] for r in results.values()}) == 2          # both workers got units


def test_unit_of_a_killed_worker_goes_to_another_worker(ray_session, tmp_path):
    flag = str(tmp_path / "kill-once")
    open(flag, "w").close()
    results = run_in_thread(make_worker=dies_once(flag, 5), job=None, units=range(12), workers=2,
                            resources=Resources(num_cpus=1))          # the process dies holding unit 5
    assert not os.path.exists(flag), "the fault never fired"
    assert sorted(results) == list(range(12)) and all(len(r) == 1 for r in results.values())


def test_dead_worker_whose_replacement_cannot_start_does_not_hang_the_job(ray_session, tmp_path):
    """Worker A answers unit 0 and dies; its CPU is taken by another actor, so no replacement can
    start (as when a node is gone). Ray Data may hand A its next unit before it learns of the death:
    that unit and the rest must run on worker B, and the job must end without the replacement.
    (The lost-node test in test_reliability.py covers the two-node case this cannot.)"""
    import ray

    flag = str(tmp_path / "die-after-answering")
    open(flag, "w").close()

    @ray.remote(num_cpus=1)
    class Blocker:
        def ready(self) -> bool:
            return True

    blockers = []

    def take_the_cpu(unit, pid):
        if unit == 0 and not blockers:
            blockers.append(Blocker.remote())                     # waits for a free CPU: A's, once A dies
            ray.get(blockers[0].ready.remote(), timeout=60)       # A is dead and its CPU taken

    try:
        results = run_in_thread(make_worker=dies_once(flag, 0, after_s=0.2), job=None, units=range(6),
                                workers=2, resources=Resources(num_cpus=1), after_each=take_the_cpu)
        assert not os.path.exists(flag), "the fault never fired"
        assert sorted(results) == list(range(6)) and all(len(r) == 1 for r in results.values())
        # the rest ran on B, or on B and a replacement that won the freed CPU before the blocker did
        # (Ray Data starts replacements at once: a race this test cannot fix); either way the job ended
        assert 1 <= len({results[u][0] for u in range(1, 6)} - {results[0][0]}) <= 2
    finally:
        for b in blockers:
            ray.kill(b)


def test_unit_that_keeps_killing_its_worker_fails_the_job_named(ray_session):
    def make_worker(job):
        def work(unit):
            if unit == "poison":
                os._exit(1)
            return unit
        return work

    with pytest.raises(UnitFailed, match=r"unit poison: its worker died 2 times"):
        run_in_thread(make_worker=make_worker, job=None, units=["a", "poison", "b"], workers=2,
                      resources=Resources(num_cpus=1), max_deaths=2)


def test_error_in_a_unit_fails_the_job_with_unit_and_cause(ray_session):
    def make_worker(job):
        def work(unit):
            if unit == 2:
                raise ValueError("bad row group")
            return unit
        return work

    with pytest.raises(UnitFailed, match=r"unit 2: ValueError: bad row group"):
        run_in_thread(make_worker=make_worker, job=None, units=range(4), workers=2,
                      resources=Resources(num_cpus=1))


def test_worker_that_cannot_be_built_fails_each_unit_with_its_error(ray_session):
    def make_worker(job):
        raise FileNotFoundError("no model at /nowhere/model.pt")

    with pytest.raises(UnitFailed, match=r"FileNotFoundError: no model at /nowhere/model.pt"):
        run_in_thread(make_worker=make_worker, job=None, units=range(3), workers=1,
                      resources=Resources(num_cpus=1))


def test_a_warning_from_building_the_workers_is_said_once_per_job(ray_session, caplog):
    import logging
    import warnings

    def make_worker(job):
        warnings.warn("model has random weights", RuntimeWarning)
        logging.getLogger("mmbatch.preprocess.features").warning("model has random weights")
        return lambda unit: unit

    with caplog.at_level(logging.WARNING, logger="mmbatch"):
        results = run_in_thread(make_worker=make_worker, job=None, units=range(8), workers=2,
                                resources=Resources(num_cpus=1))
    assert sorted(results) == list(range(8))
    said = [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()]
    assert said == ["model has random weights"]                 # two workers built it; said once


def test_pool_size_is_what_the_cluster_holds_bounded_by_max_workers_and_units(ray_session):
    """capacity.snapshot on the shared Ray (2 CPUs, no autoscaler): its node, no node types."""
    cluster = capacity.snapshot()
    assert cluster.types == [] and sum(n.get("CPU", 0) for n in cluster.nodes) == 2
    assert capacity.pool_size(cluster, 1, 0, units=10) == 2
    assert capacity.pool_size(cluster, 0.5, 0, units=10) == 4
    assert capacity.pool_size(cluster, 0.5, 0, units=3) == 3
    assert capacity.pool_size(cluster, 1, 0, units=10, max_workers=1) == 1
    assert capacity.pool_size(cluster, 1, 0.5, units=10) == 1   # no GPU here: at least one worker asks


def test_two_steps_a_unit_lost_in_the_second_reruns_and_a_first_step_error_is_named(ray_session, tmp_path):
    """``then``: a second actor pool takes each unit's first result (the preprocess split shape).
    Its one worker (one GPU) dies holding a unit: the pool restarts it (Ray Data would not replace it,
    and the job would wait for ever), that unit runs again, both steps, and every unit arrives once.
    An error in the first step passes the second by and fails the job with the unit named."""
    def tens(job):
        def work(unit):
            if unit == "bad":
                raise ValueError("cannot decode")
            return unit * 10, os.getpid()
        return work

    flag = str(tmp_path / "kill-once")
    open(flag, "w").close()
    kill = dies_once(flag, 50)          # built here: the factory below ships it by value

    def second(job):
        work = kill(job)
        return lambda first: (first[0] + job, first[1], work(first[0]))

    results = run_in_thread(make_worker=tens, job=1, units=range(8), workers=1, resources=Resources(num_cpus=1),
                            then=Step(second, 1, Resources(num_cpus=0.5), "second"))
    assert not os.path.exists(flag), "the fault never fired"
    assert sorted(results) == list(range(8)) and all(len(r) == 1 for r in results.values())
    assert all(r[0][0] == u * 10 + 1 for u, r in results.items())
    assert all(r[0][1] != r[0][2] for r in results.values())          # two actors: one per step

    with pytest.raises(UnitFailed, match=r"unit bad: ValueError: cannot decode"):
        run_in_thread(make_worker=tens, job=1, units=[1, "bad"], workers=1, resources=Resources(num_cpus=1),
                      then=Step(second, 1, Resources(num_cpus=0.5), "second"))
