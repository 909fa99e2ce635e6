"""The extractor contract shared by image, audio and text features.

An extractor turns one modality's raw values into a fixed-size float32
embedding, in two steps so the pipeline can place them apart:

- ``decode(items)`` -- CPU work (JPEG/FLAC/SPHERE decode, resize, text
  normalisation); output is compact (fixed-size arrays).
- ``encode(decoded)`` -- the model part; on a GPU when the worker has one and
  ``needs_model`` is true.

Preprocess runs both in the unit's worker; with ``features.gpu_shape: split`` a
model extractor's decode runs in CPU workers and its encode in one actor per GPU
(mmbatch.preprocess.run).

Both work on whole batches. A row that cannot be decoded gets an error
``(reason, detail)`` instead of a value; the pipeline quarantines it.
Extractors are deterministic and record their parameters (``params()``),
which go into the output metadata and the cache key.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

Error = Optional[tuple[str, str]]   # (reason code, human detail) or None


@dataclass
class Decoded:
    values: list[Any]          # per-row decoded value (None where errors[i] is set)
    errors: list[Error]


class Extractor(ABC):
    modality: str = ""
    name: str = ""
    version: str = "1"
    dim: int = 0
    needs_model: bool = False   # True: encode() loads a model (GPU-capable)
    sequence: bool = False      # True: per-row arrays, not a [n, dim] embedding (mmbatch.preprocess.features.sequence)

    @abstractmethod
    def params(self) -> dict:
        """Every parameter that changes the output (JSON-able)."""

    @abstractmethod
    def decode(self, items: Sequence[Any]) -> Decoded:
        """CPU part: raw items (bytes / str / None) -> decoded values and per-row errors."""

    @abstractmethod
    def encode(self, values: Sequence[Any]) -> np.ndarray:
        """float32 [len(values), dim] for successfully decoded values."""

    def describe(self) -> dict:
        return {"modality": self.modality, "name": self.name, "version": self.version,
                "dim": self.dim, "params": self.params()}

    def empty_rows(self, n: int) -> np.ndarray:
        """What :meth:`extract` returns for ``n`` rows before any is filled in."""
        return np.zeros((n, self.dim), dtype=np.float32)

    def extract(self, items: Sequence[Any]) -> tuple[np.ndarray, list[Error]]:
        """decode + encode in one call: ([n, dim] float32 with zero rows for errors, errors)."""
        dec = self.decode(items)
        out = self.empty_rows(len(items))
        ok = [i for i, e in enumerate(dec.errors) if e is None]
        if ok:
            out[ok] = self.encode([dec.values[i] for i in ok])
        return out, dec.errors

    def to(self, device: str) -> "Extractor":
        """Move model weights to ``device`` (no-op for model-free extractors)."""
        return self


def precision_autocast(device: str, precision: str, warn_fp16=None):
    """The autocast context of a model extractor's ``precision`` (fp32 | fp16 | bf16) on ``device``:
    none for fp32; fp16 or bf16 on CUDA; bf16 on CPU. fp16 off CUDA runs fp32, after ``warn_fp16(device
    type)`` (the caller says so once)."""
    from contextlib import nullcontext

    import torch

    dev = torch.device(device).type
    if precision == "fp32":
        return nullcontext()
    if dev == "cuda":
        return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    if precision == "bf16":
        return torch.autocast(dev, dtype=torch.bfloat16)
    if warn_fp16 is not None:
        warn_fp16(dev)
    return nullcontext()
