"""Pairing rows across datasets and fusing per-modality embeddings (pure functions).

Pairing (which partner row joins which sample) lives in mmbatch/preprocess/fuse.py.

Fusion (the ``fused`` column):
- ``concat``: modality embeddings side by side (image, audio, text order),
  absent modalities zero-filled.
- ``weighted``: each modality projected to ``dim`` by a fixed seeded random
  projection (Gaussian, scaled by 1/sqrt(d_m)), then
  ``F = w_img*P_img x_img + w_txt*P_txt x_txt + w_audio*P_audio x_audio``
  over present modalities.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import pyarrow as pa

from mmbatch.schema import MODALITIES


def stable_u64(*parts: object) -> int:
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def fused_dim(method: str, dims: Mapping[str, int], dim: int) -> int:
    if method == "concat":
        return int(sum(dims[m] for m in MODALITIES if m in dims))
    return int(dim)


def projection(modality: str, in_dim: int, out_dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(stable_u64("proj", seed, modality, in_dim, out_dim))
    return (rng.standard_normal((in_dim, out_dim)) / np.sqrt(in_dim)).astype(np.float32)


def fuse(embs: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray], dims: Mapping[str, int],
         method: str = "concat", dim: int = 256, weights: Mapping[str, float] | None = None,
         seed: int = 0) -> np.ndarray:
    """Fused vectors [n, fused_dim] from per-modality [n, d_m] arrays and presence masks."""
    mods = [m for m in MODALITIES if m in dims]
    n = len(next(iter(present.values()))) if present else 0
    if method == "concat":
        parts = []
        for m in mods:
            x = embs.get(m)
            x = np.zeros((n, dims[m]), np.float32) if x is None else x.astype(np.float32, copy=True)
            if m in present:        # a modality this dataset (and its partners) lacks stays all zeros
                x[~present[m]] = 0.0
            parts.append(x)
        return np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.float32)
    if method == "weighted":
        weights = dict(weights or {})
        out = np.zeros((n, dim), np.float32)
        for m in mods:
            x = embs.get(m)
            if x is None:
                continue
            contrib = x.astype(np.float32) @ projection(m, dims[m], dim, seed)
            out += float(weights.get(m, 1.0)) * np.where(present[m][:, None], contrib, 0.0).astype(np.float32)
        return out
    raise ValueError(f"fusion.method must be 'concat' or 'weighted', got {method!r}")


def embeddings_to_numpy(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """fixed_size_list<float32>[dim] column (or a list column of that length) -> a new writable
    [n, dim] float32 array. A null row becomes zeros; every other value is kept as stored (a NaN
    stays NaN). Preprocess (fusion) and training read embeddings through this one function."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_fixed_size_list(arr.type):
        arr = arr.cast(pa.list_(pa.float32(), dim))
    n = len(arr)
    values = arr.values.slice(arr.offset * dim, n * dim).to_numpy(zero_copy_only=False)
    mat = values.astype(np.float32, copy=True).reshape(n, dim)
    if arr.null_count:
        mat[np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)] = 0.0
    return mat


def embeddings_to_arrow(x: np.ndarray, present: np.ndarray | None = None) -> pa.Array:
    """[n, dim] float32 -> fixed_size_list<float32> (null where not present)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, dim = x.shape
    arr = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)
    if present is not None and not np.all(present):
        mask = pa.array(~np.asarray(present, dtype=bool))
        arr = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim, mask=mask)
    return arr
