"""`features.gpu_shape: split` (docs/data-path.md, "The GPU shape"): a model extractor decodes in CPU
workers and embeds in one actor per GPU, two operators of the same Ray Data job, with the fused
shape's output bits, quarantine and counts. GPUs here are fake (the scheduler sees them, CUDA does
not): the model falls back to CPU inside the GPU actor, and the summary says so."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import assert_same_output

from mmbatch.config import WorkflowError, workflow_from_dict
from mmbatch.preprocess import run_preprocess


def write_canonical(root: Path) -> Path:
    """14 demo images in 3 row groups (3 units); row s05 is a truncated JPEG, s13 is not an image."""
    from mmbatch.demo.corpus import encode_jpeg, make_image
    from mmbatch.schema import CANONICAL, with_metadata

    rng = np.random.default_rng(0)
    good = [encode_jpeg(make_image(c % 4, rng)) for c in range(12)]
    media = good[:5] + [good[0][: len(good[0]) // 3]] + good[5:] + [b"not an image at all"]
    rows = [{"sample_id": f"s{i:02d}", "source": "manifest", "split": "train", "label": i % 4,
             "image": {"bytes": b, "path": f"img/{i}.jpg"}} for i, b in enumerate(media)]
    canon = root / "canon"
    canon.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=with_metadata(CANONICAL)), canon / "part-00000.parquet",
                   row_group_size=5)
    (canon / "_manifest.json").write_text("{}")
    return canon


def workflow(datasets: dict, out: Path, shape: str) -> dict:
    # several model batches per unit (features.batch_size 3) and per encode call (image batch_size 2):
    # the split shape must give the model the same batches as the fused one
    return {"datasets": [{"name": n, "path": str(p)} for n, p in datasets.items()],
            "features": {"image": {"extractor": "cnn", "size": 32, "batch_size": 2}, "batch_size": 3,
                         "gpu_shape": shape},
            "output": {"path": str(out)}}


DRIVER = r"""
import json, sys
from mmbatch.engine.runtime import init_ray
init_ray(num_cpus=2, num_gpus=2)          # fake GPUs: the scheduler sees them, CUDA does not exist
from mmbatch.config import workflow_from_dict
from mmbatch.preprocess import run_preprocess
from mmbatch.preprocess.summary import render_summary
res = {}
for name, wf in json.loads(sys.argv[1]).items():
    s = run_preprocess(workflow_from_dict(wf), progress=False)
    res[name] = {"summary": render_summary(s), "processed": s.shards_processed, "skipped": s.shards_skipped,
                 "rows_in": s.rows_in, "quarantined": s.quarantined, "rows_out": s.rows_out,
                 "reasons": s.quarantine_reasons, "reconciles": s.reconciles,
                 "placement": {m: {k: (sorted(v) if isinstance(v, set) else v) for k, v in p.items()}
                               for m, p in s.placement.items()}}
print("RESULT", json.dumps(res))
"""


def markers(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_shards").glob("*.json"))]


@pytest.mark.slow
def test_split_shape_gives_the_fused_bits_from_two_steps(ray_session, tmp_path):
    """On a Ray with 2 fake GPUs: the fused run, the split run (same canonical input, a corrupt image
    in it), then the fused workflow over the split run's output. Same files, quarantine and counts;
    each split unit was decoded in a GPU-less actor and embedded in another that holds a GPU; and a
    change of shape redoes no unit."""
    canon = write_canonical(tmp_path)
    runs = {"fused": workflow({"imgs": canon}, tmp_path / "fused", "fused"),
            "split": workflow({"imgs": canon}, tmp_path / "split", "split"),
            "resume": workflow({"imgs": canon}, tmp_path / "split", "fused")}
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    fused, split = res["fused"], res["split"]

    assert_same_output(tmp_path / "split", tmp_path / "fused")
    assert_same_output(tmp_path / "split" / "quarantine", tmp_path / "fused" / "quarantine")
    for r in (fused, split):
        assert r["processed"] == 3 and r["rows_in"] == 14 and r["quarantined"] == 2 and r["rows_out"] == 12, r
        assert r["reconciles"] and r["reasons"] == {"image:corrupt_image": 1, "image:not_an_image": 1}, r
    q = pq.read_table(tmp_path / "split" / "quarantine").to_pylist()
    assert {r["sample_id"] for r in q} == {"s05", "s13"} and all(r["path"] and r["detail"] for r in q)

    img = split["placement"]["image"]
    assert img["shape"] == "split" and img["device"] == "gpu" and img["num_gpus"] == 1.0, img
    assert img["devices"] == ["cpu"] and "fell back to CPU" in img["stage"], img      # no CUDA behind it
    assert "image: split shape, decode: CPU workers; embed: one worker per GPU" in split["summary"]
    assert fused["placement"]["image"]["shape"] == "fused"

    recs = markers(tmp_path / "split")
    assert len(recs) == 3 and {r["shape"] for r in recs} == {"split"}
    for r in recs:
        decode, embed = r["actors"]["decode"], r["actors"]["embed"]
        assert decode["pid"] != embed["pid"], r          # two operators, two actors
        assert decode["gpus"] == [] and len(embed["gpus"]) == 1, r
    assert {r["shape"] for r in markers(tmp_path / "fused")} == {"fused"}
    assert all(len(r["actors"]["unit"]["gpus"]) == 1 for r in markers(tmp_path / "fused"))
    # the shape is not in the units' fingerprints: the other shape finds every unit committed
    assert res["resume"]["processed"] == 0 and res["resume"]["skipped"] == 3, res["resume"]
    assert {r["fingerprint"] for r in recs} == {r["fingerprint"] for r in markers(tmp_path / "fused")}


def test_split_without_a_gpu_runs_fused_and_says_so_once(ray_session, tmp_path, caplog):
    """The shared Ray has no GPU and nothing asks for one: two datasets, one warning, the fused shape
    on CPU, and the corrupt rows quarantined as ever."""
    canon = write_canonical(tmp_path)
    wf = workflow({"a": canon, "b": canon}, tmp_path / "out", "split")
    with caplog.at_level(logging.WARNING, logger="mmbatch"):
        s = run_preprocess(workflow_from_dict(wf), progress=False)
    said = [r for r in caplog.records if "gpu_shape: split" in r.getMessage()]
    assert len(said) == 1 and "running the fused shape" in said[0].getMessage(), caplog.text
    assert s.placement["image"]["shape"] == "fused" and s.placement["image"]["device"] == "cpu"
    assert {r["shape"] for r in markers(tmp_path / "out")} == {"fused"}
    assert s.shards_processed == 6 and s.quarantined == 4 and s.rows_out == 24 and s.reconciles


def test_a_bad_gpu_shape_names_the_key_and_the_values():
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({"features": {"gpu_shape": "bogus"}})
    assert "features.gpu_shape" in str(e.value) and "'fused' or 'split'" in str(e.value), str(e.value)
    assert workflow_from_dict({}).features.gpu_shape == "fused"
