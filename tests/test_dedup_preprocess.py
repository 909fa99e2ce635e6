"""Preprocess `dedup: {leakage: ...}` on a real local Ray: counts in the summary and manifest,
quarantine with the reason and reconciling counts, fingerprints, and `mmbatch inspect`."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks import dedup_corpus as tc
from mmbatch.config import workflow_from_dict
from mmbatch.preprocess import run_preprocess
from mmbatch.schema import CANONICAL, with_metadata

WORDS = tc.WORDS


def corpus_rows() -> list[dict]:
    """14 train/validation rows (image + text) and 4 test rows: t0 is an exact image copy of r0,
    t1 a resized (x0.75) JPEG of r1 with its text re-cased, t2 and t3 look-alikes of r2 with new texts."""
    rng = np.random.default_rng(0)
    ims = [tc.draw_object(i % 4, i % 3, i % 9, rng) for i in range(14)]
    rows = []
    for i, im in enumerate(ims):
        text = " ".join(rng.choice(WORDS, size=10, replace=False))
        rows.append({"sample_id": f"r{i}", "source": "manifest", "split": "validation" if i >= 12 else "train",
                     "label": i % 2, "image": {"bytes": tc.encode_image(im), "path": f"r{i}.png"}, "text": text})
    tests = [(rows[0]["image"]["bytes"], " ".join(rng.choice(WORDS, size=10, replace=False))),
             (tc.transform_image(ims[1], "resize075"), rows[1]["text"].upper() + "!"),
             (tc.encode_image(tc.draw_object(2, 2, 4, rng)), " ".join(rng.choice(WORDS, size=10, replace=False))),
             (tc.encode_image(tc.draw_object(2, 2, 6, rng)), " ".join(rng.choice(WORDS, size=10, replace=False)))]
    for k, (img, text) in enumerate(tests):
        rows.append({"sample_id": f"t{k}", "source": "manifest", "split": "test", "label": k % 2,
                     "image": {"bytes": img, "path": f"t{k}.png"}, "text": text})
    return rows


def write_shard(path, rows, **kw) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=with_metadata(CANONICAL)), path, **kw)


@pytest.fixture(scope="module")
def canon(tmp_path_factory):
    root = tmp_path_factory.mktemp("canon") / "ds"
    root.mkdir()
    write_shard(root / "part-00000.parquet", corpus_rows())
    (root / "_manifest.json").write_text("{}")
    return root


def workflow(canon, out, leakage: str) -> dict:
    return {"datasets": [{"name": "ds", "path": str(canon)}], "features": {"image": {"size": 32}},
            "output": {"path": str(out)}, "dedup": {"leakage": leakage}}


def test_leakage_report_then_quarantine(ray_session, canon, tmp_path, capsys):
    out = tmp_path / "out"
    off = run_preprocess(workflow_from_dict(workflow(canon, out, "off")), progress=False)
    assert off.leakage == {} and "leakage" not in json.loads((out / "_manifest.json").read_text())
    assert off.rows_out == 18 and off.quarantined == 0

    rep = run_preprocess(workflow_from_dict(workflow(canon, out, "report")), progress=False)
    want = {"validation": {}, "test": {"image": 2, "text": 1}}
    assert rep.leakage["rows_duplicating_train"] == want
    assert rep.shards_processed == 0 and rep.quarantined == 0       # report changes no unit's output
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["leakage"]["rows_duplicating_train"] == want and manifest["leakage"]["mode"] == "report"

    q = run_preprocess(workflow_from_dict(workflow(canon, out, "quarantine")), progress=False)
    assert q.shards_processed == 1 and q.quarantined == 2 and q.rows_out == 16 and q.reconciles
    reasons = {r["sample_id"]: r["reason"] for r in pq.read_table(str(out / "quarantine")).to_pylist()}
    assert reasons == {"t0": "duplicate_of_train:image:r0", "t1": "duplicate_of_train:image:r1"}
    fused = pq.read_table(str(out / "ds--part-00000-rg000.parquet"), columns=["sample_id"]).column(0).to_pylist()
    assert {"t0", "t1"}.isdisjoint(fused) and {"t2", "t3"} <= set(fused)
    again = run_preprocess(workflow_from_dict(workflow(canon, out, "quarantine")), progress=False)
    assert again.shards_processed == 0 and again.quarantined == 2     # cached result, same fingerprints

    from mmbatch.cli import main
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert ("rows duplicating a train row: validation none; test image 2, text 1 "
            "(dedup.leakage: quarantine, 2 quarantined)") in text

    # the training report shows the figures of the fused data it trained on
    from mmbatch.train import report
    leak = json.loads((out / "_manifest.json").read_text())["leakage"]
    summary = {"title": "t", "leakage": leak, "metrics": {}, "baselines": {}}
    assert "test image 2, text 1" in report.summary_table(summary)
    assert "Duplicates of train rows" in report.render_html(summary, {})


def test_quarantine_redoes_only_the_units_whose_exclusions_change(ray_session, tmp_path):
    """Train rows in one shard; test rows in another, t0 (copy of r0) and t1 (copy of r1) in
    different row groups (units). Switching to quarantine redoes the two units with an excluded
    row; editing r1 so that t1 no longer duplicates it redoes r1's unit (its input changed) and
    t1's unit, and not t0's."""
    rows = corpus_rows()
    train, tests = rows[:14], [rows[i] for i in (14, 16, 15, 17)]        # row groups {t0, t2}, {t1, t3}
    root = tmp_path / "ds"
    root.mkdir()
    write_shard(root / "part-00000.parquet", train)
    write_shard(root / "part-00001.parquet", tests, row_group_size=2)
    (root / "_manifest.json").write_text("{}")
    out = tmp_path / "out"
    off = run_preprocess(workflow_from_dict(workflow(root, out, "off")), progress=False)
    assert off.shards_processed == 3 and off.quarantined == 0
    q = run_preprocess(workflow_from_dict(workflow(root, out, "quarantine")), progress=False)
    assert q.shards_processed == 2 and q.shards_skipped == 1 and q.quarantined == 2 and q.reconciles

    def fps():
        return json.loads((out / "_manifest.json").read_text())["unit_fingerprints"]

    before = fps()
    rng = np.random.default_rng(7)
    train[1] = {**train[1], "image": {"bytes": tc.encode_image(tc.draw_object(3, 1, 5, rng)), "path": "r1.png"},
                "text": " ".join(rng.choice(WORDS, size=10, replace=False))}
    write_shard(root / "part-00000.parquet", train)
    again = run_preprocess(workflow_from_dict(workflow(root, out, "quarantine")), progress=False)
    assert again.shards_processed == 2 and again.shards_skipped == 1 and again.quarantined == 1
    reasons = {r["sample_id"]: r["reason"] for r in pq.read_table(str(out / "quarantine")).to_pylist()}
    assert reasons == {"t0": "duplicate_of_train:image:r0"}
    after = fps()
    changed = {f for f in before if before[f] != after.get(f)}
    assert changed == {"ds--part-00000-rg000.parquet", "ds--part-00001-rg001.parquet"}
