"""The hf extractors without Ray: tiny random models of every supported family (built here, offline),
against a plain transformers loop on the same rows; refusals of incomplete folders; provenance."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from hf_models import (AUDIO_FAMILIES, IMAGE_FAMILIES, TEXT_FAMILIES, build, flac, jpeg, plain_audio, plain_image,
                       plain_text, sentence)
from mmbatch.config import AudioFeatures, ImageFeatures, TextFeatures, WorkflowError, workflow_from_dict
from mmbatch.errors import UsageError
from mmbatch.preprocess.features import hf
from mmbatch.preprocess.features.registry import build_extractor, embedding_dim

TOL = 1e-5
IMAGES = [jpeg(i, 40 + 3 * i, 36 + i) for i in range(7)]
CLIPS = [flac(i, 0.2 + 0.07 * i) for i in range(7)]
TEXTS = [sentence(i) for i in range(7)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    return {f: str(build(f, root)) for f in sorted({*IMAGE_FAMILIES, *AUDIO_FAMILIES, *TEXT_FAMILIES})}


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_image_embeddings_match_a_plain_transformers_loop(models, family):
    cfg = ImageFeatures(extractor="hf", model_path=models[family], batch_size=3)
    ex = build_extractor("image", cfg)
    got, errors = ex.extract(IMAGES + [b"not an image"])
    want = plain_image(models[family], IMAGES, batch_size=3)
    assert errors[:-1] == [None] * len(IMAGES) and errors[-1][0] == "not_an_image"
    assert got.shape == (len(IMAGES) + 1, embedding_dim("image", cfg)) and not got[-1].any()
    assert np.abs(got[:-1] - want).max() <= TOL and np.abs(want).max() > 0


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_image_cls_pooling(models, family):
    ex = build_extractor("image", ImageFeatures(extractor="hf", model_path=models[family], pooling="cls"))
    got, _ = ex.extract(IMAGES)
    assert np.abs(got - plain_image(models[family], IMAGES, 64, pooling="cls")).max() <= TOL
    assert ex.params()["output"] == "cls"


def test_cls_pooling_is_refused_for_a_convnet(models):
    with pytest.raises(UsageError, match="pooling: cls needs a transformer.*convnext"):
        build_extractor("image", ImageFeatures(extractor="hf", model_path=models["convnext"], pooling="cls"))


@pytest.mark.parametrize("family", AUDIO_FAMILIES)
def test_audio_mean_over_frames_matches_a_plain_transformers_loop(models, family):
    cfg = AudioFeatures(extractor="hf", model_path=models[family], batch_size=3)
    ex = build_extractor("audio", cfg)
    got, errors = ex.extract(CLIPS)
    want = plain_audio(models[family], CLIPS, batch_size=3)
    assert errors == [None] * len(CLIPS) and got.shape == (len(CLIPS), embedding_dim("audio", cfg))
    assert np.abs(got - want).max() <= TOL and np.abs(want).max() > 0


@pytest.mark.parametrize("family", AUDIO_FAMILIES)
def test_audio_frames_of_a_hidden_layer_match_a_plain_transformers_loop(models, family):
    cfg = AudioFeatures(extractor="hf_frames", model_path=models[family], layer=1, max_frames=12, batch_size=4)
    ex = build_extractor("audio", cfg)
    got, _ = ex.extract(CLIPS)
    want = plain_audio(models[family], CLIPS, batch_size=4, layer=1, frames=True)
    assert ex.sequence and ex.dim == embedding_dim("audio", cfg) == 12 * 16
    for g, w in zip(got, want):
        assert g.shape == (min(12, len(w)), 16) and np.abs(g - w[:12]).max() <= TOL
    last = build_extractor("audio", AudioFeatures(extractor="hf", model_path=models[family])).extract(CLIPS[:1])[0]
    assert np.abs(last[0] - got[0].mean(0)).max() > 1e-4        # layer 1 of 2 is not the last hidden state


def test_hf_frames_fields_are_the_logmel_frames_columns(models):
    ex = build_extractor("audio", AudioFeatures(extractor="hf_frames", model_path=models["wav2vec2"], max_frames=5))
    values, _ = ex.extract(CLIPS[:3])
    cols = ex.to_arrow(values, np.array([True, False, True]))
    assert [f.name for f in ex.fields()] == ["audio_frames", "audio_len"]
    assert cols["audio_len"].to_pylist() == [5, None, 5] and cols["audio_frames"].type.value_type.list_size == 16


def test_a_layer_the_model_lacks_is_refused(models):
    with pytest.raises(UsageError, match=r"features.audio.layer: 3 is not a layer.*2 layers"):
        build_extractor("audio", AudioFeatures(extractor="hf", model_path=models["hubert"], layer=3))


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_embeddings_match_a_plain_transformers_loop(models, family):
    cfg = TextFeatures(extractor="hf", model_path=models[family], batch_size=3)
    ex = build_extractor("text", cfg)
    got, errors = ex.extract(TEXTS + ["  "])
    want = plain_text(models[family], TEXTS, batch_size=3)
    assert errors[-1][0] == "empty_text" and got.shape[1] == embedding_dim("text", cfg)
    assert np.abs(got[:-1] - want).max() <= TOL and np.abs(want).max() > 0


def test_clip_image_and_text_land_in_one_space(models):
    img = build_extractor("image", ImageFeatures(extractor="hf", model_path=models["clip"]))
    txt = build_extractor("text", TextFeatures(extractor="hf", model_path=models["clip"]))
    assert img.dim == txt.dim == 12            # the projection, not either tower's width (16)
    assert img.params()["output"] == "clip_vision_tower" and txt.params()["output"] == "clip_text_tower"


# --- the folder -----------------------------------------------------------------------------------
def test_missing_and_incomplete_folders_are_refused_in_one_line(models, tmp_path):
    with pytest.raises(UsageError, match=r"features.image.model_path: .*nowhere is not a folder.*save_pretrained"):
        build_extractor("image", ImageFeatures(extractor="hf", model_path=str(tmp_path / "nowhere")))
    partial = tmp_path / "partial"
    shutil.copytree(models["bert"], partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(UsageError, match=r"partial has no model.safetensors or pytorch_model.bin: not a complete") as e:
        build_extractor("text", TextFeatures(extractor="hf", model_path=str(partial)))
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match=r"has no preprocessor_config.json.*AutoImageProcessor.*save_pretrained"):
        build_extractor("image", ImageFeatures(extractor="hf", model_path=models["bert"]))


def test_a_workflow_with_hf_and_no_model_path_is_refused():
    with pytest.raises(WorkflowError, match=r"features.audio.extractor: hf_frames needs features.audio.model_path"):
        workflow_from_dict({"features": {"audio": {"extractor": "hf_frames"}}})


def test_nothing_is_downloaded(models, monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    build_extractor("text", TextFeatures(extractor="hf", model_path=models["bert"])).extract(TEXTS[:1])
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_weights_content_is_in_params_and_changes_with_the_weights(models, tmp_path):
    from mmbatch.engine.provenance import weights_digests

    folder = tmp_path / "bert"
    shutil.copytree(models["bert"], folder)
    spec = TextFeatures(extractor="hf", model_path=str(folder)).model_dump(mode="json")
    before = build_extractor("text", TextFeatures(**spec)).describe()["params"]
    assert before["model"] == "bert" and before["model_type"] == "bert"
    assert before["model_sha256"] == weights_digests(spec)["model_path"]
    w = folder / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 1                                     # one bit of one weight
    w.write_bytes(bytes(raw))
    after = build_extractor("text", TextFeatures(**spec)).describe()["params"]
    assert after["model_sha256"] != before["model_sha256"] == hf.HFTextExtractor(models["bert"]).params()["model_sha256"]


def test_a_remote_folder_is_copied_once_per_process(models, monkeypatch):
    """A non-local fsspec folder (memory://, as s3:// or gs://) is copied to a local cache and used from there."""
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.put(models["bert"], "/hfmodels/bert", recursive=True)
    uri = "memory://hfmodels/bert"
    ex = build_extractor("text", TextFeatures(extractor="hf", model_path=uri))
    got, _ = ex.extract(TEXTS)
    want, _ = build_extractor("text", TextFeatures(extractor="hf", model_path=models["bert"])).extract(TEXTS)
    assert np.array_equal(got, want)
    local = hf.local_folder(uri)
    assert local != models["bert"] and (hf.os.path.isfile(hf.os.path.join(local, ".complete")))
    calls = []
    monkeypatch.setattr(type(mem), "get", lambda *a, **k: calls.append(a))
    assert hf.local_folder(uri) == local and calls == []


def test_bf16_on_cpu_runs_close_to_fp32(models):
    fp32, _ = build_extractor("text", TextFeatures(extractor="hf", model_path=models["bert"])).extract(TEXTS)
    bf16, _ = build_extractor("text", TextFeatures(extractor="hf", model_path=models["bert"],
                                                   precision="bf16")).extract(TEXTS)
    assert bf16.dtype == np.float32 and 0 < np.abs(bf16 - fp32).max() < 0.1
