"""The GPU-shape benchmark (`python -m benchmarks.gpu_shape --tiny`) on the shared local Ray: both
shapes give the same embeddings, and the split shape's decoded tensors really cross the object store."""
from __future__ import annotations

import json

from benchmarks import gpu_shape


def test_both_shapes_embed_alike_and_split_moves_the_decoded_tensors(ray_session, tmp_path):
    assert gpu_shape.main(["--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_shape-tiny.json").read_text())
    s = res["setup"]
    runs = {(r["shape"], r["batch"]): r for r in res["runs"]}
    assert set(runs) == {(shape, b) for shape in ("fused", "split") for b in s["batches"]}
    n = s["images"]
    for (shape, batch), r in runs.items():
        assert r["images"] == n and r["ids"], r                               # every image, once
        assert r["max_abs_diff_vs_fused"] <= 1e-5, r                          # same embeddings either way
        assert 0 < r["embed_actor_util"] <= 1.0 + 1e-6 and r["samples_per_s"] > 0, r
        if shape == "split":
            # the embed actor received exactly N x H x W x 3 uint8, through the object store: Ray Data
            # kept decode and embed as separate operators (fused, no tensor would cross it)
            assert r["decoded_bytes_through_store"] == n * s["size"] * s["size"] * 3, r
            assert r["operators_separate"], r
            assert r["bytes_per_embed_batch"] == batch * s["size"] * s["size"] * 3
        else:
            assert r["decoded_bytes_through_store"] == 0 and not r["operators_separate"], r

    # the GPU model follows from the measured per-image costs
    c = res["costs"]
    assert c["decode_224_ms"] > 0 and c["resnet50_224_cpu_ms"] > 0 and c["threads"] == 1
    for m in res["gpu_model"]:
        g = m["gpu_x_cpu_core"] * 1000 / c["resnet50_224_cpu_ms"]
        assert abs(m["gpu_img_per_s"] - g) <= 1
        assert abs(m["decode_cpus_per_gpu"] - g * c["decode_224_ms"] / 1000) <= 0.01
        assert abs(m["split_store_mb_per_s"] - g * 224 * 224 * 3 / 1e6) <= 0.1
    table = (tmp_path / "gpu_shape-tiny.md").read_text()
    assert "measured on a shared, loaded 2-core VM" in table and "standing in for the GPU" in table
    assert table.count("\n| fused |") == len(s["batches"]) and table.count("\n| split |") == len(s["batches"])
