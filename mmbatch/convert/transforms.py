"""Conversions as a Ray Data stage over CANONICAL rows.

:class:`CompleteModality` is a ``map_batches`` callable: it fills one target
column only where that column is null, from a source column of the same row,
and appends the generated modality to the ``generated`` column::

    ds = ray.data.read_parquet(canonical)
    ds = ds.map_batches(CompleteModality("text-to-speech", source_column="label_name"),
                        **CompleteModality.RAY_OPTIONS)      # spoken class names for image rows

Values written (see :mod:`mmbatch.schema`):

- ``image``: ``{"bytes": PNG, "path": None}``
- ``audio``: ``{"bytes": FLAC 16 kHz mono 16-bit, "path": None}``, and ``sample_rate``,
  ``num_samples``, ``duration`` set for those rows
- ``text``: the string
- ``generated`` (string): comma-joined modalities generated for the row so far
  (``"audio"``, ``"audio,image"``), null where nothing was generated.

A media struct counts as null when it is null or has neither bytes nor path;
text counts as null when it is null. A row whose source is null is left alone.
No Ray import here: the callable is plain Python over pyarrow / pandas batches.
"""
from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from mmbatch.convert import SR, decode_rgb, encode_audio, encode_png
from mmbatch.schema import MEDIA

log = logging.getLogger("mmbatch.convert")

GENERATED = "generated"                 # column name
GENERATED_TYPE = pa.string()            # comma-joined modalities, or null

KINDS = {                               # kind -> (source modality, target modality)
    "image-to-speech": ("image", "audio"),
    "image-to-text": ("image", "text"),
    "text-to-image": ("text", "image"),
    "text-to-speech": ("text", "audio"),
}
COLUMN_TYPES = {"image": MEDIA, "audio": MEDIA, "text": pa.string()}
AUDIO_META = {"sample_rate": pa.int32(), "num_samples": pa.int64(), "duration": pa.float64()}


def is_missing(value: Any, modality: str) -> bool:
    """Null for this stage: None, NaN, or a media struct with neither bytes nor path."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:     # pandas NaN for a null
        return True
    if modality in ("image", "audio") and isinstance(value, dict):
        return not value.get("bytes") and not value.get("path")
    return False


def _source_value(value: Any, modality: str):
    """The usable source (image bytes or non-empty text), or None."""
    if is_missing(value, modality):
        return None
    if modality == "image":
        return value.get("bytes") if isinstance(value, dict) else value
    text = str(value)
    return text if text.strip() else None


def add_generated(previous: Any, modality: str) -> str:
    """``generated`` after adding ``modality`` (kept in order, no duplicates)."""
    parts = [] if is_missing(previous, "text") or previous == "" else str(previous).split(",")
    if modality not in parts:
        parts.append(modality)
    return ",".join(parts)


class CompleteModality:
    """Fill ``target`` where it is null by converting ``source_column`` (``kind`` says how).

    ``kind``: image-to-speech | image-to-text | text-to-image | text-to-speech.
    ``source_column``: default ``image`` for image kinds, ``text`` for text kinds
    (``label_name`` speaks or draws the class name). ``target``: the column to
    fill, default the kind's output modality. ``errors``: ``skip`` (default)
    leaves a row's target null when its conversion fails and logs it; ``raise``
    fails the batch.
    """

    # CPU work (subprocesses, OCR, synthesis), no model to load: run as tasks.
    RAY_OPTIONS = {"batch_format": "pyarrow", "batch_size": 16, "num_cpus": 1}

    def __init__(self, kind: str, source_column: str | None = None, target: str | None = None, *,
                 style: str = "plain", seconds: float = 1.0, voice: str | None = None, errors: str = "skip"):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        if errors not in ("skip", "raise"):
            raise ValueError("errors must be 'skip' or 'raise'")
        self.kind = kind
        self.source_modality, self.target_modality = KINDS[kind]
        self.source_column = source_column or self.source_modality
        self.target = target or self.target_modality
        self.style, self.seconds, self.voice, self.errors = style, float(seconds), voice, errors
        from mmbatch.convert.cli import check_tools
        check_tools(kind, style)          # missing tesseract / espeak-ng: fail in the driver, not in every task

    def __repr__(self) -> str:
        return (f"CompleteModality({self.kind!r}, source_column={self.source_column!r}, "
                f"target={self.target!r})")

    # --- one value --------------------------------------------------------------------
    def convert(self, source) -> dict:
        """Source value -> ``{target_value, [sample_rate, num_samples, duration]}``; raises on failure."""
        if self.kind == "image-to-speech":
            from mmbatch.convert.image_to_speech import image_to_waveform
            return self._audio(image_to_waveform(decode_rgb(source), seconds=self.seconds))
        if self.kind == "text-to-speech":
            from mmbatch.convert.text_to_speech import VOICE, synthesize
            return self._audio(synthesize(source, voice=self.voice or VOICE))
        if self.kind == "text-to-image":
            from mmbatch.convert.text_to_image import text_to_image
            return {"value": {"bytes": encode_png(text_to_image(source, style=self.style)), "path": None}}
        from mmbatch.convert.image_to_text import ocr_image
        text = ocr_image(decode_rgb(source))
        if not text:
            raise ValueError("OCR found no text")
        return {"value": text}

    def _audio(self, y) -> dict:
        return {"value": {"bytes": encode_audio(y, SR, "FLAC"), "path": None},
                "sample_rate": SR, "num_samples": int(y.size), "duration": y.size / float(SR)}

    # --- one batch --------------------------------------------------------------------
    def __call__(self, batch):
        cols = _Columns(batch)
        if self.source_column not in cols:
            raise KeyError(f"{self!r}: batch has no column {self.source_column!r} (columns: {cols.names})")
        n = len(cols)
        src = cols.get(self.source_column)
        tgt = cols.get(self.target) if self.target in cols else [None] * n
        gen = cols.get(GENERATED) if GENERATED in cols else [None] * n
        gen = [None if is_missing(g, "text") else g for g in gen]
        set_meta = self.target == "audio" and self.target_modality == "audio"
        meta = {k: (cols.get(k) if k in cols else [None] * n) for k in AUDIO_META} if set_meta else {}
        failed = 0
        for i in range(n):
            if not is_missing(tgt[i], self.target_modality):
                continue
            s = _source_value(src[i], self.source_modality)
            if s is None:
                continue
            try:
                out = self.convert(s)
            except Exception as e:
                if self.errors == "raise":
                    raise
                failed += 1
                log.warning("%s: row %d: %s: %s", self.kind, i, type(e).__name__, e)
                continue
            tgt[i] = out["value"]
            gen[i] = add_generated(gen[i], self.target_modality)
            for k in meta:
                meta[k][i] = out[k]
        if failed:
            log.warning("%s: %d of %d rows not converted", self.kind, failed, n)
        cols.set(self.target, tgt, COLUMN_TYPES[self.target_modality])
        for k, t in AUDIO_META.items():
            if k in meta:
                cols.set(k, meta[k], t)
        cols.set(GENERATED, gen, GENERATED_TYPE)
        return cols.result()


class _Columns:
    """Read and replace whole columns of a pyarrow Table, pandas DataFrame or dict of arrays alike."""

    def __init__(self, batch):
        self.batch = batch
        if isinstance(batch, pa.Table):
            self.kind = "arrow"
            self.names = list(batch.column_names)
        elif isinstance(batch, dict):
            self.kind = "dict"
            self.names = list(batch)
        else:                                              # pandas.DataFrame
            self.kind = "pandas"
            self.names = [str(c) for c in batch.columns]

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __len__(self) -> int:
        if self.kind == "arrow":
            return self.batch.num_rows
        if self.kind == "dict":
            return len(next(iter(self.batch.values()))) if self.batch else 0
        return len(self.batch)

    def get(self, name: str) -> list:
        if self.kind == "arrow":
            return self.batch.column(name).to_pylist()
        if self.kind == "dict":
            return list(self.batch[name])
        return self.batch[name].tolist()

    def set(self, name: str, values: list, type_: pa.DataType) -> None:
        if self.kind == "arrow":
            arr = pa.array(values, type=type_)
            if name in self.names:
                i = self.batch.column_names.index(name)
                self.batch = self.batch.set_column(i, pa.field(name, type_), arr)
            else:
                self.batch = self.batch.append_column(pa.field(name, type_), arr)
                self.names.append(name)
        elif self.kind == "dict":
            import numpy as np
            if pa.types.is_struct(type_) or pa.types.is_string(type_):
                out = np.empty(len(values), dtype=object)
                out[:] = values
            else:
                out = pa.array(values, type=type_).to_numpy(zero_copy_only=False)
            self.batch[name] = out
            if name not in self.names:
                self.names.append(name)
        else:
            import pandas as pd
            if pa.types.is_struct(type_) or pa.types.is_string(type_):
                self.batch[name] = pd.Series(values, index=self.batch.index, dtype=object)
            else:
                dtype = {pa.int32(): "Int32", pa.int64(): "Int64", pa.float64(): "Float64"}.get(type_, object)
                self.batch[name] = pd.array(values, dtype=dtype)
            if name not in self.names:
                self.names.append(name)

    def result(self):
        return self.batch
