"""The front door: `mmbatch demo`, then `inspect`, `evaluate` and two `retrain` cycles on its output.

Runs the real console script in subprocesses (each with its own embedded Ray), as a user would.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmbatch as mmbatch_pkg

pytestmark = pytest.mark.slow          # the fast tier (`pytest -m "not slow"`) skips this module

def mmbatch(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    exe = shutil.which("mmbatch") or str(Path(sys.executable).parent / "mmbatch")
    # the package under test (this checkout), not whatever the console script's install points at
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(Path(mmbatch_pkg.__file__).resolve().parents[1]))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = mmbatch("demo", "--out", str(out), "--per-class", "16", "--epochs", "6")
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    return out, proc.stdout


def test_demo_leaves_features_model_and_report(demo):
    out, stdout = demo
    assert list((out / "features").glob("*.parquet")) and (out / "features" / "_manifest.json").exists()
    model_dirs = list(out.glob("train/**/model/model.pt"))
    assert model_dirs, "no exported model"
    state = torch.load(model_dirs[0], weights_only=True)
    assert isinstance(state, dict) and state
    reports = list(out.glob("train/**/report.html"))
    assert reports and "<img" in reports[0].read_text()
    assert "test accuracy" in stdout and "fused" in stdout and "audio only" in stdout
    assert "modality completion" in stdout and list(out.glob("train/completed/model/model.pt"))
    # the result table comes once (training's, columns model / accuracy / macro-F1 / loss), the closing
    # screen sums it up in one line and lists the completion outputs; partner rows are named as such
    assert sum(ln.startswith("image only ") for ln in stdout.splitlines()) == 1, stdout[-4000:]
    assert "speech rows (LibriSpeech-style) used only as pairing partners" in stdout
    assert "completion: model" in stdout and "best single modality" in stdout
    # the fused model beats every single modality on this corpus (built to need two modalities)
    acc = {}
    for ln in stdout.splitlines():
        m = re.match(r"^(fused \(\w+\)|\w+ only)\s+([\d.]+)\s+[\d.]+\s+[\d.]+$", ln.strip())
        if m:
            acc.setdefault(m.group(1).split()[0], float(m.group(2)))       # the first table: the demo's model
    assert acc["fused"] > max(v for k, v in acc.items() if k != "fused") + 0.2, acc


def test_inspect_reads_the_demo_output(demo):
    out, _ = demo
    proc = mmbatch("inspect", str(out / "features"), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["rows"] == 64 and info["metadata"]["kind"] == "fused"
    assert info["presence"] == {"image": 64, "audio": 64, "text": 64}
    proc = mmbatch("inspect", str(out / "canonical" / "timit"), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["counts"]["split"] == {"dev": 8, "test": 8, "train": 16}


def test_evaluate_scores_the_exported_model(demo):
    out, _ = demo
    model_dir = out / "train" / "fusion" / "model"
    proc = mmbatch("evaluate", str(model_dir), "--data", str(out / "features"), "--out", str(out / "eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    # evaluate scores the same rows with the same model as training did on its test split ...
    trained = json.loads((out / "train" / "fusion" / "metrics.json").read_text())
    assert metrics["metrics"]["accuracy"] == pytest.approx(trained["metrics"]["accuracy"])
    # ... and the fused model is well above chance (4 classes: 0.25) on the demo's small test split
    assert metrics["metrics"]["accuracy"] >= 0.5
    assert (out / "eval" / "report.html").exists()


def test_retrain_promotes_first_model_then_does_nothing_without_new_data(demo):
    out, _ = demo
    wf = str(out / "workflow.yaml")
    common = ["--set", "train.baselines=false", "--set", "train.epochs=3"]
    first = mmbatch("retrain", wf, *common)
    assert first.returncode == 0, (first.stdout[-3000:], first.stderr[-3000:])
    champion = json.loads((out / "registry" / "aliases" / "champion.json").read_text())
    assert champion
    versions = sorted(p.name for p in (out / "registry" / "versions").iterdir())
    assert versions == ["v0001"]
    second = mmbatch("retrain", wf, *common)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "no new data" in (second.stdout + second.stderr).lower()
    assert sorted(p.name for p in (out / "registry" / "versions").iterdir()) == versions
    assert json.loads((out / "registry" / "aliases" / "champion.json").read_text()) == champion
