"""mmbatch.engine.manifest: the one manifest format (round trip), the older formats it still reads, and
data_files on a folder built with pyarrow. No Ray."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmbatch.engine import storage
from mmbatch.errors import UsageError
from mmbatch.engine.manifest import Manifest, data_files

INGEST = Manifest(
    stage="ingest", kind="imagenet", files=["part-00000.parquet", "part-00001.parquet"],
    counts={"split": {"train": 6, "validation": 3}, "label": {"0": 5, "1": 4},
            "quarantine_reasons": {"decode_error": 1}, "skipped_non_core": 2},
    extra={"input": "/data/in", "rows_in": 10, "ingested": 9, "quarantined": 1,
           "quarantine_files": ["quarantine/planning.parquet"], "info": {"classes": ["n1", "n2"]}})

PREPROCESS = Manifest(
    stage="preprocess", kind="fused", files=["a--part-00000.parquet"],
    counts={"split": {"train": 4}, "label": {"1": 4}, "presence": {"image": 4},
            "quarantine_reasons": {"image_decode": 2}},
    metadata={"kind": "fused", "splits_final": True},
    extra={"rows": 4, "rows_in": 6, "quarantined": 2, "unit_fingerprints": {"a--part-00000.parquet": "f1"},
           "leakage": {"validation": {"image": 1}}})


def write(path, obj) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "_manifest.json").write_text(json.dumps(obj))


@pytest.mark.parametrize("manifest", [INGEST, PREPROCESS], ids=["ingest", "preprocess"])
def test_write_then_read_gives_the_same_manifest(tmp_path, manifest):
    fs, root = storage.url_to_fs(str(tmp_path))
    manifest.write(fs, root)
    got = Manifest.read(str(tmp_path))
    assert got == manifest
    on_disk = json.loads((tmp_path / "_manifest.json").read_text())
    assert on_disk["stage"] == manifest.stage and on_disk["files"] == manifest.files
    assert on_disk["counts"]["split"] == manifest.counts["split"] and "splits" not in on_disk["counts"]
    assert "quarantine_reasons" not in on_disk              # only under counts
    assert got.get("leakage") == manifest.extra.get("leakage")


def test_an_older_ingest_manifest_reads_as_the_current_format(tmp_path):
    write(tmp_path, {                                       # as ingest wrote it before mmbatch.engine.manifest
        "stage": "ingest", "kind": "imagenet", "input": "/data/in",
        "rows_in": 10, "ingested": 9, "quarantined": 1,
        "counts": {"splits": {"train": 6, "validation": 3}, "labels": {"0": 5, "1": 4},
                   "quarantine_reasons": {"decode_error": 1}, "skipped_non_core": 2},
        "files": ["part-00000.parquet", "part-00001.parquet"],
        "quarantine_files": ["quarantine/planning.parquet"], "info": {"classes": ["n1", "n2"]}})
    assert Manifest.read(str(tmp_path)) == INGEST


def test_an_older_preprocess_manifest_reads_as_the_current_format(tmp_path):
    write(tmp_path, {                                       # as preprocess wrote it before mmbatch.engine.manifest
        "kind": "fused", "rows": 4, "rows_in": 6, "quarantined": 2,
        "quarantine_reasons": {"image_decode": 2},
        "counts": {"split": {"train": 4}, "label": {"1": 4}, "presence": {"image": 4}},
        "files": ["a--part-00000.parquet"], "unit_fingerprints": {"a--part-00000.parquet": "f1"},
        "metadata": {"kind": "fused", "splits_final": True}, "leakage": {"validation": {"image": 1}}})
    assert Manifest.read(str(tmp_path)) == PREPROCESS


def test_no_manifest_or_not_a_json_object_reads_as_none(tmp_path):
    assert Manifest.read(str(tmp_path)) is None
    (tmp_path / "_manifest.json").write_text("[1, 2]")
    assert Manifest.read(str(tmp_path)) is None
    with pytest.raises(ValueError, match="stage"):
        Manifest(stage="train", kind="x", files=[]).write(*storage.url_to_fs(str(tmp_path)))


@pytest.fixture
def folder(tmp_path):
    """A fused-like output folder: two data files, a quarantine file, partner features under _features/,
    a temp file; no manifest yet."""
    table = pa.table({"sample_id": ["a", "b"]})
    for rel in ("p-0.parquet", "p-1.parquet", "quarantine/p-0.parquet", "_features/ds/p-0.parquet",
                "_tmp/x.p-2.parquet"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / rel)
    return tmp_path


def names(files: list[str]) -> list[str]:
    return [f.rsplit("/", 1)[-1] for f in files]


def test_data_files_refuses_a_folder_without_a_manifest_unless_allowed(folder):
    with pytest.raises(UsageError, match="_manifest.json.*incomplete"):
        data_files(str(folder))
    _, files, manifest = data_files(str(folder), allow_incomplete=True)
    assert names(files) == ["p-0.parquet", "p-1.parquet"] and manifest is None     # no quarantine, _features, _tmp


def test_data_files_are_the_ones_the_manifest_names(folder):
    Manifest(stage="preprocess", kind="fused", files=["p-1.parquet"]).write(*storage.url_to_fs(str(folder)))
    fs, files, manifest = data_files(str(folder))
    assert files == [storage.join(storage.url_to_fs(str(folder))[1], "p-1.parquet")] and manifest.kind == "fused"
    assert pq.read_table(files[0], filesystem=fs).num_rows == 2
    _, on_disk, _ = data_files(str(folder), allow_incomplete=True)                  # what is committed
    assert names(on_disk) == ["p-0.parquet", "p-1.parquet"]


def test_a_manifest_naming_no_files_means_the_files_on_disk(folder):
    (folder / "_manifest.json").write_text("{}")                                    # written by hand
    _, files, manifest = data_files(str(folder))
    assert names(files) == ["p-0.parquet", "p-1.parquet"] and manifest.stage == "ingest" and manifest.files is None


def test_a_single_file_is_its_own_data_file(folder):
    _, files, manifest = data_files(str(folder / "p-0.parquet"))
    assert names(files) == ["p-0.parquet"] and manifest is None
