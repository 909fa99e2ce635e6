"""Sequence features (pixels, log-mel frames, token ids) as training reads them (pure).

Fused data preprocessed with ``features.image.extractor: pixels``, ``features.audio.extractor:
logmel_frames`` or ``features.text.extractor: tokens`` holds, per modality, a sequence column
(and a length column) instead of an ``<m>_emb`` embedding; see :mod:`mmbatch.schema`. In the
model-ready arrays of :func:`mmbatch.train.data.to_arrays` the modality's input is still
``<m>_emb``, padded with zeros to the extractor's ``dim``:

- image: uint8 [n, size*size*channels]
- audio: float32 [n, max_frames, n_mels], true lengths int64 [n] in ``audio_len``
- text:  int64 [n, max_tokens] token ids, true lengths in ``text_len``

(the model cuts each batch to its longest row: see :mod:`mmbatch.train.encoders`).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from mmbatch import schema
from mmbatch.errors import UsageError
from mmbatch.schema import SEQUENCE_EXTRACTOR_NAMES, SEQUENCE_EXTRACTORS


def sequence_dims(sch: pa.Schema) -> dict[str, int]:
    """modality -> padded input size, for the sequence columns of a fused schema (from its metadata)."""
    feats = schema.read_mmbatch_meta(sch).get("features") or {}
    out = {}
    for m, col in schema.SEQUENCE_COLUMNS.items():
        if col in sch.names:
            if "dim" not in (feats.get(m) or {}):
                raise UsageError(f"column {col} has no extractor metadata (features.{m}.dim): not written by "
                                 "`mmbatch preprocess`")
            out[m] = int(feats[m]["dim"])
    return out


def sequence_column_names(modalities: Sequence[str]) -> list[str]:
    """The sequence and length columns the modalities may have."""
    return [c for m in modalities for c in (schema.SEQUENCE_COLUMNS.get(m), schema.LENGTH_COLUMNS.get(m)) if c]


def sequence_input(table: pa.Table, m: str, dim: int) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(padded input, valid rows, lengths or None) of modality ``m`` in ``table`` (see the module doc)."""
    arr = table.column(schema.seq_column(m)).combine_chunks()
    n = len(arr)
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool) if n else np.zeros(0, bool)
    if m == "image":
        width = arr.type.list_size
        if width != dim:
            raise UsageError(f"column {schema.seq_column(m)} holds {width} pixels a row, its metadata says {dim}")
        flat = arr.values.slice(arr.offset * width, n * width).to_numpy(zero_copy_only=False)
        out = np.array(flat, np.uint8).reshape(n, width)
        out[~valid] = 0
        return out, valid, None
    offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), np.int64)
    if m == "audio":
        n_mels = arr.type.value_type.list_size
        inner = arr.values
        flat = inner.values.slice(inner.offset * n_mels, len(inner) * n_mels).to_numpy(zero_copy_only=False)
        values, width, dtype = flat.reshape(-1, n_mels), dim // n_mels, np.float32
        out = np.zeros((n, width, n_mels), dtype)
    else:
        values, width, dtype = np.asarray(arr.values.to_numpy(zero_copy_only=False)), dim, np.int64
        out = np.zeros((n, width), dtype)
    lengths = np.minimum(np.diff(offsets), width) * valid
    rows = np.repeat(np.arange(n), lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, within] = values[offsets[:-1][rows] + within]
    return out, valid, lengths.astype(np.int64)


def check_encoders(encoders: Mapping[str, str], features: Mapping[str, Mapping], uri: str) -> dict[str, str]:
    """The learned encoder of each modality (``train.encoders``, frozen ones left out), checked
    against the features the data holds (``features``: modality -> extractor description)."""
    out = {}
    for m, f in features.items():
        kind, name, seq = encoders.get(m, "frozen"), f.get("name"), SEQUENCE_EXTRACTORS[m]
        if kind == "frozen" and name in SEQUENCE_EXTRACTOR_NAMES[m]:
            from mmbatch.train.encoders import ENCODERS
            raise UsageError(f"train.encoders.{m}: frozen needs an embedding, but {uri} holds {m} sequence features "
                             f"({name}): set train.encoders.{m}: {ENCODERS[m]}")
        if kind != "frozen" and name not in SEQUENCE_EXTRACTOR_NAMES[m]:
            raise UsageError(f"train.encoders.{m}: {kind} learns from features.{m}.extractor: {seq}, but {uri} holds "
                             f"{name!r} features: preprocess with features.{m}.extractor: {seq}, or set "
                             f"train.encoders.{m}: frozen")
        if kind != "frozen":
            out[m] = kind
    return out
