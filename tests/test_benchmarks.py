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

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow          # the fast tier (`pytest -m "not slow"`) skips this module

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_preprocess_benchmark_runs_every_contender(tmp_path):
    _run(["benchmarks.run", "--samples", "24", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    res = json.loads((tmp_path / "out" / "preprocess-24.json").read_text())
    assert res["samples"] == 24
    cores = os.cpu_count()
    assert set(res["runs"]) == {"ideal", "mmbatch preprocess", f"multiprocessing.Pool({cores})",
                                "mmbatch preprocess, Ray Data's service actors running",
                                f"multiprocessing.Pool({cores}), plain librosa/OpenCV features",
                                "Pool script on mmbatch's Ray actor pool", f"datasets.map(num_proc={cores})",
                                "plain Ray Data map_batches", "mmbatch ingest (manifest)"}
    assert res["ideal_samples_per_s"] > 0
    (mm,) = res["runs"]["mmbatch preprocess"]
    assert mm["rows_out"] == 24                                   # every sample fused
    assert mm["ray_startup_s"] > 0
    assert any("_PoolActor" in k for k in mm["cpu_by_process"])   # the unit workers (Ray Data actors) were measured
    assert res["runs"]["mmbatch ingest (manifest)"][0]["rows_out"] == 24
    for name, (run,) in res["runs"].items():
        if name != "ideal":
            assert run["cpu_seconds"] > 0 and run["peak_mem_mb"] > 0 and run["samples_per_s"] > 0, name
    table = (tmp_path / "out" / "preprocess-24.md").read_text()
    assert "% of ideal" in table and table.count("\n| ") == 10     # header + ideal + 8 contenders
    chunked = pq.read_table(tmp_path / "data" / "n24" / "out-raychunk" / "raychunk.parquet")
    pooled = pq.read_table(tmp_path / "data" / "n24" / "out-pool" / "pool.parquet")
    assert chunked.num_rows == 24                           # the same function, hosted on Ray: same rows
    assert chunked.sort_by("sample_id").equals(pooled.sort_by("sample_id"))
    # mmbatch against each alternative within the round, not against itself or ingest
    assert set(res["paired_ratio"]) == {f"multiprocessing.Pool({cores})", f"datasets.map(num_proc={cores})",
                                        f"multiprocessing.Pool({cores}), plain librosa/OpenCV features",
                                        "plain Ray Data map_batches", "Pool script on mmbatch's Ray actor pool"}
    assert pq.read_table(tmp_path / "data" / "n24" / "out-plainpool" / "plainpool.parquet").num_rows == 24
    pool = res["runs"][f"multiprocessing.Pool({cores})"][0]
    assert res["paired_ratio"][f"multiprocessing.Pool({cores})"] == [round(mm["samples_per_s"] / pool["samples_per_s"], 3)]
    # the same against a Ray whose Ray Data service actors run already (a no-op job first)
    (warm,) = res["runs"]["mmbatch preprocess, Ray Data's service actors running"]
    assert warm["rows_out"] == 24
    assert not any("_StatsActor" in k or "Coordinator" in k for k in warm["cpu_by_process"] if warm["cpu_by_process"][k] > 0.5)
    assert set(res["paired_ratio_warm"]) == set(res["paired_ratio"])
    assert res["paired_ratio_warm"][f"multiprocessing.Pool({cores})"] == [round(warm["samples_per_s"] / pool["samples_per_s"], 3)]


def test_small_item_corpus_and_paired_memory_mode(tmp_path):
    """--small builds the AV-MNIST-shaped corpus (28x28 PNG + 1 s FLAC); --memory --pairing pairs it by
    label with a text-only partner dataset and measures N and 4N samples."""
    _run(["benchmarks.run", "--small", "--samples", "12", "--memory", "--pairing", "40", "--data",
          str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    res = json.loads((tmp_path / "out" / "memory-small-paired.json").read_text())
    assert [r["samples"] for r in res["runs"]] == [12, 48] and res["pairing_partner_rows"] == 40
    assert all(r["peak_mem_mb"] > 0 and r["driver_peak_mb"] > 0 for r in res["runs"])
    img = next((tmp_path / "data" / "small-n12" / "corpus" / "img").glob("*.png"))
    import cv2
    assert cv2.imread(str(img)).shape == (28, 28, 3)


def test_unit_ab_runs_both_ways_on_every_row(tmp_path):
    """benchmarks.unit_ab: mmbatch's unit and the Pool's chunk function, alternated in two actors,
    each over every row of every round."""
    _run(["benchmarks.unit_ab", "--small", "--samples", "16", "--rounds", "2", "--data", str(tmp_path / "data"),
          "--out", str(tmp_path / "ab.json")])
    res = json.loads((tmp_path / "ab.json").read_text())
    assert res["rounds"] == 2 and res["units"] >= 1
    for way in ("unit", "chunk"):
        assert res["per_sample"][way]["process_ms"] > 0 and res["per_sample"][way]["thread_ms"] > 0, way
    # the unit wrote its final files (the intercepted run_preprocess planned them, the actors wrote them)
    assert list((tmp_path / "data" / "small-n16" / "out-unit-ab").glob("*.parquet"))


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


def test_gpu_benchmark_runs_every_section_on_cpu(tmp_path):
    """`python -m benchmarks.gpu --tiny --device cpu`: the GPU benchmark's one command, at a tiny size."""
    proc = _run(["benchmarks.gpu", "--tiny", "--device", "cpu", "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "out")])
    assert "torch.cuda.is_available()" in proc.stdout and "benchmark device: cpu" in proc.stdout
    res = json.loads((tmp_path / "out" / "gpu-tiny.json").read_text())
    assert res["environment"]["device"] == "cpu" and res["environment"]["gpu"] is None
    sections = res["sections"]
    assert {n: s["ok"] for n, s in sections.items()} == {"resnet50": True, "shape": True, "logmel": True,
                                                          "preprocess": True, "preprocess_split": True,
                                                          "hf": True}, \
        {n: s.get("error") for n, s in sections.items()}

    resnet = sections["resnet50"]["runs"]
    assert {(r["name"].split(",")[0], r["precision"]) for r in resnet} >= {
        ("model only", "fp32"), ("model only", "bf16"), ("ResNetExtractor.encode", "fp32"),
        ("ResNetExtractor.encode", "bf16")}
    assert sum(r["name"].startswith("JPEG decode") for r in resnet) == 2           # 1 process and one per core
    assert any(r["name"].startswith("JPEG -> embedding") for r in resnet)
    for r in resnet:
        assert r["img_per_s"] > 0 and r["images"] > 0 and r["seconds"] > 0, r
    logmel = sections["logmel"]["runs"]
    assert sorted({r["clip_seconds"] for r in logmel}) == [1.0, 10.0] and len(logmel) == 4
    for r in logmel:
        assert r["x_realtime"] > 0 and r["audio_seconds"] > 0, r

    pre = sections["preprocess"]
    n = res["sizes"]["samples"]
    assert pre["samples"] == n and pre["ingest"]["rows"] == n
    assert pre["rows_in"] == n and pre["rows_out"] == n and pre["quarantined"] == 0   # every row written
    assert pre["units_processed"] > 0 and pre["units_skipped"] == 0                  # computed, not reused
    assert pre["samples_per_s"] > 0 and pre["ingest"]["samples_per_s"] > 0
    assert pre["placement"]["image"]["devices"] == ["cpu"]                           # the model ran on the CPU
    fused = pq.read_table(tmp_path / "data" / f"large-n{n}" / "fused", columns=["sample_id", "image_emb"])
    assert fused.num_rows == n and len(fused.column("image_emb")[0].as_py()) == 2048   # ResNet-50 features

    split = sections["preprocess_split"]        # gpu_shape: split without a GPU: the fused shape, same output
    assert split["ingest"] is None and split["rows_out"] == n and split["same_output_as_fused"] is True, split
    assert pre["shape"] == split["shape"] == "fused" and split["placement"]["image"]["devices"] == ["cpu"]

    # no GPU: utilisation is null everywhere, not zero
    assert pre["gpu"] is None
    assert all(r["gpu"] is None for r in resnet + logmel)
    table = (tmp_path / "out" / "gpu-tiny.md").read_text()
    shape = sections["shape"]
    assert [(r["shape"], r["batch"]) for r in shape["runs"]] == [("fused", 4), ("split", 4)]
    for r in shape["runs"]:
        assert r["ids"] and r["max_abs_diff_vs_fused"] <= 1e-5 and r["gpu"] is None, r
    assert shape["runs"][1]["decoded_bytes_through_store"] == shape["setup"]["images"] * 224 * 224 * 3
    assert shape["measured"]["decode_cpus_per_gpu"] > 0
    hf = sections["hf"]["runs"]              # the hf extractors: 3 modalities x 2 precisions x (encode, extract)
    assert {(r["modality"], r["precision"]) for r in hf} == {(m, p) for m in ("image", "audio", "text")
                                                            for p in ("fp32", "bf16")} and len(hf) == 12
    assert all(r["per_s"] > 0 and r["gpu"] is None for r in hf)
    # header + 7 ResNet + 2 shape + 4 log-mel + preprocess + ingest + preprocess (split asked) + 12 hf
    assert "CPU only" in table and table.count("\n| ") == 29


def test_scale_benchmark_measures_every_stage_and_size(tmp_path):
    """benchmarks.scale: each stage at each size timed and sampled, the fixed cost fitted."""
    out = tmp_path / "out"
    _run(["benchmarks.scale", "--rows", "40,80", "--stages", "ingest,inspect", "--data", str(tmp_path / "data"),
          "--out", str(out)])
    res = json.loads((out / "scale.json").read_text())["results"]
    assert set(res) == {"40", "80"}
    for n in ("40", "80"):
        ing = res[n]["ingest"]
        assert ing["seconds"] > 0 and ing["driver_mb"] > 50 and ing["worker_mb"] > 50 and ing["tree_mb"] > 0
        assert ing["worker_warnings"] == 0
        assert res[n]["inspect"]["seconds"] > 0
    canonical = tmp_path / "data" / "rows-80" / "canonical"
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in canonical.glob("*.parquet")) == 80
    md = (out / "scale.md").read_text()
    assert "| ingest | 80 |" in md and "fixed cost per job" in md
    from benchmarks.scale import fixed_cost
    assert fixed_cost({"1000": {"x": {"seconds": 3.0}}, "3000": {"x": {"seconds": 5.0}}}, "x") == (2.0, 1.0)
