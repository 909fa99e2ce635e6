"""The types of the preprocess unit and of the commit protocol (issue #32, "types, not flags"), without Ray:
the two unit job types (their fingerprints, what each writes), the commit record and its stage
extension (markers of older versions), and the sink that writes and commits a unit."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmbatch.engine import storage
from mmbatch.engine.commit import CommitRecord, UnitSink
from mmbatch.preprocess.plan import META_COLS, Unit
from mmbatch.preprocess.unit import FusedUnitJob, PartnerFeaturesJob, PreprocessRecord, UnitJob, UnitWorker
from mmbatch.schema import QUARANTINE, fused_schema, has_column, quarantine_row


class _Partner:
    fingerprint = "partner-fp"


def _jobs() -> tuple[PartnerFeaturesJob, FusedUnitJob]:
    schema = pa.schema([pa.field("sample_id", pa.string()), pa.field("has_image", pa.bool_())], metadata={b"k": b"v"})
    common = dict(dataset="images", out_uri="/x/out", columns=["sample_id", "image"],
                  specs={"image": {"extractor": "hog", "size": 32}}, modalities=["image"], dims={"image": 8, "text": 4},
                  schema=schema, label_map={"column": "speaker", "mapping": {"a": 0, "b": 1}},
                  completions=[{"kind": "ocr"}], row_group_size=100, batch_size=16,
                  features={"image": {"name": "hog", "dim": 8}})
    features = PartnerFeaturesJob(out_rel="_features/images", **common)
    fused = FusedUnitJob(out_rel="", keep_splits=["train"], split_plan={"train": 0.8}, split_seed=3,
                         fusion={"method": "concat"}, pairing={"by": "label"}, partners=[_Partner()],
                         exclude={"s1": "dup"}, **common)
    return features, fused


def test_job_types_keep_the_fingerprints_of_the_one_class_with_a_role_flag():
    """Digests computed with the UnitJob of a57c0bc (one class, ``role`` a field, ``shape`` and ``devices``
    written into it): units committed by that version are not redone."""
    features, fused = _jobs()
    got = {(job.role, m): storage.fingerprint(job.fingerprint(m)) for job in (features, fused) for m in (False, True)}
    assert got == {("features", False): "1fd96e2b99edc921", ("features", True): "54116ae161b6a38f",
                   ("fused", False): "60b60b24f537b38f", ("fused", True): "01f89433f3363493"}


def test_what_a_job_fingerprints():
    features, fused = _jobs()
    base = storage.fingerprint(fused.fingerprint(True))
    fused.exclude, fused.out_uri = {"s2": "other"}, "/elsewhere"          # each unit's fingerprint has its own rows
    assert storage.fingerprint(fused.fingerprint(True)) == base
    fused.row_group_size = 7                                              # a field nobody lists by hand
    assert storage.fingerprint(fused.fingerprint(True)) != base
    assert "exclude" not in fused.fingerprint(True) and "batch_size" not in fused.fingerprint(False)
    assert not hasattr(features, "partners") and not hasattr(fused, "shape") and not hasattr(fused, "devices")
    with pytest.raises(TypeError):
        UnitJob(**{k: getattr(features, k) for k in ("dataset", "out_uri", "out_rel", "columns", "specs",
                                                     "modalities", "dims", "schema")})   # no output of its own


# --- the worker with each job type, on a real canonical row group --------------------------------------
TEXT_SPEC = {"extractor": "hashing", "max_tokens": 32, "vocab_size": 10000, "min_count": 1, "vocabulary": None,
             "dim": 16, "ngram_range": [1, 2], "model_path": None, "batch_size": 64, "precision": "fp32",
             "num_gpus": None}
FUSION = {"method": "concat", "dim": 16, "weights": {"image": 1.0, "audio": 1.0, "text": 1.0}, "seed": 0}


@pytest.fixture
def canonical(tmp_path) -> Unit:
    """Six text rows, two per split, one of them with no text."""
    t = pa.table({"sample_id": [f"s{i}" for i in range(6)], "source": ["manifest"] * 6,
                  "split": ["train", "train", "validation", "validation", "test", "test"],
                  "label": [0, 1, 0, 1, 0, 1], "label_name": ["a", "b", "a", "b", "a", "b"],
                  "text": ["red fox", "blue whale", None, "grey wolf", "red deer", "blue jay"]},
                 schema=pa.schema([pa.field("sample_id", pa.string()), pa.field("source", pa.string()),
                                   pa.field("split", pa.string()), pa.field("label", pa.int64()),
                                   pa.field("label_name", pa.string()), pa.field("text", pa.string())]))
    path = tmp_path / "canon" / "part-00000.parquet"
    path.parent.mkdir()
    pq.write_table(t, path)
    return Unit("texts--part-00000-rg000", str(path), 0, 6, "unit-fp")


def _common(out) -> dict:
    return dict(dataset="texts", out_uri=str(out), columns=[*META_COLS, "text"], specs={"text": TEXT_SPEC},
                modalities=["text"], dims={"text": 16}, row_group_size=4096)


def test_a_fused_job_filters_splits_and_fuses_and_a_features_job_keeps_every_row(canonical, tmp_path):
    fused_job = FusedUnitJob(out_rel="", schema=fused_schema({"text": 16}, 16), keep_splits=["train", "test"],
                             fusion=FUSION, exclude={"s4": "leak:test_duplicates_train"}, **_common(tmp_path / "f"))
    rec = UnitWorker(fused_job)(canonical)
    assert isinstance(rec, PreprocessRecord) and (rec.shape, rec.devices) == ("fused", {"text": "cpu"})
    assert (rec.rows_in, rec.rows, rec.quarantined, rec.dropped) == (6, 3, 1, 2)      # validation left out
    assert rec.files == [f"{canonical.id}.parquet"] and rec.quarantine_file == f"quarantine/{canonical.id}.parquet"
    out = pq.read_table(tmp_path / "f" / rec.files[0])
    assert out.column("sample_id").to_pylist() == ["s0", "s1", "s5"] and "fused" in out.column_names
    assert pq.read_table(tmp_path / "f" / rec.quarantine_file).column("reason").to_pylist() == [
        "leak:test_duplicates_train"]

    feats_schema = pa.schema([fused_schema({}, 0).field(c) for c in META_COLS] +
                             [fused_schema({"text": 16}, 16).field("text_emb"),
                              pa.field(has_column("text"), pa.bool_())])
    features_job = PartnerFeaturesJob(out_rel="_features/texts", schema=feats_schema, **_common(tmp_path / "p"))
    rec = UnitWorker(features_job)(canonical)
    assert (rec.rows_in, rec.rows, rec.quarantined, rec.dropped, rec.quarantine_file) == (6, 6, 0, 0, None)
    out = pq.read_table(tmp_path / "p" / rec.files[0])
    assert out.column_names == [*META_COLS, "text_emb", "has_text"] and out.column("has_text").to_pylist() == [
        True, True, False, True, True, True]
    np.testing.assert_array_equal(                  # the same embeddings as the fused job's, row for row
        np.array(out.column("text_emb").to_pylist()[0]),
        np.array(pq.read_table(tmp_path / "f" / f"{canonical.id}.parquet").column("text_emb").to_pylist()[0]))


def test_the_split_shape_is_the_workers_not_the_jobs(canonical, tmp_path):
    """The decode and embed workers of the split shape record "split"; the job itself has no shape."""
    job = FusedUnitJob(out_rel="", schema=fused_schema({"text": 16}, 16), fusion=FUSION, **_common(tmp_path))
    state = UnitWorker(job, "split", models=False).prepare(canonical)
    rec = UnitWorker(job, "split").finish(state)
    assert rec.shape == "split" and rec.rows == 6
    assert UnitWorker(job)(canonical).shape == "fused"


# --- the record and the sink -------------------------------------------------------------------------------
def test_markers_of_older_versions_read_as_the_current_records():
    old = {"unit": "u", "fingerprint": "fp", "input": "x#rg0", "files": ["u.parquet"], "rows_in": 3, "rows": 3,
           "quarantined": 0, "dropped": 0, "quarantine_file": None, "reasons": {}, "counts": {}, "seconds": {},
           "devices": {"image": "cpu"}, "node": "n1", "shape": "fused", "actors": {}}
    base = CommitRecord.from_marker(old)                 # an ingest marker from before the split (devices, shape)
    assert type(base) is CommitRecord and (base.unit, base.rows, base.node) == ("u", 3, "n1")
    assert set(base.to_marker()) == set(old) - {"devices", "shape"}
    rec = PreprocessRecord.from_marker(old)
    assert (rec.devices, rec.shape) == ({"image": "cpu"}, "fused") and rec.to_marker() == old
    oldest = {k: old[k] for k in ("unit", "fingerprint", "input", "files", "rows_in", "rows")}   # no later keys
    assert PreprocessRecord.from_marker({**oldest, "future_key": 1}).to_marker() == {
        **PreprocessRecord("u", "fp", "x#rg0").to_marker(), **oldest}


def test_the_sink_writes_on_the_worker_and_commits_on_the_driver(tmp_path):
    fs, out = storage.url_to_fs(str(tmp_path / "out"))
    sink = UnitSink(fs, out, PreprocessRecord)
    assert sink.on_write_start(["u1"], data_dirs=("", storage.QUARANTINE_DIR)) == []
    table = pa.table({"x": [1, 2, 3]})
    bad = pa.Table.from_pylist([quarantine_row("text:empty", sample_id="s9", source="t", stage="preprocess")],
                               schema=QUARANTINE)
    assert sink.write("u1", table, bad, row_group_size=2) == ("u1.parquet", "quarantine/u1.parquet")
    assert pq.ParquetFile(tmp_path / "out" / "u1.parquet").metadata.num_row_groups == 2
    assert sink.committed("u1", "fp1") is None                          # written, not yet committed
    rec = PreprocessRecord("u1", "fp1", "in#rg0", files=["u1.parquet"], rows_in=4, rows=3, quarantined=1,
                           quarantine_file="quarantine/u1.parquet", shape="split", devices={"image": "gpu"})
    sink.on_write_complete(rec)
    assert json.loads((tmp_path / "out" / "_shards" / "u1.json").read_text()) == rec.to_marker()
    assert sink.committed("u1", "fp1") == rec and sink.committed("u1", "fp2") is None
    # rewritten without quarantined rows: the stale quarantine file goes
    assert sink.write("u1", table, QUARANTINE.empty_table()) == ("u1.parquet", None)
    assert not (tmp_path / "out" / "quarantine" / "u1.parquet").exists()
    # a unit written by a killed run (no marker) is removed by the next run's start
    sink.write("u2", table)
    assert sink.on_write_start(["u1", "u2"]) == ["u2.parquet"]
