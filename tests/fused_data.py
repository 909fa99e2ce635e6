"""Generate small fused-feature Parquet folders for the training tests.

The default task needs fusion: 4 classes = 2 bits (a, b). The image embedding
encodes bit a, the audio embedding bit b, the text embedding a xor b, each as
a signed direction plus Gaussian noise. Any one modality alone can tell only
2 of the 4 classes apart (at best ~50 % accuracy); any two together determine
the class.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from benchmarks.audit_corpus import write_fused_folder
from mmbatch import schema

CLASS_NAMES = ["a0b0", "a0b1", "a1b0", "a1b1"]


def extractor_meta(dims: Mapping[str, int], **changes) -> dict:
    """Extractor metadata as preprocess records it; ``changes`` = {modality: {field: value}}."""
    base = {
        "image": {"name": "hog", "version": "1", "params": {"size": 64, "cell": 8}},
        "audio": {"name": "logmel_stats", "version": "1", "params": {"n_mels": 80, "sample_rate": 16000}},
        "text": {"name": "hashing", "version": "1", "params": {"ngram_range": [1, 2]}},
    }
    feats = {m: {**base[m], "dim": int(d)} for m, d in dims.items()}
    for m, ch in changes.items():
        feats[m].update(ch)
    return {"kind": "fused", "features": feats, "dims": dict(dims),
            "fusion": {"method": "concat", "dim": int(sum(dims.values()))}}


def xor_rows(n: int, seed: int = 0, dims: Optional[Mapping[str, int]] = None, noise: float = 0.5,
             splits: Optional[Sequence[Optional[str]]] = ("train", "dev", "test"),
             split_probs: Sequence[float] = (0.6, 0.2, 0.2), missing: float = 0.0) -> dict:
    """Columns of ``n`` fused rows. ``missing``: share of rows that lose one random modality
    (and a few that lose two), with has_<m> false and a null embedding."""
    dims = dict(dims or {"image": 8, "audio": 8, "text": 8})
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, n)
    b = rng.integers(0, 2, n)
    label = 2 * a + b
    bits = {"image": a, "audio": b, "text": a ^ b}
    cols: dict = {
        "sample_id": [f"s{seed}-{i:06d}" for i in range(n)],
        "source": ["synthetic"] * n,
        "split": (list(rng.choice(np.array(splits, dtype=object), n, p=split_probs)) if splits is not None
                  else [None] * n),
        "label": label.astype(np.int64),
        "label_name": [CLASS_NAMES[k] for k in label],
    }
    mods = [m for m in schema.MODALITIES if m in dims]
    present = np.ones((n, len(mods)), bool)
    if missing > 0:
        drop_one = rng.random(n) < missing
        which = rng.integers(0, len(mods), n)
        present[drop_one, which[drop_one]] = False
        drop_two = rng.random(n) < missing / 5           # some rows keep a single modality
        which2 = (which + 1) % len(mods)
        present[drop_two, which2[drop_two]] = False
    embs = {}
    for j, m in enumerate(mods):
        d = dims[m]
        direction = np.random.default_rng(1000 + j).normal(size=d)
        direction /= np.linalg.norm(direction)
        sign = np.where(bits.get(m, a) == 1, 1.0, -1.0)[:, None]
        e = 2.0 * sign * direction[None, :] + noise * rng.normal(size=(n, d))
        embs[m] = e.astype(np.float32)
    for j, m in enumerate(mods):
        cols[schema.emb_column(m)] = [e.tolist() if present[i, j] else None for i, e in enumerate(embs[m])]
    for j, m in enumerate(mods):
        cols[schema.has_column(m)] = present[:, j].tolist()
    cols["fused"] = np.concatenate([np.where(present[:, [j]], embs[m], 0) for j, m in enumerate(mods)], 1).tolist()
    return cols


def write_fused(path: str, n: int = 400, seed: int = 0, dims: Optional[Mapping[str, int]] = None,
                files: int = 2, meta: Optional[dict] = None, **kw) -> str:
    """Write ``n`` XOR rows as ``files`` Parquet files under ``path`` with the fused schema + metadata, and
    the ``_manifest.json`` preprocess writes last (readers refuse a fused folder without one)."""
    dims = dict(dims or {"image": 8, "audio": 8, "text": 8})
    cols = xor_rows(n, seed=seed, dims=dims, **kw)
    sch = schema.with_metadata(schema.fused_schema(dims, int(sum(dims.values()))),
                               meta if meta is not None else extractor_meta(dims))
    write_fused_folder(path, pa.Table.from_pydict(cols, schema=sch), files)
    return path
