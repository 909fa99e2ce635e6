"""Sequence features: the model inputs of encoders trained end to end (``train.encoders``).

Where the other extractors reduce a sample to one frozen vector, these keep what an encoder
learns from, one Arrow column per modality (names and types in :mod:`mmbatch.schema`):

| modality | extractor       | per row                                      | column (+ length)            |
|----------|-----------------|----------------------------------------------|------------------------------|
| image    | pixels          | uint8 [size, size, channels] (resize + crop) | image_pixels                 |
| audio    | logmel_frames   | float32 [frames <= max_frames, n_mels] (dB)  | audio_frames + audio_len     |
| text     | tokens          | int32 [tokens <= max_tokens] vocabulary ids  | text_tokens + text_len       |

Decoding is shared with the frozen extractors (same JPEG / FLAC / SPHERE decode, resize,
resampling, framing, text normalisation), so the quarantine reasons are the same too.

The text vocabulary is built once, in the driver, from the rows whose final split is
``train`` (:func:`train_vocabulary`), before any unit runs: token ids never depend on the
validation or test texts. It is a parameter of the extractor, so it is in the output
metadata (``features.text.params.vocabulary``) and in every unit's fingerprint.

``dim`` of a sequence extractor is the size of its padded model input (size*size*channels,
max_frames*n_mels, max_tokens): what the training data path pads to and what a model checks.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa

from mmbatch import schema
from mmbatch.preprocess.features.audio import AudioExtractor, FrameParams
from mmbatch.preprocess.features.image import ImageExtractor
from mmbatch.preprocess.features.text import TextExtractor, normalize_text

PAD, UNK = "<pad>", "<unk>"          # ids 0 and 1 of every vocabulary
PAD_ID, UNK_ID = 0, 1


class SequenceExtractor(ABC):
    """Mixin: per-row arrays of varying or fixed shape instead of a [n, dim] embedding matrix.

    ``extract`` returns an object array (one NumPy array per row, None where a row failed),
    and :meth:`to_arrow` turns a unit's rows into this modality's Arrow columns."""
    sequence = True

    def empty_rows(self, n: int) -> np.ndarray:
        return np.full(n, None, dtype=object)

    def extract(self, items: Sequence[Any]) -> tuple[np.ndarray, list]:
        dec = self.decode(items)
        out = self.empty_rows(len(items))
        for i, (v, e) in enumerate(zip(dec.values, dec.errors)):
            if e is None:
                out[i] = self.row(v)
        return out, dec.errors

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        out = self.empty_rows(len(values))
        for i, v in enumerate(values):
            out[i] = self.row(v)
        return out

    @abstractmethod
    def row(self, value: Any) -> np.ndarray:
        """One decoded value (image array, waveform, text) -> this modality's per-row array."""

    def fields(self) -> list[pa.Field]:
        return schema.sequence_fields(self.modality, self.params())

    def to_arrow(self, values: np.ndarray, present: np.ndarray) -> dict[str, pa.Array]:
        """This modality's columns for the rows of a unit (null where ``present`` is false)."""
        return sequence_columns(self.modality, values, present, self.fields())


def sequence_columns(modality: str, values: np.ndarray, present: np.ndarray,
                     fields: list[pa.Field]) -> dict[str, pa.Array]:
    """Arrow columns of ``fields`` (see :func:`mmbatch.schema.sequence_fields`) from per-row arrays."""
    present = np.asarray(present, bool) & np.array([v is not None for v in values], bool)
    mask = pa.array(~present)
    n = len(values)
    seq = fields[0]
    if modality == "image":
        width = seq.type.list_size
        flat = np.zeros((n, width), np.uint8)
        for i in np.flatnonzero(present):
            flat[i] = values[i].reshape(-1)
        return {seq.name: pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width, mask=mask)}
    lengths = np.array([len(values[i]) if present[i] else 0 for i in range(n)], np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    rows = [values[i] for i in np.flatnonzero(present)]
    if modality == "audio":
        n_mels = seq.type.value_type.list_size
        flat = np.concatenate([r.reshape(-1) for r in rows]).astype(np.float32) if rows else np.zeros(0, np.float32)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), n_mels)
    else:
        inner = pa.array(np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32))
    return {seq.name: pa.ListArray.from_arrays(offsets, inner, type=seq.type, mask=mask),
            fields[1].name: pa.array(lengths, pa.int32(), mask=~present)}


# --- image ------------------------------------------------------------------------------------
class PixelsExtractor(SequenceExtractor, ImageExtractor):
    """The image resized (shorter side) and center-cropped to ``size`` x ``size``, uint8,
    grayscale (``channels=1``, ITU-R 601 luma) or RGB (3): [size, size, channels]."""
    name = "pixels"
    version = "1"

    def __init__(self, size: int = 28, channels: int = 1):
        super().__init__(size)
        if channels not in (1, 3):
            raise ValueError(f"features.image.channels must be 1 or 3, got {channels!r}")
        self.channels = int(channels)
        self.dim = self.size * self.size * self.channels

    def params(self) -> dict:
        return {"size": self.size, "channels": self.channels, "resize": "shorter_side_center_crop",
                "layout": "HWC", "dtype": "uint8"}

    def row(self, rgb: np.ndarray) -> np.ndarray:
        if self.channels == 3:
            return np.ascontiguousarray(rgb, np.uint8)
        import cv2
        return cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2GRAY)[:, :, None]


# --- audio ------------------------------------------------------------------------------------
class LogMelFramesExtractor(SequenceExtractor, AudioExtractor):
    """Log-mel frames (dB, the frame convention of ``logmel_stats``), time first:
    float32 [min(frames, max_frames), n_mels]."""
    name = "logmel_frames"
    version = "1"

    def __init__(self, sample_rate: int = 16000, win_ms: float = 25.0, hop_ms: float = 10.0, n_mels: int = 80,
                 fmin: float = 0.0, fmax: Optional[float] = None, max_seconds: Optional[float] = 30.0,
                 max_frames: int = 100):
        super().__init__(FrameParams.from_ms(sample_rate, win_ms, hop_ms, n_mels, 0, fmin, fmax), max_seconds)
        self.max_frames = int(max_frames)
        self.dim = self.max_frames * self.p.n_mels

    def params(self) -> dict:
        return {**self.decode_params(), "max_frames": self.max_frames, "layout": "frames_x_mels"}

    def row(self, clip: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.logmel(clip).T[: self.max_frames], np.float32)


# --- text -------------------------------------------------------------------------------------
def tokenize(text: str) -> list[str]:
    """The words of ``text`` after mmbatch's text normalisation (NFKC, lower case, no punctuation)."""
    return normalize_text(text).split()


def build_vocabulary(texts: Iterable[Optional[str]], vocab_size: int = 10000, min_count: int = 1) -> list[str]:
    """[<pad>, <unk>, words by descending row count, then alphabetically]: at most ``vocab_size``
    entries; a word must occur in ``min_count`` texts."""
    counts: Counter = Counter()
    for t in texts:
        if t:
            counts.update(set(tokenize(t)))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return [PAD, UNK] + words[: max(0, vocab_size - 2)]


class TokensExtractor(SequenceExtractor, TextExtractor):
    """Word ids: int32 [min(words, max_tokens)], 1 (<unk>) for words outside the vocabulary."""
    name = "tokens"
    version = "1"

    def __init__(self, vocabulary: Optional[Sequence[str]] = None, max_tokens: int = 32):
        if not vocabulary:
            raise ValueError("features.text.extractor: tokens needs a vocabulary (preprocess builds it from the "
                             "train split; set features.text.vocabulary to give one)")
        if list(vocabulary[:2]) != [PAD, UNK]:
            raise ValueError(f"features.text.vocabulary must start with {PAD!r}, {UNK!r}, "
                             f"got {list(vocabulary[:2])}")
        self.vocabulary = list(vocabulary)
        self.ids = {w: i for i, w in enumerate(self.vocabulary)}
        self.max_tokens = int(max_tokens)
        self.dim = self.max_tokens

    def params(self) -> dict:
        return {"normalization": self.normalization, "tokenizer": "whitespace", "max_tokens": self.max_tokens,
                "vocab_size": len(self.vocabulary), "vocabulary": self.vocabulary}

    def row(self, text: str) -> np.ndarray:
        return np.array([self.ids.get(w, UNK_ID) for w in text.split()[: self.max_tokens]], np.int32)


# --- the driver's vocabulary pass -------------------------------------------------------------------
def train_vocabulary(plans: list, split_plan: dict, seed: int, vocab_size: int, min_count: int) -> list[str]:
    """The vocabulary of the texts in the rows whose final split is ``train``, over every dataset
    plan (``mmbatch.preprocess.plan.DatasetPlan``) that has text. The final split is decided as the
    units decide it (:func:`mmbatch.preprocess.splits.assign_splits`, same plan and seed); a partner dataset's
    own rows are split by the same rule."""
    import pyarrow.parquet as pq

    from mmbatch.engine import storage
    from mmbatch.preprocess.splits import assign_splits

    texts: list = []
    for p in plans:
        if "text" not in p.modalities:
            continue
        fs, _ = storage.url_to_fs(p.cfg.path)
        for f in p.files:
            t = pq.read_table(f, columns=["sample_id", "split", "text"], filesystem=fs)
            final = assign_splits(t.column("sample_id").to_pylist(), t.column("split").to_pylist(), split_plan, seed)
            texts += [x for x, s in zip(t.column("text").to_pylist(), final) if s == "train"]
    return build_vocabulary(texts, vocab_size, min_count)


def with_vocabulary(specs: dict, plans: list, split_plan: dict, seed: int) -> dict:
    """``specs`` with ``specs["text"]["vocabulary"]`` filled from the train split when the text
    extractor is ``tokens`` and no vocabulary was given."""
    text = specs.get("text") or {}
    if text.get("extractor") != "tokens" or text.get("vocabulary"):
        return specs
    vocab = train_vocabulary(plans, split_plan, seed, int(text["vocab_size"]), int(text["min_count"]))
    return {**specs, "text": {**text, "vocabulary": vocab}}


def sequence_run_fields(extractors: dict) -> dict[str, list[pa.Field]]:
    """The columns of each modality whose extractor is a sequence extractor (for
    :func:`mmbatch.schema.fused_schema`)."""
    return {m: ex.fields() for m, ex in extractors.items() if getattr(ex, "sequence", False)}


def columns_in_schema(modality: str, values: np.ndarray, present: np.ndarray, sch: pa.Schema) -> dict[str, pa.Array]:
    """:func:`sequence_columns` for the modality's fields of the table schema ``sch``."""
    names = (schema.seq_column(modality), schema.LENGTH_COLUMNS.get(modality))
    return sequence_columns(modality, values, present, [f for f in sch if f.name in names])


def row_arrays(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The rows of a sequence column as an object array of NumPy arrays (None where null): what
    a sequence extractor's ``extract`` returns, read back (pairing partners' rows)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    out = np.full(n, None, dtype=object)
    valid = np.flatnonzero(~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)) if n else []
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        flat = arr.values.slice(arr.offset * width, n * width).to_numpy(zero_copy_only=False).reshape(n, width)
        for i in valid:
            out[i] = flat[i]
        return out
    offsets = arr.offsets.to_numpy(zero_copy_only=False)
    inner = arr.values
    if pa.types.is_fixed_size_list(inner.type):
        k = inner.type.list_size
        values = inner.values.slice(inner.offset * k, len(inner) * k).to_numpy(zero_copy_only=False).reshape(-1, k)
    else:
        values = inner.to_numpy(zero_copy_only=False)
    for i in valid:
        out[i] = values[offsets[i]:offsets[i + 1]]
    return out
