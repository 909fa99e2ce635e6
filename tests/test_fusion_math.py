"""Ray-free unit tier: fusion math, the Arrow <-> NumPy embedding conversion and unit fingerprints.

These are pure functions; the Ray tests (slow tier) check that preprocess writes what they compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pytest

from mmbatch.engine.provenance import job_fingerprint
from mmbatch.preprocess.fusion import (embeddings_to_arrow, embeddings_to_numpy, fuse, fused_dim, projection,
                                       stable_u64)

DIMS = {"image": 3, "audio": 2, "text": 4}


def _embs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((n, d)).astype(np.float32) for m, d in DIMS.items()}


def test_concat_puts_modalities_side_by_side_in_schema_order_and_zeroes_absent_ones():
    embs = _embs(3)
    present = {"image": np.array([True, True, False]), "audio": np.array([True, False, True]),
               "text": np.array([True, True, True])}
    out = fuse(embs, present, DIMS, method="concat")
    assert out.shape == (3, fused_dim("concat", DIMS, 256)) == (3, 9)
    # image | audio | text, whatever order the dicts were given in
    np.testing.assert_array_equal(out[0], np.concatenate([embs["image"][0], embs["audio"][0], embs["text"][0]]))
    np.testing.assert_array_equal(out[2, :3], 0.0)             # image absent in row 2
    np.testing.assert_array_equal(out[1, 3:5], 0.0)            # audio absent in row 1
    np.testing.assert_array_equal(out[2, 3:5], embs["audio"][2])
    assert embs["image"][2].any()                               # the input itself is not modified
    # a modality the run has but this dataset lacks (no embedding at all) is zeros
    no_text = fuse({"image": embs["image"], "audio": embs["audio"]}, {k: present[k] for k in ("image", "audio")},
                   DIMS, method="concat")
    np.testing.assert_array_equal(no_text[:, 5:], 0.0)


def test_weighted_fusion_is_the_sum_of_weighted_projections_over_present_modalities():
    embs = _embs(4, seed=1)
    present = {m: np.array([True, True, False, True]) for m in DIMS}
    present["text"] = np.array([False, True, True, True])
    w = {"image": 0.5, "audio": 2.0, "text": 1.0}
    out = fuse(embs, present, DIMS, method="weighted", dim=5, weights=w, seed=7)
    want = np.zeros((4, 5), np.float32)
    for m, d in DIMS.items():
        p = projection(m, d, 5, 7)
        assert p.shape == (d, 5)
        want += w[m] * np.where(present[m][:, None], embs[m] @ p, 0.0)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    assert fused_dim("weighted", DIMS, 5) == 5
    # the projection is a function of (modality, sizes, seed) only: the same on every worker and run
    np.testing.assert_array_equal(projection("image", 3, 5, 7), projection("image", 3, 5, 7))
    assert not np.array_equal(projection("image", 3, 5, 7), projection("image", 3, 5, 8))
    assert stable_u64("a", 1) == stable_u64("a", 1) != stable_u64("a", 2)


def test_unknown_fusion_method_names_the_allowed_values():
    with pytest.raises(ValueError, match="'concat' or 'weighted'"):
        fuse(_embs(1), {m: np.array([True]) for m in DIMS}, DIMS, method="sum")


def test_embeddings_round_trip_through_arrow_with_nulls_as_zeros_and_nans_kept():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    x[1, 2] = np.nan
    present = np.array([True, True, False, True])
    arr = embeddings_to_arrow(x, present)
    assert pa.types.is_fixed_size_list(arr.type) and arr.type.list_size == 3
    assert arr.null_count == 1 and arr[2].as_py() is None
    back = embeddings_to_numpy(arr, 3)
    assert back.dtype == np.float32 and back.flags.writeable
    np.testing.assert_array_equal(back[[0, 3]], x[[0, 3]])
    assert np.isnan(back[1, 2]) and back[1, 0] == x[1, 0]     # NaN stays NaN
    np.testing.assert_array_equal(back[2], 0.0)                  # null -> zeros
    # a sliced, chunked column and a variable-size list column read the same
    chunked = pa.chunked_array([arr.slice(0, 1), arr.slice(1)])
    np.testing.assert_array_equal(np.nan_to_num(embeddings_to_numpy(chunked, 3)), np.nan_to_num(back))
    as_list = pa.array([[1.0, 2.0], [3.0, 4.0]], type=pa.list_(pa.float32()))
    np.testing.assert_array_equal(embeddings_to_numpy(as_list, 2), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(embeddings_to_numpy(arr.slice(3, 1), 3), x[[3]])


@dataclass
class _Job:
    dataset: str
    out_uri: str = field(default="", metadata={"fingerprint": False})
    batch_size: int = field(default=64, metadata={"fingerprint": "model"})
    specs: dict = field(default_factory=dict)
    schema: pa.Schema = field(default_factory=lambda: pa.schema([("x", pa.int64())]))


def test_a_unit_fingerprint_holds_what_changes_the_output_and_nothing_else():
    base = job_fingerprint(_Job("a", specs={"image": {"extractor": "hog"}}), uses_model=False)
    assert "out_uri" not in base and "batch_size" not in base     # where it goes; a model-free batch size
    assert base == job_fingerprint(_Job("a", out_uri="s3://elsewhere", batch_size=8,
                                        specs={"image": {"extractor": "hog"}}), uses_model=False)
    assert base != job_fingerprint(_Job("a", specs={"image": {"extractor": "cnn"}}), uses_model=False)
    assert base != job_fingerprint(_Job("a", specs={"image": {"extractor": "hog"}},
                                        schema=pa.schema([("x", pa.int32())])), uses_model=False)
    with_model = job_fingerprint(_Job("a", batch_size=8), uses_model=True)
    assert with_model["batch_size"] == 8                            # a model's batch size changes its bits
    assert with_model != job_fingerprint(_Job("a", batch_size=16), uses_model=True)


def test_a_value_that_cannot_be_fingerprinted_names_the_way_out():
    @dataclass
    class Bad:
        thing: object

    with pytest.raises(TypeError, match="fingerprint"):
        job_fingerprint(Bad(object()), uses_model=False)
