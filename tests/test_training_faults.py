"""Training survives a killed worker and resumes a stopped run (real Ray Train, shared local Ray).

The killed-worker runs are separate Ray jobs on the shared Ray (a subprocess driver, TRAIN_SCRIPT)
whose workers load the test-only hook tests/fault_hooks.py:kill_at_epoch; mmbatch holds no fault code.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from fault_hooks import KILL_EPOCH_ENV
from faults import run_cmd
from fused_data import write_fused

from mmbatch.config import Workflow
from mmbatch.train.run import run_training

# A driver of its own Ray job on the shared Ray: its workers (the Ray Train controller and
# workers included) run the setup hook fault_hooks.kill_at_epoch, with tests/ on their path.
pytestmark = pytest.mark.slow          # the fast tier (`pytest -m "not slow"`) skips this module

TRAIN_SCRIPT = r"""
import json, os, sys
import ray
ray.init(address=sys.argv[1], runtime_env={"worker_process_setup_hook": "fault_hooks.kill_at_epoch",
                                           "env_vars": json.loads(sys.argv[3])})
from mmbatch.config import Workflow
from mmbatch.train.run import run_training
try:
    res = run_training(Workflow.model_validate(json.loads(sys.argv[2])), baselines=False)
except RuntimeError as e:
    print("FAILED", json.dumps(str(e)))
    sys.exit(0)
print("RESULT", json.dumps({"starts": res.starts, "history": res.history, "status": res.status,
                            "accuracy": res.metrics["accuracy"]}))
"""


def _wf(data, out, name, **train) -> dict:
    return {"train": {"data": str(data), "out": str(out), "name": name, "epochs": 4, "hidden": 32,
                      "batch_size": 64, "num_workers": 2, "schedule": "none", **train}}


def train_killing_at_epoch(ray_session, wf: dict, flag: Path, rank: int, epoch: int) -> tuple[str, object]:
    """Run ``wf``'s training as its own job on the shared Ray, the worker of ``rank`` SIGKILLing itself
    at the start of ``epoch`` while ``flag`` exists: ("RESULT", result dict) or ("FAILED", message)."""
    tests = str(Path(__file__).parent)
    worker_env = {KILL_EPOCH_ENV: f"{flag}:{rank}:{epoch}",
                  "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    address = ray_session.get_runtime_context().gcs_address
    proc = run_cmd([sys.executable, "-c", TRAIN_SCRIPT, address, json.dumps(wf), json.dumps(worker_env)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    kind, value = [ln for ln in proc.stdout.splitlines() if ln.startswith(("RESULT ", "FAILED "))][-1].split(" ", 1)
    return kind, json.loads(value)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fused(str(tmp_path_factory.mktemp("faults") / "fused"), n=300, seed=3)


def test_killed_worker_restarts_from_checkpoint(ray_session, data, tmp_path):
    """Rank 1 SIGKILLs itself at the start of epoch 2 (0-based); Ray Train restarts the worker
    group, which resumes at epoch 2 from the epoch-1 checkpoint, and the run completes."""
    flag = tmp_path / "kill-once"
    flag.write_text("1")
    kind, res = train_killing_at_epoch(ray_session, _wf(data, tmp_path / "out", "killed", max_failures=2),
                                       flag, rank=1, epoch=2)

    assert kind == "RESULT", res
    assert not flag.exists(), "the fault never fired"
    assert res["starts"] == [0, 2], res["starts"]              # restarted at the checkpointed epoch, not 0
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2, 3]
    assert [h["attempt"] for h in res["history"]] == [1, 1, 2, 2]
    assert res["status"] == "resumed"
    assert res["accuracy"] > 0.6                                # chance is 0.25


def test_stopped_run_resumes_when_started_again(ray_session, data, tmp_path):
    """With no retries left the run stops (error); the same command again resumes it from
    its latest checkpoint instead of starting over."""
    flag = tmp_path / "kill-once"
    flag.write_text("1")
    wf = _wf(data, tmp_path / "out", "stopped", num_workers=1, max_failures=0)
    kind, message = train_killing_at_epoch(ray_session, wf, flag, rank=0, epoch=2)
    assert kind == "FAILED" and "resume" in message, message
    assert not flag.exists(), "the fault never fired"
    run_dir = tmp_path / "out" / "stopped"
    assert sorted(p for p in os.listdir(run_dir) if p.startswith("checkpoint_epoch")) == \
        ["checkpoint_epoch_0000", "checkpoint_epoch_0001"]

    res = run_training(Workflow.model_validate(wf), baselines=False)     # again, undisturbed
    assert res.starts == [0, 2], res.starts
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    assert res.status == "resumed"
    assert res.metrics["accuracy"] > 0.6


def test_killed_train_driver_resumes_when_run_again(ray_session, data, tmp_path):
    """`mmbatch train` SIGKILLed mid-run (driver, its embedded Ray and the workers all die at once);
    the same command again resumes from the last registered checkpoint instead of starting over."""
    import glob
    import shutil
    import tempfile
    import time

    import yaml
    from faults import kill_when, mmbatch_exe, private_ray_tmpdir

    epochs = 40
    out = tmp_path / "out"
    wf_file = tmp_path / "wf.yaml"
    wf_file.write_text(yaml.safe_dump({"train": {
        "data": str(data), "out": str(out), "name": "killed", "epochs": epochs, "hidden": 32, "batch_size": 64,
        "num_workers": 1, "schedule": "none"}}))
    cmd = mmbatch_exe() + ["train", str(wf_file)]
    run_dir = out / "killed"
    checkpoints = lambda: len(list(run_dir.glob("checkpoint_epoch_*"))) >= 3  # noqa: E731
    ray_tmp = private_ray_tmpdir()
    t_start = time.time()
    try:
        first = kill_when(cmd, checkpoints, tmp_path / "first.log", RAY_TMPDIR=ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert first["killed"], (tmp_path / "first.log").read_text()[-3000:]
    assert not (run_dir / "model" / "model.json").exists()          # killed before the export

    res = run_training(Workflow.model_validate(yaml.safe_load(wf_file.read_text())), baselines=False)  # again
    assert res.status == "resumed"
    assert len(res.starts) == 2 and res.starts[0] == 0 and 1 <= res.starts[1] < epochs, res.starts
    assert [h["epoch"] for h in res.history] == list(range(epochs))     # every epoch once, in order
    assert (run_dir / "model" / "model.json").exists()
    # the killed run's not-yet-uploaded local checkpoints are cleared by the next start, not left in /tmp
    staged = [p for p in glob.glob(os.path.join(tempfile.gettempdir(), "mmbatch-ckpt-*", "**", "state.pt"),
                                   recursive=True) if os.path.getmtime(p) >= t_start]
    assert staged == [], staged
