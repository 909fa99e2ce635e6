"""Test-only fault injection, loaded into Ray workers by the tests (never by mmbatch itself).

A test starts a Ray job with ``runtime_env={"worker_process_setup_hook": "fault_hooks.<hook>"}``
and this folder on the workers' ``PYTHONPATH``; the hook runs in every worker process of that job
and wraps one mmbatch function. Each fault fires once: its flag file is removed before the
process SIGKILLs itself, so the restarted worker goes on (and the test can see that it fired).

- :func:`kill_nth_unit` (reliability tests): when the flag file named by ``MMBATCH_TEST_KILL_UNIT``
  exists and holds N, a unit worker of mmbatch's actor pool (mmbatch.engine.units) dies at the start of its N-th unit.
- :func:`kill_at_epoch` (training fault tests): ``MMBATCH_TEST_KILL_EPOCH`` is
  ``<flag file>:<rank>:<epoch>``; while the flag file exists, the Ray Train worker of that rank
  dies at the start of that epoch (0-based), once the previous epoch's checkpoint is committed.
"""
from __future__ import annotations

import inspect
import os
import signal

KILL_UNIT_ENV = "MMBATCH_TEST_KILL_UNIT"
KILL_EPOCH_ENV = "MMBATCH_TEST_KILL_EPOCH"


def kill_nth_unit() -> None:
    flag = os.environ.get(KILL_UNIT_ENV)
    if not flag:
        return
    from mmbatch.engine import units

    original = units._PoolActor.run
    calls = {"n": 0}

    def run(self, unit):
        calls["n"] += 1
        try:
            with open(flag) as f:
                n = int(f.read().strip() or 1)
            if calls["n"] >= n:
                os.remove(flag)
                os.kill(os.getpid(), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        return original(self, unit)

    units._PoolActor.run = run


def kill_at_epoch() -> None:
    spec = os.environ.get(KILL_EPOCH_ENV)
    if not spec:
        return
    flag, rank, epoch = spec.rsplit(":", 2)
    from mmbatch.train import loop

    original = loop.epoch_batches

    def epoch_batches(*args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs).arguments
        if (bound["rank"], bound["epoch"]) == (int(rank), int(epoch)) and os.path.exists(flag):
            # Ray Train V2 registers a report when its controller next polls the workers: wait
            # until the previous epoch's checkpoint is committed, so the test knows which
            # checkpoint the restart must come from.
            import ray.train
            from ray.train import CheckpointConsistencyMode
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=60)
            os.remove(flag)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    loop.epoch_batches = epoch_batches
