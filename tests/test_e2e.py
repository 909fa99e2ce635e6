"""Sequence features (pixels, log-mel frames, tokens) and encoders trained end to end, on a real
local Ray: preprocess writes the columns, every common reader reads them back the same, and
`mmbatch train` with train.encoders trains, resumes, evaluates and refuses mismatched data."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.e2e_task import VOICES, noisy_speech, sequence_features, spoken, write_task
from mmbatch.engine import storage
from mmbatch.config import AudioFeatures, ImageFeatures, TextFeatures, WorkflowError, workflow_from_dict
from mmbatch.errors import UsageError
from mmbatch.preprocess.features.registry import build_extractor
from mmbatch.preprocess.features.sequence import UNK_ID, build_vocabulary
from mmbatch.schema import read_mmbatch_meta

TEST_ONLY_WORD = "zebra"          # appears in test rows only: must not enter the vocabulary
ENCODERS = {"image": "cnn", "audio": "lstm", "text": "lstm"}


def read_dir(path) -> pa.Table:
    fs, root = storage.url_to_fs(str(path))
    return pa.concat_tables([pq.read_table(f) for f in storage.list_parquet(fs, root)]).sort_by("sample_id")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """An AV-shaped task as media + manifest; test rows' texts carry a word no train row has."""
    root = tmp_path_factory.mktemp("e2e_task")
    manifest = write_task(root, (60, 20, 20), seed=3)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for r in rows:
        if r["split"] == "test":
            r["text"] = f"{TEST_ONLY_WORD} {r['text']}"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, rows


@pytest.fixture(scope="module")
def canonical(ray_session, task, tmp_path_factory):
    from mmbatch.ingest.run import IngestOptions, run_ingest

    out = tmp_path_factory.mktemp("e2e_canonical")
    run_ingest("manifest", str(task[0] / "manifest.jsonl"), str(out), IngestOptions(), echo=False)
    return out


def seq_workflow(canonical: Path, out: Path, **train) -> dict:
    return {"datasets": [{"name": "av", "path": str(canonical)}], "features": sequence_features(max_tokens=8),
            "output": {"path": str(out)},
            "train": {"epochs": 2, "batch_size": 32, "encoders": ENCODERS, "out": str(out.parent / "train"),
                      **train}}


@pytest.fixture(scope="module")
def fused(canonical, tmp_path_factory):
    from mmbatch.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("e2e") / "fused"
    wf = workflow_from_dict(seq_workflow(canonical, out))
    summary = run_preprocess(wf, progress=False)
    return out, summary, wf


# --- the task's audio -----------------------------------------------------------------------------
def test_task_audio_is_noisy_spoken_digit_words(task):
    """Every clip is 1 s of 16 kHz mono, not silent, and no two are the same (voices, speeds, shifts
    and noise vary); the clean utterances are espeak-ng words that differ by word and by voice."""
    import soundfile as sf

    root, rows = task
    clips = {}
    for r in rows:
        x, sr = sf.read(root / r["audio_path"], dtype="float32")
        assert sr == 16000 and x.shape == (16000,) and np.sqrt(np.mean(x ** 2)) > 0.01
        clips.setdefault(r["label"], []).append(x)
    assert sorted(clips) == list(range(10))
    for same_class in clips.values():
        a, b = same_class[:2]
        assert not np.allclose(a, b, atol=1e-3)

    words = [spoken(w, VOICES[0], 140, 50) for w in ("zero", "seven")]
    for w in words:
        assert 0.2 < w.size / 16000 < 1.0 and np.abs(w).max() > 0.1          # a spoken word, silence cut
    assert words[0].size != words[1].size or not np.allclose(*words)
    other_voice = spoken("zero", "en+f2", 140, 50)
    assert other_voice.size != words[0].size or not np.allclose(other_voice, words[0])
    assert spoken("zero", VOICES[0], 140, 50) is words[0]                        # synthesised once

    # almost without noise, the word stands out of silence: loud 10 ms frames span about its length
    clean, _ = sf.read(io.BytesIO(noisy_speech(words[1], np.random.default_rng(0), (60.0, 60.0))))
    frames = np.sqrt(np.mean(clean.reshape(100, 160) ** 2, axis=1))
    loud = np.flatnonzero(frames > 0.05 * frames.max())
    span = (loud[-1] - loud[0] + 1) * 160
    assert clean.shape == (16000,) and 0.6 * words[1].size / 1.1 < span <= words[1].size / 0.9 + 320


# --- extractors (pure) ---------------------------------------------------------------------------
def test_pixels_frames_tokens_extractors(task):
    root, rows = task
    jpg = (root / rows[0]["image_path"]).read_bytes()
    flac = (root / rows[0]["audio_path"]).read_bytes()
    gray = build_extractor("image", ImageFeatures(extractor="pixels"))
    assert gray.dim == 28 * 28 and gray.describe()["params"]["size"] == 28          # size 28 unless set
    (g,), errs = gray.extract([jpg])
    assert g.shape == (28, 28, 1) and g.dtype == np.uint8 and errs == [None] and g.max() > g.min()
    rgb = build_extractor("image", ImageFeatures(extractor="pixels", size=32, channels=3))
    (c,), _ = rgb.extract([jpg])
    assert c.shape == (32, 32, 3) and rgb.dim == 32 * 32 * 3
    _, bad = gray.extract([b"not an image"])
    assert bad[0][0] == "not_an_image"                                               # quarantined, as for hog

    frames = build_extractor("audio", AudioFeatures(extractor="logmel_frames", n_mels=40, max_frames=30))
    full = build_extractor("audio", AudioFeatures(extractor="logmel_frames", n_mels=40, max_frames=1000))
    (short,), _ = frames.extract([flac])
    (long,), _ = full.extract([flac])
    assert long.shape == (101, 40) and short.shape == (30, 40)                      # 1 s at 10 ms hops, cropped
    assert np.array_equal(short, long[:30]) and short.dtype == np.float32

    vocab = build_vocabulary(["the cat sat", "the dog", "THE cat!"], vocab_size=4)
    assert vocab == ["<pad>", "<unk>", "the", "cat"]                                # by row count, capped
    tok = build_extractor("text", TextFeatures(extractor="tokens", vocabulary=vocab, max_tokens=3))
    (ids,), _ = tok.extract(["The cat saw the dog"])
    assert ids.tolist() == [2, 3, UNK_ID] and ids.dtype == np.int32                 # cropped to max_tokens
    with pytest.raises(ValueError, match="needs a vocabulary"):
        build_extractor("text", TextFeatures(extractor="tokens"))


def test_config_keys_are_checked():
    with pytest.raises(WorkflowError, match="features.image.channels"):
        workflow_from_dict({"features": {"image": {"extractor": "pixels", "channels": 2}}})
    with pytest.raises(WorkflowError, match="train.encoders.audio"):
        workflow_from_dict({"train": {"encoders": {"audio": "cnn"}}})


# --- preprocess output --------------------------------------------------------------------------
def test_preprocess_writes_sequence_columns_and_train_only_vocabulary(fused, task):
    out, summary, wf = fused
    root, rows = task
    t = read_dir(out)
    assert t.num_rows == summary.rows_out == len(rows)
    assert "fused" not in t.column_names and not any(c.endswith("_emb") for c in t.column_names)
    assert t.schema.field("image_pixels").type == pa.list_(pa.uint8(), 784)
    assert t.schema.field("audio_frames").type == pa.list_(pa.list_(pa.float32(), 40))
    assert t.schema.field("text_tokens").type == pa.list_(pa.int32())
    meta = read_mmbatch_meta(pq.read_schema(next(Path(out).glob("*.parquet"))))
    vocab = meta["features"]["text"]["params"]["vocabulary"]
    train_texts = [r["text"] for r in rows if r["split"] == "train"]
    assert vocab == build_vocabulary(train_texts) and TEST_ONLY_WORD not in vocab
    by_id = {r["sample_id"]: r for r in rows}
    test_rows = [r for r in t.to_pylist() if r["split"] == "test"]
    assert all(r["text_tokens"][0] == UNK_ID for r in test_rows)       # the test-only word is <unk>
    # the stored values are the extractors' (true lengths, all 1 s clips: 100 frames kept)
    first = t.slice(0, 1).to_pylist()[0]
    src = by_id[first["sample_id"]]
    (frames,), _ = build_extractor("audio", AudioFeatures(**sequence_features()["audio"])).extract(
        [(root / src["audio_path"]).read_bytes()])
    assert first["audio_len"] == len(first["audio_frames"]) == 100
    assert np.array_equal(np.asarray(first["audio_frames"], np.float32), frames)
    assert first["text_len"] == len(first["text_tokens"]) == min(8, len(src["text"].split()))

    from mmbatch.ops.describe import describe, render_text
    info = describe(str(out))
    assert set(info["sequences"]) == {"image", "audio", "text"}
    assert "fused vector: none" in render_text(info)


def test_sequence_columns_read_back_identically_everywhere(fused):
    import duckdb
    import pandas as pd
    import polars as pl
    import ray
    from datasets import load_dataset

    out, summary, _ = fused
    files = sorted(str(p) for p in Path(out).glob("*.parquet"))
    cols = ["sample_id", "image_pixels", "audio_frames", "audio_len", "text_tokens", "text_len"]
    want = pa.concat_tables([pq.read_table(f, columns=cols) for f in files]).sort_by("sample_id").to_pylist()

    def same(rows):
        rows = sorted(rows, key=lambda r: r["sample_id"])
        assert len(rows) == len(want)
        for a, b in zip(rows, want):
            for c in cols:
                x = a[c].tolist() if hasattr(a[c], "tolist") else a[c]
                if c == "audio_frames":
                    x = [f.tolist() if hasattr(f, "tolist") else list(f) for f in x]
                elif isinstance(x, (list, tuple)):
                    x = list(x)
                assert x == b[c], (c, a["sample_id"])

    same(duckdb.sql(f"select {', '.join(cols)} from read_parquet({files})").pl().to_dicts())
    same(pl.read_parquet(files, columns=cols).to_dicts())
    same(pd.read_parquet(out, columns=cols).to_dict("records"))
    same(load_dataset("parquet", data_files=files, split="train").select_columns(cols).to_list())
    same(ray.data.read_parquet(files).select_columns(cols).take_all())


# --- training -------------------------------------------------------------------------------------
def test_train_end_to_end_evaluate_resume_and_baselines(fused):
    from mmbatch.train.evaluate import evaluate_model
    from mmbatch.train.models import load_model
    from mmbatch.train.run import run_training

    out, _, wf = fused
    r = run_training(wf, baselines=True)
    assert r.status == "trained" and set(r.baselines) == {"image", "audio", "text"}
    spec = r.spec
    assert spec["arch"]["encoders"]["image"] == {"kind": "cnn", "hidden": 64, "size": 28, "channels": 1}
    assert spec["arch"]["encoders"]["audio"]["n_mels"] == 40 and spec["arch"]["encoders"]["text"]["kind"] == "lstm"
    assert spec["features"]["text"]["params"]["vocabulary"][:2] == ["<pad>", "<unk>"]
    model, _ = load_model(r.model_dir)
    assert set(model.encoders) == {"image", "audio", "text"}
    assert len(r.history) == 2 and all(np.isfinite(h["train_loss"]) for h in r.history)
    again = evaluate_model(r.model_dir, str(out), "test")
    assert again["accuracy"] == pytest.approx(r.metrics["accuracy"])
    # the same run again: complete, nothing trained
    assert run_training(wf, baselines=False).status == "complete"


def test_training_streams_sequences_through_ray_data(fused, monkeypatch):
    """A train split over MATERIALIZE_BYTES is streamed from Parquet by Ray Data into the DDP workers."""
    from mmbatch.train import run as train_run

    out, _, wf = fused
    monkeypatch.setattr(train_run, "MATERIALIZE_BYTES", 0)
    wf2 = workflow_from_dict(seq_workflow(Path(wf.datasets[0].path), out, name="streamed", epochs=1))
    r = train_run.run_training(wf2, baselines=False)
    assert r.history[0]["train_rows"] == 60 and np.isfinite(r.history[0]["train_loss"])


def test_exported_model_refuses_other_feature_settings(fused, canonical, tmp_path):
    from mmbatch.preprocess import run_preprocess
    from mmbatch.train.evaluate import evaluate_model
    from mmbatch.train.run import run_training

    out, _, wf = fused
    model_dir = run_training(wf, baselines=False).model_dir           # complete from the test above, or trained
    vocab = read_mmbatch_meta(pq.read_schema(next(Path(out).glob("*.parquet"))))["features"]["text"]["params"]["vocabulary"]
    other = seq_workflow(canonical, tmp_path / "other")
    other["features"]["text"]["vocabulary"] = vocab[:2] + list(reversed(vocab[2:]))   # same words, other ids
    run_preprocess(workflow_from_dict(other), progress=False)
    with pytest.raises(UsageError, match=r"features\.text\.vocabulary.*another order"):
        evaluate_model(model_dir, str(tmp_path / "other"), "test")

    frozen = workflow_from_dict(seq_workflow(canonical, out, name="frozen", encoders={"image": "cnn"}))
    with pytest.raises(UsageError, match="train.encoders.audio: frozen needs an embedding"):
        run_training(frozen, baselines=False)


def test_encoders_ignore_padding_and_name_mismatched_columns():
    from mmbatch.train.encoders import AudioLSTM, ImageCNN, InputMismatch, TextLSTM

    torch.manual_seed(0)
    lstm = AudioLSTM(n_mels=8, out_dim=16).eval()
    x = torch.randn(2, 20, 8)
    lengths = torch.tensor([5, 20])
    padded = x.clone()
    padded[0, 5:] = 1e3                                             # garbage past the true length
    with torch.no_grad():
        assert torch.allclose(lstm(padded, lengths), lstm(x, lengths), atol=1e-6)
        assert torch.allclose(lstm(x, lengths)[0], lstm(x[:1, :5], torch.tensor([5]))[0], atol=1e-6)
    with pytest.raises(InputMismatch, match="audio_frames.*n_mels 8"):
        lstm(torch.zeros(1, 4, 40), torch.tensor([4]))
    with pytest.raises(InputMismatch, match="image_pixels: rows of size 1024.*size 28"):
        ImageCNN(28, 1, 16)(torch.zeros(2, 32 * 32, dtype=torch.uint8))
    with pytest.raises(InputMismatch, match="outside the model's vocabulary of 10"):
        TextLSTM(10, 16)(torch.tensor([[3, 12]]), torch.tensor([2]))


@pytest.mark.parametrize("fusion", ["early", "weighted", "late", "gated"])
def test_every_fusion_model_takes_learned_encoders(fusion):
    """The fusion models of train.model run on the encoders' outputs; a missing modality
    changes nothing in a row's logits whatever its (zeroed) input holds."""
    from mmbatch.train.models import FusionModel

    torch.manual_seed(0)
    enc = {"image": {"kind": "cnn", "hidden": 8, "size": 16, "channels": 1},
           "audio": {"kind": "lstm", "hidden": 8, "n_mels": 4, "max_frames": 6},
           "text": {"kind": "lstm", "hidden": 8, "vocab_size": 12, "max_tokens": 5}}
    model = FusionModel({"image": 256, "audio": 24, "text": 5}, 3, fusion, hidden=16, dropout=0.0, encoders=enc).eval()
    batch = {"image_emb": torch.randint(0, 255, (4, 256), dtype=torch.uint8),
             "audio_emb": torch.randn(4, 6, 4), "audio_len": torch.tensor([6, 3, 1, 0]),
             "text_emb": torch.randint(1, 12, (4, 5)), "text_len": torch.tensor([5, 2, 4, 1]),
             "has_image": torch.tensor([True, True, True, True]), "has_audio": torch.tensor([True, True, True, False]),
             "has_text": torch.tensor([True, False, True, True])}
    logits, aux, mask = model(batch, with_aux=True)
    assert logits.shape == (4, 3) and torch.isfinite(model.loss((logits, aux, mask), torch.tensor([0, 1, 2, 0])))
    other = {**batch, "audio_emb": torch.randn(4, 6, 4) * 50}           # row 3 has no audio
    with torch.no_grad():
        assert torch.allclose(model(other)[3], model(batch)[3], atol=1e-5)


@pytest.mark.slow
def test_e2e_benchmark_writes_its_table(tmp_path):
    """`python -m benchmarks.e2e` on a tiny task: every model is trained, scored and tabled."""
    from benchmarks import e2e

    e2e.main(["--train", "60", "--val", "20", "--test", "30", "--epochs", "1", "--max-frames", "20",
              "--out", str(tmp_path)])
    res = json.loads((tmp_path / "e2e.json").read_text())
    kinds = {f"{k}:{m}" for k in ("end_to_end", "frozen") for m in ("fusion", "image", "audio", "text")}
    assert set(res["models"]) == kinds
    assert all(0 <= r["errors"] <= 30 and r["params"] > 0 and r["epoch_s"] > 0 for r in res["models"].values())
    v = res["verdict"]
    assert v["fusion_errors"] == res["models"]["end_to_end:fusion"]["errors"]
    assert v["passes"] == (v["error_cut"] >= 0.25)
    assert "early fusion, all three" in (tmp_path / "e2e.md").read_text()


def test_label_pairing_carries_sequence_features(ray_session, demo_corpus, tmp_path):
    """AV-MNIST-style pairing (pairing.by: label): each image row gets a speech row of its label,
    whose log-mel frames and token ids are copied from the partner's features unchanged."""
    from mmbatch.ingest.run import run_ingest
    from mmbatch.preprocess import run_preprocess

    for kind, path in (("imagenet", demo_corpus.imagenet), ("librispeech", demo_corpus.librispeech)):
        run_ingest(kind, str(path), str(tmp_path / kind), echo=False)
    wf = workflow_from_dict({
        "datasets": [{"name": "images", "path": str(tmp_path / "imagenet"), "modalities": ["image"]},
                     {"name": "speech", "path": str(tmp_path / "librispeech"), "modalities": ["audio", "text"],
                      "label_column": "speaker"}],
        "features": sequence_features(max_frames=50, max_tokens=6), "pairing": {"by": "label", "primary": "images"},
        "output": {"path": str(tmp_path / "fused")}})
    summary = run_preprocess(wf, progress=False)
    t = read_dir(tmp_path / "fused")
    assert t.num_rows == summary.rows_out > 0 and "fused" not in t.column_names
    partner = read_dir(tmp_path / "fused" / "_features" / "speech").to_pylist()
    by_id = {r["sample_id"]: r for r in partner}
    checked = 0
    for r in t.to_pylist():
        p = by_id.get(json.loads(r["paired_with"])["speech"])
        if p is None:
            continue
        assert r["label"] == p["label"]
        assert r["audio_frames"] == p["audio_frames"] and r["audio_len"] == p["audio_len"] == len(p["audio_frames"])
        assert r["text_tokens"] == p["text_tokens"] and r["has_audio"] and len(r["image_pixels"]) == 784
        checked += 1
    assert checked == t.num_rows
