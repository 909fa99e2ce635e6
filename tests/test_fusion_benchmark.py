"""The fusion-quality benchmark stays runnable, and fails loudly when fusion loses.

A tiny run (one task, one seed, a few dozen rows, 2 epochs) as a user would start it; the
pass/fail rule itself is checked on hand-made results.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.fusion import failures

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fusion_benchmark_runs_every_model_and_reports_gains(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fusion", "--tasks", "xor", "--seeds", "0",
                           "--train", "120", "--val", "40", "--test", "60", "--epochs", "2", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    # at this size fusion may or may not win: the run must finish and say which
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    res = json.loads((tmp_path / "fusion.json").read_text())
    (r,) = res["results"]
    assert set(r["unimodal"]) == {"image", "audio", "text"}
    assert set(r["fused"]) == {"early", "weighted", "late", "gated"}
    best = max(u["accuracy"] for u in r["unimodal"].values())
    for f in r["fused"].values():
        assert abs(f["gain"] - (f["accuracy"] - best)) < 1e-9
    assert set(r["fused"]["gated"]["modality_weights"]) == {"image", "audio", "text"}
    table = (tmp_path / "fusion.md").read_text()
    assert table.count("| xor |") == 7 and "gain over best unimodal" in table
    assert ("FUSION BENCHMARK FAILED" in proc.stderr) == (proc.returncode == 1) == bool(res["failures"])


def test_benchmark_fails_a_fusion_that_loses_or_starves_a_strong_modality():
    res = {"task": "t", "seed": 0, "best_unimodal": "audio",
           "unimodal": {"image": {"accuracy": 0.81}, "audio": {"accuracy": 0.93}, "text": {"accuracy": 0.3}},
           "fused": {"early": {"accuracy": 0.95, "gain": 0.02},
                     "late": {"accuracy": 0.935, "gain": 0.005},
                     "gated": {"accuracy": 0.96, "gain": 0.03,
                               "modality_weights": {"image": 0.03, "audio": 0.9, "text": 0.07}}}}
    why = failures(res, min_gain=0.01, ceiling=0.995, tie=0.004, strong=0.8, min_weight=0.05)
    assert len(why) == 2
    assert "late 0.935" in why[0] and "+0.5 points" in why[0]
    assert "gated puts 0.030 weight on image" in why[1]
    # at the ceiling a tie passes
    res["unimodal"]["audio"]["accuracy"] = 1.0
    res["fused"] = {"early": {"accuracy": 0.998, "gain": -0.002}}
    assert failures(res, 0.01, 0.995, 0.004, 0.8, 0.05) == []
