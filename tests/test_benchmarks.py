"""The benchmark scripts stay runnable: tiny end-to-end runs of both, as a user would start them.

Speed is not asserted here (that is what the benchmarks report); what is asserted is that every
contender ran on the same data, produced every row and was measured.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_preprocess_benchmark_runs_every_contender(tmp_path):
    _run(["benchmarks.run", "--samples", "24", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    res = json.loads((tmp_path / "out" / "preprocess.json").read_text())
    assert res["samples"] == 24
    cores = os.cpu_count()
    assert set(res["runs"]) == {"ideal", "mmbatch", f"multiprocessing.Pool({cores})", f"datasets.map(num_proc={cores})"}
    assert res["ideal_samples_per_s"] > 0
    (mm,) = res["runs"]["mmbatch"]
    assert mm["rows_out"] == 24                                   # every sample fused
    assert mm["ray_startup_s"] > 0
    assert any(k.startswith("ray::MapWorker") for k in mm["cpu_by_process"])   # the extract actors were measured
    for name, (run,) in res["runs"].items():
        if name != "ideal":
            assert run["cpu_seconds"] > 0 and run["peak_mem_mb"] > 0 and run["samples_per_s"] > 0, name
    table = (tmp_path / "out" / "preprocess.md").read_text()
    assert "% of ideal" in table and table.count("\n| ") == 5      # header + ideal + 3 contenders


def test_training_benchmark_runs_plain_ddp_and_ray_train(tmp_path):
    _run(["benchmarks.train", "--rows", "600", "--epochs", "3", "--dim", "8", "--only", "plain,ddp2,ray2",
          "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    res = json.loads((tmp_path / "out" / "train.json").read_text())
    runs = res["runs"]
    assert len(runs) == 3
    plain = runs["plain torch loop (1 process)"]
    ddp = runs["torch DDP without Ray (2 processes, reference)"]
    ray2 = next(r for k, r in runs.items() if k.startswith("mmbatch Ray Train, 2 workers"))
    assert plain["ratio_to_plain"] == 1.0
    assert ddp["allreduce_ms"] > 0 and ddp["rows_per_step"] * 2 == plain["rows_per_step"]
    assert abs(ray2["train_rows"] - plain["train_rows"]) <= 1       # both ranks together saw the whole split
    for r in (plain, ddp, ray2):
        assert len(r["epoch_s"]) == 1 and r["epoch_s"][0] > 0     # epochs after the first, start to next start
    assert "| plain torch loop (1 process) |" in (tmp_path / "out" / "train.md").read_text()
