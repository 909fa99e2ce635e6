"""Training's bounded-memory paths without Ray: streamed input statistics, row-group sampling,
streamed scoring and the file-by-file label scan give the figures of the whole-split code."""
from __future__ import annotations

import numpy as np
import pytest

from fused_data import CLASS_NAMES, write_fused
from mmbatch.train.data import FusedData, distinct_splits, row_groups, spread_sample
from mmbatch.train.evaluate import NoRows, evaluate_arrays, evaluate_batches
from mmbatch.train.models import FusionModel, RunningStats, feature_stats

DIMS = {"image": 8, "audio": 8, "text": 8}


def _chunks(arrays, size):
    n = len(arrays["y"])
    return [{k: v[s:s + size] for k, v in arrays.items()} for s in range(0, n, size)]


def test_running_stats_match_whole_split_stats():
    rng = np.random.default_rng(0)
    n = 1000
    arrays = {"image_emb": (rng.normal(size=(n, 16)) * 3 + 5).astype(np.float32), "has_image": rng.random(n) > 0.2,
              "audio_emb": rng.normal(size=(n, 5, 4)).astype(np.float32), "audio_len": rng.integers(0, 6, n),
              "has_audio": np.ones(n, bool), "text_emb": rng.integers(0, 10, (n, 4)), "y": np.zeros(n, np.int64)}
    arrays["image_emb"][:, 3] = 7.0                    # a constant feature: floored std
    whole = feature_stats(arrays, ["image", "audio", "text"])
    acc = RunningStats(["image", "audio", "text"])
    for part in _chunks(arrays, 137):
        acc.add(part)
    got = acc.result()
    assert set(got) == set(whole) == {"image", "audio"}          # token ids / pixels get no statistics
    for m in whole:
        for k in ("mean", "std"):
            np.testing.assert_allclose(got[m][k], whole[m][k], rtol=1e-5, atol=1e-6)
    assert got["image"]["std"][3] > 0


def test_spread_sample_takes_row_groups_from_everywhere():
    groups = [(f"f{i // 10}", i % 10, 100) for i in range(100)]      # 10 files x 10 row groups x 100 rows
    picked = spread_sample(groups, 1000)
    assert 1000 <= sum(n for *_, n in picked) <= 1100
    assert {f for f, *_ in picked} == {f"f{i}" for i in range(10)}   # not the first file only
    assert spread_sample(groups, 10 ** 6) == groups
    assert spread_sample(groups, 1000) == picked                      # deterministic


def test_streamed_scoring_matches_whole_split(tmp_path):
    data = FusedData.open(write_fused(str(tmp_path / "f"), n=600, seed=3, files=3, missing=0.2))
    mods = list(DIMS)
    arrays = data.arrays("test", mods)
    model = FusionModel(DIMS, len(CLASS_NAMES), "weighted", 16, 0.0).eval()
    whole = evaluate_arrays(model, arrays, CLASS_NAMES)
    held = evaluate_batches(model, _chunks(arrays, 50), CLASS_NAMES)          # under HOLD_BYTES: scored whole
    assert held == whole
    streamed = evaluate_batches(model, _chunks(arrays, 50), CLASS_NAMES, hold_bytes=0)
    assert streamed["confusion"] == whole["confusion"] and streamed["accuracy"] == whole["accuracy"]
    assert streamed["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    for m in mods:
        assert streamed["modality_weights"][m] == pytest.approx(whole["modality_weights"][m], rel=1e-5)
        assert streamed["missing_rate"][m] == pytest.approx(whole["missing_rate"][m])
    with pytest.raises(NoRows):
        evaluate_batches(model, iter(()), CLASS_NAMES)


def test_file_by_file_scan_and_streamed_statistics(tmp_path):
    path = write_fused(str(tmp_path / "f"), n=500, seed=1, files=4)
    data = FusedData.open(path)
    assert distinct_splits(path) == ["dev", "test", "train"]
    sizes = data.split_sizes()
    assert sum(sizes.values()) == 500 and min(sizes.values()) > 0
    assert sum(len(p["y"]) for p in data.batches("validation", list(DIMS))) == sizes["validation"]
    assert sum(n for *_, n in row_groups(path)) == 500
    whole = feature_stats(data.arrays("train", list(DIMS)), list(DIMS))
    streamed = data.input_stats(list(DIMS), max_rows=10 ** 6)
    for m in DIMS:
        np.testing.assert_allclose(streamed[m]["mean"], whole[m]["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(streamed[m]["std"], whole[m]["std"], rtol=1e-5, atol=1e-6)
    assert data.array_bytes("train", ["image"]) == sizes["train"] * (4 * 8 + 1)
