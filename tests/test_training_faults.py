"""Training survives a killed worker and resumes a stopped run (real Ray Train, shared local Ray)."""
from __future__ import annotations

import os

import pytest

from fused_data import write_fused
from mmbatch.config import Workflow
from mmbatch.training.run import FAULT_ENV, run_training


def _wf(data, out, name, **train):
    t = {"data": str(data), "out": str(out), "name": name, "epochs": 4, "hidden": 32, "batch_size": 64,
         "num_workers": 2, "schedule": "none", **train}
    return Workflow.model_validate({"train": t})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fused(str(tmp_path_factory.mktemp("faults") / "fused"), n=300, seed=3)


def test_killed_worker_restarts_from_checkpoint(ray_session, data, tmp_path, monkeypatch):
    """Rank 1 SIGKILLs itself at the start of epoch 2 (0-based); Ray Train restarts the worker
    group, which resumes at epoch 2 from the epoch-1 checkpoint, and the run completes."""
    flag = tmp_path / "kill-once"
    flag.write_text("1")
    monkeypatch.setenv(FAULT_ENV, f"{flag}:1:2")
    res = run_training(_wf(data, tmp_path / "out", "killed", max_failures=2), baselines=False)

    assert not flag.exists(), "the fault never fired"
    assert res.starts == [0, 2], res.starts                 # restarted at the checkpointed epoch, not 0
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    assert [h["attempt"] for h in res.history] == [1, 1, 2, 2]
    assert res.status == "resumed"
    assert res.metrics["accuracy"] > 0.6                     # chance is 0.25


def test_stopped_run_resumes_when_started_again(ray_session, data, tmp_path, monkeypatch):
    """With no retries left the run stops (error); the same command again resumes it from
    its latest checkpoint instead of starting over."""
    flag = tmp_path / "kill-once"
    flag.write_text("1")
    monkeypatch.setenv(FAULT_ENV, f"{flag}:0:2")
    wf = _wf(data, tmp_path / "out", "stopped", num_workers=1, max_failures=0)
    with pytest.raises(RuntimeError, match="resume"):
        run_training(wf, baselines=False)
    assert not flag.exists()
    run_dir = tmp_path / "out" / "stopped"
    assert sorted(p for p in os.listdir(run_dir) if p.startswith("checkpoint_epoch")) == \
        ["checkpoint_epoch_0000", "checkpoint_epoch_0001"]

    monkeypatch.delenv(FAULT_ENV)
    res = run_training(wf, baselines=False)
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
