"""`mmbatch preprocess` on a real local Ray: features, pairing, fusion, commits, readers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmbatch.engine import storage
from mmbatch.config import workflow_from_dict
from mmbatch.preprocess.fusion import embeddings_to_numpy, projection
from mmbatch.preprocess import run_preprocess
from mmbatch.schema import read_mmbatch_meta


@pytest.fixture(scope="session")
def ingested(ray_session, demo_corpus, tmp_path_factory):
    from mmbatch.ingest.run import run_ingest

    out = tmp_path_factory.mktemp("canonical")
    for kind, path in (("imagenet", demo_corpus.imagenet), ("librispeech", demo_corpus.librispeech)):
        run_ingest(kind, str(path), str(out / kind))
    return out


def paired_workflow(ingested: Path, out: Path, **over) -> dict:
    wf = {
        "datasets": [
            {"name": "images", "path": str(ingested / "imagenet"), "modalities": ["image"]},
            {"name": "speech", "path": str(ingested / "librispeech"), "modalities": ["audio", "text"],
             "label_column": "speaker"},
        ],
        "features": {"image": {"extractor": "hog", "size": 32}, "text": {"dim": 64}},
        "pairing": {"by": "label", "primary": "images", "seed": 0},
        "output": {"path": str(out)},
    }
    for k, v in over.items():
        wf[k] = v
    return wf


def read_dir(path) -> pa.Table:
    fs, root = storage.url_to_fs(str(path))
    return pa.concat_tables([pq.read_table(f) for f in storage.list_parquet(fs, root)]).sort_by("sample_id")


@pytest.fixture(scope="module")
def paired(ingested, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused")
    summary = run_preprocess(workflow_from_dict(paired_workflow(ingested, out)), progress=False)
    return out, summary


def test_paired_output_rows_schema_and_manifest(paired):
    out, s = paired
    t = read_dir(out)
    n_images = 4 * 12
    assert t.num_rows == n_images == s.rows_out
    assert s.reconciles and s.quarantined == 0
    for c in ("image_emb", "audio_emb", "text_emb", "has_image", "has_audio", "has_text", "fused", "label"):
        assert c in t.column_names
    assert all(t.column("has_image").to_pylist()) and all(t.column("has_audio").to_pylist())
    meta = read_mmbatch_meta(pq.read_schema(storage.list_parquet(*storage.url_to_fs(str(out)))[0]))
    assert meta["kind"] == "fused" and set(meta["features"]) == {"image", "audio", "text"}
    assert meta["features"]["audio"]["params"]["n_mels"] == 80
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == n_images and manifest["counts"]["presence"]["audio"] == n_images
    # concat fusion: fused = [image | audio | text]
    dims = meta["dims"]
    fused = embeddings_to_numpy(t.column("fused"), meta["fused_dim"])
    img = embeddings_to_numpy(t.column("image_emb"), dims["image"])
    np.testing.assert_array_equal(fused[:, : dims["image"]], img)


def test_label_pairing_matches_labels_and_is_reproducible(paired, ingested, tmp_path):
    out, _ = paired
    t = read_dir(out)
    speech = read_dir(Path(ingested) / "librispeech")
    speaker_of = dict(zip(speech.column("sample_id").to_pylist(), speech.column("speaker").to_pylist()))
    readers = sorted(set(speaker_of.values()))
    for label, pw in zip(t.column("label").to_pylist(), t.column("paired_with").to_pylist()):
        partner = json.loads(pw)["speech"]
        assert readers.index(speaker_of[partner]) == label          # same class on both sides
    again = tmp_path / "again"
    run_preprocess(workflow_from_dict(paired_workflow(ingested, again)), progress=False)
    assert read_dir(again).column("paired_with").to_pylist() == t.column("paired_with").to_pylist()
    other = tmp_path / "seed1"
    run_preprocess(workflow_from_dict(paired_workflow(ingested, other, pairing={
        "by": "label", "primary": "images", "seed": 1})), progress=False)
    assert read_dir(other).column("paired_with").to_pylist() != t.column("paired_with").to_pylist()


def test_ray_features_equal_plain_loop(paired, ingested):
    from mmbatch.config import ImageFeatures, TextFeatures
    from mmbatch.preprocess.features.registry import build_extractor

    out, _ = paired
    t = read_dir(out)
    canon = read_dir(Path(ingested) / "imagenet")
    ex = build_extractor("image", ImageFeatures(extractor="hog", size=32))
    loop, errors = ex.extract([r["bytes"] for r in canon.column("image").to_pylist()])
    assert all(e is None for e in errors)
    assert canon.column("sample_id").to_pylist() == t.column("sample_id").to_pylist()
    np.testing.assert_array_equal(embeddings_to_numpy(t.column("image_emb"), ex.dim), loop)
    speech = read_dir(Path(ingested) / "librispeech")
    tex = build_extractor("text", TextFeatures(dim=64))
    ids = speech.column("sample_id").to_pylist()
    partner = [json.loads(p)["speech"] for p in t.column("paired_with").to_pylist()]
    texts = speech.column("text").to_pylist()
    expect, _ = tex.extract([texts[ids.index(p)] for p in partner])
    np.testing.assert_allclose(embeddings_to_numpy(t.column("text_emb"), 64), expect, rtol=0, atol=0)


def test_units_are_row_groups_largest_first_with_deterministic_names(tmp_path):
    """A unit is one row group of one input shard; its id (= output file stem and marker name)
    does not depend on the run, its fingerprint changes with the settings."""
    from mmbatch.config import DatasetConfig
    from mmbatch.preprocess.plan import DatasetPlan, row_group_sizes

    a, b = tmp_path / "part-00000.parquet", tmp_path / "part-00001.parquet"
    pq.write_table(pa.table({"sample_id": [f"a{i}" for i in range(10)]}), a, row_group_size=4)   # 4, 4, 2
    pq.write_table(pa.table({"sample_id": [f"b{i}" for i in range(5)]}), b, row_group_size=5)    # 5
    fs, _ = storage.url_to_fs(str(tmp_path))
    plan = DatasetPlan(DatasetConfig(name="ds", path=str(tmp_path)), [str(a), str(b)], ["image"], None,
                       {str(p): row_group_sizes(fs, str(p)) for p in (a, b)}, {str(a): "fa", str(b): "fb"}, {})
    units = plan.units({"specs": 1})
    assert [(u.id, u.row_group, u.rows) for u in units] == [
        ("ds--part-00001-rg000", 0, 5), ("ds--part-00000-rg000", 0, 4), ("ds--part-00000-rg001", 1, 4),
        ("ds--part-00000-rg002", 2, 2)]
    assert [u.fingerprint for u in plan.units({"specs": 1})] == [u.fingerprint for u in units]
    assert not {u.fingerprint for u in plan.units({"specs": 2})} & {u.fingerprint for u in units}


@pytest.mark.slow
def test_workers_are_pinned_and_model_free_extractors_skip_torch(tmp_path):
    """In a fresh process with no thread settings: the embedded Ray's workers run with one BLAS
    thread, and HOG / log-mel / hashing extraction never imports torch (2 s per worker)."""
    import subprocess
    import sys

    code = """
import os, sys, ray
from mmbatch.engine.runtime import init_ray
init_ray(num_cpus=1)
@ray.remote
def probe():
    import numpy as np
    from mmbatch.config import FeaturesConfig
    from mmbatch.preprocess.unit import extractor as get_extractor
    cfg = FeaturesConfig()
    sr = 16000
    clip = (0.1 * np.sin(np.arange(sr) / 5)).astype(np.float32)
    for m, item in (("image", None), ("audio", clip), ("text", "a few words")):
        ex = get_extractor(m, getattr(cfg, m).model_dump(mode="json"))
        if item is not None:
            ex.encode([item])
    return os.environ.get("OMP_NUM_THREADS"), "torch" in sys.modules
print("RESULT", *ray.get(probe.remote()))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-2000:]
    assert line[0].split()[1:] == ["1", "False"]


def test_rerun_does_no_work_and_config_change_reprocesses(paired, ingested):
    out, first = paired
    mtimes = {p: p.stat().st_mtime_ns for p in Path(out).rglob("*.parquet")}
    again = run_preprocess(workflow_from_dict(paired_workflow(ingested, out)), progress=False)
    assert again.shards_processed == 0 and again.fused_processed == 0
    assert again.shards_skipped == first.shards_processed + first.shards_skipped
    assert {p: p.stat().st_mtime_ns for p in Path(out).rglob("*.parquet")} == mtimes
    changed = paired_workflow(ingested, out)
    changed["features"]["text"]["dim"] = 32
    s = run_preprocess(workflow_from_dict(changed), progress=False)
    speech_units = len(list((Path(out) / "_features" / "speech" / "_shards").glob("*.json")))
    # the partner's features are recomputed; every fused unit of the primary is redone in one pass
    # (its own features are not stored apart: each row is written once, in its fused file)
    assert s.shards_processed == speech_units + first.fused_processed and s.fused_processed == first.fused_processed
    assert read_mmbatch_meta(pq.read_schema(next(Path(out).glob("*.parquet"))))["dims"]["text"] == 32
    assert not list(Path(out).rglob("_staging/*")) and not list(Path(out).rglob("_tmp/*"))


def test_weighted_fusion_is_the_weighted_sum(ingested, tmp_path):
    weights = {"image": 0.5, "audio": 2.0, "text": 1.0}
    wf = paired_workflow(ingested, tmp_path, fusion={"method": "weighted", "dim": 16, "weights": weights, "seed": 3})
    run_preprocess(workflow_from_dict(wf), progress=False)
    t = read_dir(tmp_path)
    meta = read_mmbatch_meta(pq.read_schema(next(tmp_path.glob("*.parquet"))))
    expect = np.zeros((t.num_rows, 16), np.float32)
    for m, w in weights.items():
        x = embeddings_to_numpy(t.column(f"{m}_emb"), meta["dims"][m])
        expect += w * (x @ projection(m, meta["dims"][m], 16, 3))
    np.testing.assert_allclose(embeddings_to_numpy(t.column("fused"), 16), expect, rtol=1e-5, atol=1e-5)


def test_output_readable_by_common_tools(paired):
    out, s = paired
    import duckdb
    import pandas as pd
    import polars as pl
    import ray

    files = sorted(str(p) for p in Path(out).glob("*.parquet"))
    assert len(pd.read_parquet(out)) == s.rows_out
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0] == s.rows_out
    assert pl.read_parquet(files).height == s.rows_out
    assert ray.data.read_parquet(str(out)).count() == s.rows_out
    # the float columns' encoding (byte-stream-split + LZ4) decodes to the same values everywhere
    first = pq.read_table(files[0]).slice(0, 1)
    want = first.column("fused").to_pylist()[0]
    assert duckdb.sql(f"select fused from read_parquet('{files[0]}') limit 1").fetchall()[0][0] == \
        pytest.approx(want, abs=0)
    assert pl.read_parquet(files[0]).get_column("fused")[0].to_list() == pytest.approx(want, abs=0)
    assert pd.read_parquet(files[0]).iloc[0]["fused"].tolist() == pytest.approx(want, abs=0)
    from datasets import load_dataset
    hf = load_dataset("parquet", data_files=files, split="train")
    assert len(hf) == s.rows_out and len(hf[0]["fused"]) == len(hf[0]["image_emb"]) + len(hf[0]["audio_emb"]) + \
        len(hf[0]["text_emb"])


def test_embeddings_are_written_without_dictionary_encoding(paired):
    """Float embedding columns skip Parquet's dictionary attempt (all values distinct: wasted
    work, bigger files) and are byte-stream-split + LZ4; label-like string columns keep the
    dictionary and zstd."""
    import pyarrow.parquet as pq

    out, _ = paired
    meta = pq.ParquetFile(sorted(Path(out).glob("*.parquet"))[0]).metadata
    cols = {meta.schema.column(i).path.split(".")[0]: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    enc = {c: m.encodings for c, m in cols.items()}
    for col in ("fused", "image_emb", "audio_emb"):
        assert "RLE_DICTIONARY" not in enc[col] and "PLAIN_DICTIONARY" not in enc[col], (col, enc[col])
        assert "BYTE_STREAM_SPLIT" in enc[col] and cols[col].compression in ("LZ4", "LZ4_RAW"), (col, enc[col])
    assert cols["split"].compression == "ZSTD"
    assert "RLE_DICTIONARY" in enc["split"] or "PLAIN_DICTIONARY" in enc["split"], enc["split"]


def test_corrupt_media_is_quarantined_and_counts_reconcile(ray_session, tmp_path):
    """A canonical shard with a truncated JPEG and a non-image: quarantined at decode, the rest go on."""
    from mmbatch.demo.corpus import encode_jpeg, make_image
    from mmbatch.schema import CANONICAL, with_metadata

    rng = np.random.default_rng(0)
    good = [encode_jpeg(make_image(c % 4, rng)) for c in range(6)]
    media = good + [good[0][: len(good[0]) // 3], b"not an image at all"]
    rows = [{"sample_id": f"s{i}", "source": "manifest", "split": "train", "label": i % 4,
             "image": {"bytes": b, "path": f"img/{i}.jpg"}} for i, b in enumerate(media)]
    canon = tmp_path / "canon"
    canon.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=with_metadata(CANONICAL)), canon / "part-00000.parquet")
    (canon / "_manifest.json").write_text("{}")
    out = tmp_path / "out"
    wf = {"datasets": [{"name": "bad", "path": str(canon)}], "features": {"image": {"size": 32}},
          "output": {"path": str(out)}}
    s = run_preprocess(workflow_from_dict(wf), progress=False)
    assert s.rows_in == 8 and s.features_rows == 6 and s.quarantined == 2 and s.reconciles
    q = pq.read_table(next((out / "quarantine").glob("*.parquet"))).to_pylist()
    assert {r["sample_id"] for r in q} == {"s6", "s7"}
    assert all(r["reason"].startswith("image:") and r["path"] for r in q)
    from mmbatch.cli import main
    wf_file = tmp_path / "wf.yaml"
    import yaml
    wf_file.write_text(yaml.safe_dump(wf))
    assert main(["preprocess", str(wf_file)]) == 3            # finished, but something was quarantined


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    import yaml

    from mmbatch.cli import main
    wf_file = tmp_path / "wf.yaml"
    wf_file.write_text(yaml.safe_dump({"datasets": [{"name": "x", "path": str(tmp_path / "nope")}],
                                       "output": {"path": str(tmp_path / "o")}}))
    assert main(["preprocess", str(wf_file)]) == 2
    assert "does not exist" in capsys.readouterr().err
    wf_file.write_text(yaml.safe_dump({"features": {"image": {"extractor": "vgg"}}}))
    assert main(["preprocess", str(wf_file)]) == 2
    err = capsys.readouterr().err
    assert "features.image.extractor" in err and "'hog', 'cnn', 'pixels' or 'hf'" in err


GPU_SCRIPT = r"""
import json, sys
import ray
from mmbatch.engine.runtime import init_ray
init_ray(num_cpus=2, num_gpus=2)          # fake GPUs: the scheduler sees them, CUDA does not exist
from mmbatch.config import workflow_from_dict
from mmbatch.preprocess import run_preprocess
wf = workflow_from_dict({"datasets": [{"name": "images", "path": sys.argv[1], "modalities": ["image"]}],
                         "features": {"image": {"extractor": "cnn", "size": 32, "batch_size": 8}},
                         "output": {"path": sys.argv[2]}})
s = run_preprocess(wf, progress=False)
print("RESULT", json.dumps({"placement": {m: {k: (sorted(v) if isinstance(v, set) else v) for k, v in p.items()}
                                            for m, p in s.placement.items()}, "rows": s.rows_out}))
"""


@pytest.mark.slow
def test_model_extractor_scheduled_on_gpu_falls_back_to_cpu_inside_actor(ingested, tmp_path):
    """With GPUs advertised, the CNN stage asks for a GPU fraction; inside the actor CUDA is absent -> CPU."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", GPU_SCRIPT, str(Path(ingested) / "imagenet"), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    img = res["placement"]["image"]
    assert img["device"] == "gpu" and 0 < img["num_gpus"] <= 1      # scheduled as a GPU stage
    assert img["devices"] == ["cpu"]                                # fell back inside the actor
    assert res["rows"] == 48


def test_modality_completion_speaks_class_names_for_image_rows(ingested, tmp_path):
    """`complete: text-to-speech from label_name` gives every image row an audio clip before extraction."""
    wf = {"datasets": [{"name": "images", "path": str(Path(ingested) / "imagenet"),
                        "complete": [{"kind": "text-to-speech", "source_column": "label_name"}]}],
          "features": {"image": {"size": 32}}, "output": {"path": str(tmp_path)}}
    s = run_preprocess(workflow_from_dict(wf), progress=False)
    t = read_dir(tmp_path)
    assert s.quarantined == 0 and t.num_rows == 48
    assert all(t.column("has_audio").to_pylist()) and all(t.column("has_image").to_pylist())
    audio = embeddings_to_numpy(t.column("audio_emb"), len(t.column("audio_emb")[0]))
    assert np.isfinite(audio).all()
    labels = np.array(t.column("label").to_pylist())
    # same class name -> same spoken clip -> identical audio features; different names differ
    assert np.allclose(audio[labels == 0][0], audio[labels == 0][1])
    assert not np.allclose(audio[labels == 0][0], audio[labels == 1][0])


def test_splits_are_decided_once_and_stored(ray_session, tmp_path):
    """A dataset with a train split only: preprocess carves validation and test from it (by a hash of
    seed:sample_id), writes the final split into the fused rows and marks the metadata final."""
    from mmbatch.demo.corpus import encode_jpeg, make_image
    from mmbatch.schema import CANONICAL, with_metadata
    from mmbatch.preprocess.splits import FINAL_KEY, assign_splits, split_plan

    rng = np.random.default_rng(1)
    rows = [{"sample_id": f"s{i:03d}", "source": "manifest", "split": "train", "label": i % 2,
             "image": {"bytes": encode_jpeg(make_image(i % 4, rng)), "path": f"img/{i}.jpg"}} for i in range(60)]
    canon = tmp_path / "canon"
    canon.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=with_metadata(CANONICAL)), canon / "part-00000.parquet")
    (canon / "_manifest.json").write_text(json.dumps({"counts": {"splits": {"train": 60}}}))
    wf = {"datasets": [{"name": "d", "path": str(canon)}], "features": {"image": {"size": 32}},
          "train": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 3}, "output": {"path": str(tmp_path / "o")}}
    run_preprocess(workflow_from_dict(wf), progress=False)
    t = read_dir(tmp_path / "o")
    got = t.column("split").to_pylist()
    assert set(got) == {"train", "validation", "test"}
    want = assign_splits(t.column("sample_id").to_pylist(), ["train"] * 60, split_plan({"train"}, 0.25, 0.25), 3)
    assert got == want.tolist()
    meta = read_mmbatch_meta(pq.read_schema(next((tmp_path / "o").glob("*.parquet"))))
    assert meta[FINAL_KEY] is True and meta["split_plan"]["seed"] == 3
    manifest = json.loads((tmp_path / "o" / "_manifest.json").read_text())
    assert manifest["counts"]["split"] == {s: got.count(s) for s in set(got)}
