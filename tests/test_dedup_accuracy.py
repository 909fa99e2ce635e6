"""`mmbatch duplicates` on a generated corpus with planted duplicates of every kind and
look-alike negatives (benchmarks/dedup_corpus.py), on the real local Ray: recall >= 0.95 near and
1.0 exact per modality, rows in false pairs <= 1 %, and outputs that agree with the pairs."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from benchmarks import dedup_corpus as tc
from mmbatch.cli import main
from mmbatch.dedup.run import PAIR_SCHEMA


@pytest.fixture(scope="module")
def found(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    corpus = tc.build_corpus(root / "corpus", images=32, audio=12, texts=40)
    out = root / "dups"
    assert main(["duplicates", corpus.paths["alpha"], corpus.paths["beta"], "--out", str(out)]) == 0
    return corpus, out, pq.read_table(str(out / "pairs.parquet"))


def test_recall_and_false_pairs(found):
    corpus, _, pairs = found
    s = tc.score(corpus, pairs)
    for m, r in s["modalities"].items():
        assert r["exact_pairs"] > 0 and r["near_pairs"] > 0, m
        assert r["exact_recall"] == 1.0, (m, r["exact_missed"])
        assert r["near_recall"] >= 0.95, (m, r["near_missed"])
    assert s["false_row_fraction"] <= 0.01, {m: r["false"] for m, r in s["modalities"].items()}
    # every transformation the issue lists is among the planted copies, and so are look-alikes
    kinds = set(corpus.kinds.values())
    assert set(tc.IMAGE_TRANSFORMS) <= kinds and set(tc.AUDIO_TRANSFORMS) <= kinds
    assert {"lookalike", "exact", "short-edit"} <= kinds


def test_outputs(found):
    corpus, out, pairs = found
    assert pairs.schema.equals(PAIR_SCHEMA)
    assert set(pairs.column("kind").to_pylist()) == {"exact", "near"}
    assert all(0.0 < s <= 1.0 for s in pairs.column("similarity").to_pylist())
    summary = json.loads((out / "summary.json").read_text())
    recs = pairs.to_pylist()
    for m in ("image", "audio", "text"):
        mine = [r for r in recs if r["modality"] == m]
        got = summary["modalities"][m]
        assert got["pairs"] == len(mine) and got["exact"] + got["near"] == len(mine)
        tests = {(r["b_dataset"], r["b_sample_id"]) for r in mine if r["a_split"] == "train" and r["b_split"] == "test"}
        assert got["test_rows_with_train_duplicate"] == len(tests) > 0
        assert summary["leakage"]["test"][m] == len(tests)
        assert sum(v["pairs"] for v in got["split_pairs"].values()) == len(mine)
    # the truth: every copy in a test split descends from a train original
    want = {(d, s) for (d, s, m), o in corpus.origin.items() if m == "image" and "-near" in s}
    assert want <= {(r["b_dataset"], r["b_sample_id"]) for r in recs if r["modality"] == "image"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 * 12 + 2 * 12     # image thumbnails + spectrograms
    assert "Top text pairs" in html
