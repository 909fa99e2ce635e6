"""Ray-free unit tier for ingest: the plan and one shard's reader, run in this process.

The Ray wiring (mmbatch.engine.units) only hands these units to actors; what a unit reads, decodes,
quarantines and writes is decided here, and tested without Ray. tests/test_ingest_*.py run the same
through ``run_ingest`` on Ray (slow tier).
"""
from __future__ import annotations

import pyarrow.parquet as pq

from corpora_ingest import imagenet_train, jpeg, write
from mmbatch.engine import storage
from mmbatch.ingest.run import IngestOptions, IngestWorker, plan_ingest, shard_plan


def _corpus(root):
    labels = imagenet_train(root, per_class=3)
    d = root / "train" / "n01000001"
    write(d / "zero.JPEG", b"")                                   # read time: empty file
    write(d / "text.JPEG", "this is not an image\n")             # read time: not an image
    full = jpeg(seed=77, w=320, h=240)
    write(d / "truncated.JPEG", full[: len(full) // 2])          # header intact: kept as bytes
    write(root / "train" / "loose.JPEG", jpeg(seed=8))            # planning: no class folder
    return labels


def test_the_plan_is_a_function_of_the_data_and_options_only(tmp_path):
    _corpus(tmp_path / "in")
    out = str(tmp_path / "out")
    plan, samples, problems = plan_ingest("imagenet", str(tmp_path / "in"), out, IngestOptions())
    again = plan_ingest("imagenet", str(tmp_path / "in"), out, IngestOptions())
    shards, shards_again = shard_plan(plan, samples, IngestOptions()), shard_plan(*again[:2], IngestOptions())
    assert [(t.shard_id, t.fingerprint) for t in shards] == [(t.shard_id, t.fingerprint) for t in shards_again]
    assert sum(len(t.samples) for t in shards) == len(samples)
    assert [(p.sample_id, p.reason) for p in problems] == [("loose", "missing_label")]
    # another content option is another fingerprint for every shard
    other = shard_plan(plan, samples, IngestOptions(max_file_mb=1))
    assert not {t.fingerprint for t in shards} & {t.fingerprint for t in other}
    # more rows per shard: another plan, still covering every sample once
    one = shard_plan(plan, samples, IngestOptions(shard_rows=len(samples)))
    assert sorted(s.sample_id for t in one for s in t.samples) == sorted(s.sample_id for s in samples)


def test_one_shard_read_in_process_writes_rows_and_quarantines_with_reasons(tmp_path):
    labels = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    plan, samples, problems = plan_ingest("imagenet", str(tmp_path / "in"), str(out), IngestOptions())
    ctx = {"kind": "imagenet", "uri": plan.uri, "root": plan.root, "out": str(out),
           "options": IngestOptions().content_options(), "info": plan.info}
    worker = IngestWorker(ctx)
    records = [worker(t) for t in shard_plan(plan, samples, IngestOptions())]

    assert sum(r.rows_in for r in records) == len(samples)
    assert sum(r.rows + r.quarantined for r in records) == len(samples)      # counts reconcile
    reasons = {k: v for r in records for k, v in r.reasons.items()}
    assert reasons == {"not_an_image": 1, "empty_file": 1}
    rows = {}
    for r in records:
        assert all(f == f"{r.unit}.parquet" or f == f"{storage.QUARANTINE_DIR}/{r.unit}.parquet" for f in r.files)
        for row in pq.read_table(str(out / f"{r.unit}.parquet")).to_pylist():
            rows[row["sample_id"]] = row
    assert set(rows) == set(labels) | {"truncated"}
    for sid, wnid in labels.items():
        assert rows[sid]["wnid"] == wnid
        assert rows[sid]["image"]["bytes"] == (tmp_path / "in" / rows[sid]["image"]["path"]).read_bytes()
    q = pq.read_table(str(out / storage.QUARANTINE_DIR)).to_pylist()
    assert sorted((x["sample_id"], x["reason"]) for x in q) == [("text", "not_an_image"), ("zero", "empty_file")]
    assert all(x["detail"] and x["stage"] == "ingest" for x in q)
