"""Test-only fault injection, loaded into Ray workers by the tests (never by mmbatch itself).

The reliability tests start their own Ray with
``runtime_env={"worker_process_setup_hook": "fault_hooks.kill_nth_unit"}`` and this folder on
``PYTHONPATH``. The hook wraps the unit runner of mmbatch's actor pool: when the flag file named by
``MMBATCH_TEST_KILL_UNIT`` exists and holds N, the worker process SIGKILLs itself at the start of
its N-th unit (once: the flag is removed first, so the restarted actor goes on).
"""
from __future__ import annotations

import os
import signal

KILL_UNIT_ENV = "MMBATCH_TEST_KILL_UNIT"


def kill_nth_unit() -> None:
    flag = os.environ.get(KILL_UNIT_ENV)
    if not flag:
        return
    from mmbatch import pool

    original = pool._PoolActor.run
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

    pool._PoolActor.run = run
