"""mmbatch deletes and overwrites only what it wrote (docs/data-safety.md): outputs that overlap inputs
are refused, a folder with foreign files is refused, markers cannot point cleanup elsewhere, names are
plain names, HF media paths cannot leave their root."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from corpora_ingest import imagenet_train, jpeg, read_quarantine, read_rows, write
from mmbatch.engine import ownership, storage
from mmbatch.cli import main
from mmbatch.config import WorkflowError, workflow_from_dict
from mmbatch.errors import UsageError
from mmbatch.ingest.run import IngestOptions, run_ingest


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> the SHA-256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def user_parquet(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    return path


@pytest.fixture(scope="module")
def canonical(ray_session, tmp_path_factory):
    """A small ImageNet-style corpus and its ingested canonical folder (3 units of 2 rows)."""
    base = tmp_path_factory.mktemp("safety")
    imagenet_train(base / "corpus", per_class=2)
    out = base / "canonical"
    s = run_ingest("imagenet", str(base / "corpus"), str(out), IngestOptions(shard_rows=2), echo=False)
    assert s.ingested == 6 and s.shards_total == 3
    return base


def write_workflow(path: Path, dataset: Path, output: Path, **extra) -> str:
    wf = {"name": "safety", "datasets": [{"name": "images", "path": str(dataset)}],
          "features": {"image": {"extractor": "hog", "size": 32}}, "output": {"path": str(output)}, **extra}
    path.write_text(yaml.safe_dump(wf))
    return str(path)


# --- outputs never overlap inputs ---------------------------------------------------------------
def test_preprocess_into_its_own_input_is_refused_and_the_input_is_untouched(canonical, capsys):
    """The reported case: `--set output.path=DIR` equal to the dataset deleted the dataset."""
    ds = canonical / "canonical"
    before = tree(ds)
    wf = write_workflow(canonical / "wf.yaml", ds, canonical / "unused")
    code = main(["preprocess", wf, "--set", f"datasets.0.path={ds}", "--set", f"output.path={ds}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "output.path" in err[0] and "datasets.0.path" in err[0], err
    assert tree(ds) == before
    # the same folder spelled another way (a trailing slash, a `..` detour, a symlink) is the same folder
    os.symlink(ds, canonical / "link")
    for spelled in (f"{ds}/", f"{ds}/../canonical", str(canonical / "link"), f"{ds}/sub"):
        assert main(["preprocess", wf, "--set", f"output.path={spelled}"]) == 2, spelled
    assert main(["preprocess", wf, "--set", f"output.path={canonical}"]) == 2      # holds the input
    assert tree(ds) == before and not (ds / "sub").exists()


def test_every_command_refuses_an_output_overlapping_an_input(canonical, tmp_path, capsys):
    ds = canonical / "canonical"
    before = tree(ds)
    corpus = canonical / "corpus"
    corpus_before = tree(corpus)
    assert main(["ingest", "imagenet", str(corpus), "--out", str(corpus)]) == 2
    assert main(["ingest", "imagenet", str(corpus), "--out", str(corpus / "train" / "out")]) == 2
    assert main(["duplicates", str(ds), "--out", str(ds / "dups")]) == 2
    wf = write_workflow(tmp_path / "wf.yaml", ds, tmp_path / "features")
    assert main(["train", wf, "--set", f"train.out={tmp_path / 'features'}"]) == 2
    assert main(["retrain", wf, "--set", f"retrain.registry={tmp_path / 'features' / 'registry'}"]) == 2
    assert main(["retrain", wf, "--set", f"retrain.registry={ds}"]) == 2
    photo = write(tmp_path / "photo.jpg", jpeg(seed=3))
    photo_bytes = photo.read_bytes()
    assert main(["convert", "image-to-text", str(photo), "--out", str(photo)]) == 2
    assert photo.read_bytes() == photo_bytes
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("mmbatch never writes where it reads") >= 6, err
    assert tree(ds) == before and tree(corpus) == corpus_before
    assert not (tmp_path / "features").exists()


def test_locations_compare_after_normalising():
    loc = ownership.location
    assert loc("s3://b/x/") == loc("s3a://b//x/./") == loc("s3://b/y/../x")
    assert loc("s3://b/x").contains(loc("s3://b/x/y")) and not loc("s3://b/x").contains(loc("s3://b/xy"))
    assert not loc("s3://b/x").contains(loc("gs://b/x/y")) and not loc("s3://b/x").contains(loc("/b/x/y"))
    assert loc("gcs://b/k") == loc("gs://b/k") and loc("file:///tmp/a") == loc("/tmp/a/")
    with pytest.raises(UsageError, match="overlap"):
        ownership.check_disjoint({"a": "s3://b/out", "b": "s3://b/out/reg"}, {})
    ownership.check_disjoint({"a": "s3://b/out", "b": "s3://b/out2"}, {"in": "s3://b/in"})


# --- a folder is mmbatch's before mmbatch cleans it -----------------------------------------------
def test_ingest_refuses_a_folder_with_a_users_own_parquet(canonical, tmp_path, capsys):
    out = tmp_path / "mine"
    user_parquet(out / "train-00000-of-00001.parquet")
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    assert main(["ingest", "imagenet", str(canonical / "corpus"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-00000-of-00001.parquet" in err[0] and "did not write" in err[0], err
    assert tree(out) == before                                    # nothing written, nothing removed


def test_a_folder_owned_as_another_kind_is_refused(canonical, capsys):
    """A canonical folder (not an input here) is no place for fused output."""
    ds = canonical / "canonical"
    before = tree(ds)
    other = canonical / "other-canonical"
    run_ingest("imagenet", str(canonical / "corpus"), str(other), IngestOptions(shard_rows=3), echo=False)
    wf = write_workflow(canonical / "wf2.yaml", ds, other)
    other_before = tree(other)
    assert main(["preprocess", wf]) == 2
    assert "is an mmbatch canonical folder, not a fused folder" in capsys.readouterr().err
    assert tree(other) == other_before and tree(ds) == before
    assert ownership.owner(str(ds))["kind"] == "canonical"


def test_a_legacy_folder_is_adopted_but_not_once_it_holds_a_foreign_file(canonical, tmp_path):
    """An output written before the ownership record (every entry mmbatch's own) is adopted; the same
    folder with one foreign file is refused."""
    out = tmp_path / "legacy"
    corpus = str(canonical / "corpus")
    run_ingest("imagenet", corpus, str(out), IngestOptions(shard_rows=2), echo=False)
    (out / ownership.RECORD).unlink()
    again = run_ingest("imagenet", corpus, str(out), IngestOptions(shard_rows=2), echo=False)
    assert again.shards_skipped == again.shards_total == 3 and ownership.owner(str(out))["kind"] == "canonical"
    (out / ownership.RECORD).unlink()
    user_parquet(out / "extra.parquet")
    with pytest.raises(UsageError, match="extra.parquet"):
        run_ingest("imagenet", corpus, str(out), IngestOptions(shard_rows=2), echo=False)
    assert (out / "extra.parquet").exists() and not (out / ownership.RECORD).exists()


def test_cleanup_in_an_owned_folder_touches_only_its_own_names(canonical, tmp_path):
    """A killed run's unit file (no marker) is rewritten, a unit of the last run's plan that is no longer
    planned is removed, and a file a user put into the owned folder is left alone."""
    out = tmp_path / "owned"
    corpus = str(canonical / "corpus")
    run_ingest("imagenet", corpus, str(out), IngestOptions(shard_rows=2), echo=False)
    markers = sorted((out / storage.SHARDS_DIR).glob("part-*.json"))
    assert len(markers) == 3
    markers[0].unlink()                                     # killed after the worker wrote, before the commit
    user_parquet(out / "my-own.parquet")
    storage.write_plan(storage.url_to_fs(str(out))[0], str(out),
                       [*storage.read_plan(storage.url_to_fs(str(out))[0], str(out)), "part-09999"])
    user_parquet(out / "part-09999.parquet")               # a killed run's unit from an earlier plan
    s = run_ingest("imagenet", corpus, str(out), IngestOptions(shard_rows=2), echo=False)
    assert s.shards_skipped == 2 and s.ingested == 6
    assert (out / "my-own.parquet").exists() and not (out / "part-09999.parquet").exists()
    assert len(read_rows(out)) >= 6


@pytest.mark.parametrize("bad", ["../victim.parquet", "VICTIM_ABS", "sub/../../victim.parquet", "x.txt"])
def test_a_marker_cannot_point_cleanup_outside_its_folder(canonical, tmp_path, bad, caplog):
    out = tmp_path / "owned"
    corpus = str(canonical / "corpus")
    run_ingest("imagenet", corpus, str(out), IngestOptions(shard_rows=2), echo=False)
    victim = user_parquet(tmp_path / "victim.parquet")
    named = str(victim) if bad == "VICTIM_ABS" else bad
    if bad == "x.txt":
        victim = write(out / "x.txt", "mine")
    # a stale marker (a unit the plan no longer has) whose names lead elsewhere
    write(out / storage.SHARDS_DIR / "part-00077.json",
          json.dumps({"unit": "part-00077", "fingerprint": "f", "files": [named], "quarantine_file": named}))
    # and a current unit's marker, tampered the same way: not a commit, so the unit runs again
    m = out / storage.SHARDS_DIR / "part-00000.json"
    m.write_text(json.dumps({**json.loads(m.read_text()), "files": [named]}))
    s = run_ingest("imagenet", corpus, str(out), IngestOptions(shard_rows=2), echo=False)
    assert victim.exists(), "the marker led the cleanup outside its folder"
    assert s.ingested == 6 and s.shards_skipped == 2                  # the tampered unit ran again
    assert json.loads(m.read_text())["files"] == ["part-00000.parquet"]
    assert not (out / storage.SHARDS_DIR / "part-00077.json").exists()
    assert any("ignoring" in r.message and "marker" in r.message for r in caplog.records)


# --- names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("datasets", [{"name": "..", "path": "x"}]),
                                       ("datasets", [{"name": "a/../../b", "path": "x"}]),
                                       ("datasets", [{"name": "/etc", "path": "x"}]),
                                       ("train", {"name": "../escape"})])
def test_names_that_become_paths_are_plain_names(key, value):
    with pytest.raises(WorkflowError, match="not a plain name"):
        workflow_from_dict({key: value})


def test_hf_media_paths_resolve_under_the_root(ray_session, tmp_path):
    """An absolute `<root>/../outside` path and a path through a symlinked folder are quarantined as
    outside the root, without --allow-outside; with it they are read."""
    root = tmp_path / "hf"
    outside = write(tmp_path / "outside" / "secret.jpg", jpeg(seed=9))
    root.mkdir()
    os.symlink(tmp_path / "outside", root / "linked")
    inside = write(root / "img" / "ok.jpg", jpeg(seed=1))
    rows = [{"image": {"bytes": None, "path": p}, "label": 0, "uid": u}
            for u, p in (("ok", str(inside)), ("dotdot", f"{root}/../outside/secret.jpg"),
                         ("link", "linked/secret.jpg"))]
    pq.write_table(pa.Table.from_pylist(rows), root / "train-00000-of-00001.parquet")
    opts = IngestOptions(columns="uid=sample_id")
    s = run_ingest("hf", str(root), str(tmp_path / "out"), opts, echo=False)
    # both rows, plus the symlinked folder itself in the listing
    assert (s.ingested, s.reasons) == (1, {"path_outside_root": 3}), s.reasons
    assert {r["sample_id"] for r in read_quarantine(tmp_path / "out")} >= {"dotdot", "link"}
    assert outside.exists()
    allowed = IngestOptions(columns="uid=sample_id", allow_outside=True)
    assert run_ingest("hf", str(root), str(tmp_path / "out2"), allowed, echo=False).ingested == 3
