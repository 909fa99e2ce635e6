"""An AV-shaped fused corpus with planted label errors and mismatched pairs, and the truth to score against.

Every row is one sample of ``classes`` classes with an image and an audio embedding (and optionally a
text one). Each modality's embedding is its class's prototype plus Gaussian noise (``noise``), so each
modality alone tells the classes apart imperfectly and together they do better, as in a real
audio-visual corpus with frozen encoders. Then, among the **train** rows only:

- ``label_noise`` of them are relabelled to another class (planted label errors);
- ``mismatch`` of them get another class's image or audio (a fresh sample of a random other class,
  the modality chosen at random): planted mismatched pairs, label unchanged.

Written as fused Parquet (the schema, metadata and ``_manifest.json`` that `mmbatch preprocess`
writes, splits final), so the audit reads it like any preprocess output. Used by tests/test_audit.py
and ``python -m benchmarks.audit``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmbatch import schema


@dataclass
class PlantedCorpus:
    path: str
    n: int
    label_errors: set = field(default_factory=set)             # sample ids relabelled
    mismatched: dict = field(default_factory=dict)             # sample id -> the modality swapped
    true_label: dict = field(default_factory=dict)             # sample id -> class before relabelling


def _meta(dims: dict) -> dict:
    names = {"image": "hog", "audio": "logmel_stats", "text": "hashing"}
    return {"kind": "fused", "splits_final": True, "dims": dict(dims),
            "features": {m: {"name": names[m], "version": "1", "params": {}, "dim": int(d)} for m, d in dims.items()},
            "fusion": {"method": "concat", "dim": int(sum(dims.values()))}}


def build_corpus(path: str, n: int = 2000, classes: int = 6, dims: dict | None = None, noise: float = 1.0,
                 label_noise: float = 0.05, mismatch: float = 0.05, seed: int = 0, files: int = 2,
                 split_probs=(0.7, 0.15, 0.15)) -> PlantedCorpus:
    """Write the corpus under ``path`` and return what was planted."""
    dims = dict(dims or {"image": 32, "audio": 24})
    rng = np.random.default_rng(seed)
    mods = [m for m in schema.MODALITIES if m in dims]
    protos = {m: rng.normal(size=(classes, dims[m])) * 2.0 / np.sqrt(dims[m]) * 1.6 for m in mods}
    y = rng.integers(0, classes, n)
    split = rng.choice(np.array(["train", "validation", "test"], dtype=object), n, p=list(split_probs))
    ids = [f"av{seed}-{i:06d}" for i in range(n)]

    def sample(m, cls):
        return protos[m][cls] + noise * rng.normal(size=(len(cls), dims[m])) / np.sqrt(dims[m]) * 1.6

    emb = {m: sample(m, y) for m in mods}
    train = np.flatnonzero(split == "train")
    picked = rng.permutation(train)
    n_le, n_mm = int(round(label_noise * len(train))), int(round(mismatch * len(train)))
    le_rows, mm_rows = picked[:n_le], picked[n_le:n_le + n_mm]
    corpus = PlantedCorpus(path=str(path), n=n)
    given = y.copy()
    for i in le_rows:
        given[i] = (y[i] + rng.integers(1, classes)) % classes
        corpus.label_errors.add(ids[i])
        corpus.true_label[ids[i]] = int(y[i])
    swap_mods = [m for m in mods if m in ("image", "audio")] or mods
    for i in mm_rows:
        m = swap_mods[rng.integers(len(swap_mods))]
        other = (y[i] + rng.integers(1, classes)) % classes
        emb[m][i] = sample(m, np.array([other]))[0]
        corpus.mismatched[ids[i]] = m
    _write(path, ids, split, given, emb, dims, classes, files)
    return corpus


def _write(path, ids, split, label, emb, dims, classes, files) -> None:
    n = len(ids)
    sch = schema.with_metadata(schema.fused_schema(dims, int(sum(dims.values()))), _meta(dims))
    cols = {"sample_id": ids, "source": ["av"] * n, "split": list(split), "label": label.astype(np.int64),
            "label_name": [f"class{k}" for k in label]}
    for m in dims:
        cols[schema.emb_column(m)] = emb[m].astype(np.float32).tolist()
    for m in dims:
        cols[schema.has_column(m)] = [True] * n
    cols["fused"] = np.concatenate([emb[m] for m in dims], axis=1).astype(np.float32).tolist()
    write_fused_folder(path, pa.Table.from_pydict(cols, schema=sch), files)


def write_fused_folder(path: str, table: pa.Table, files: int) -> list[str]:
    """``table`` (fused schema with its metadata) as ``files`` Parquet parts under ``path``, then the
    ``_manifest.json`` preprocess writes last (readers refuse a fused folder without one)."""
    n = table.num_rows
    os.makedirs(path, exist_ok=True)
    per = -(-n // files)
    names = [f"part-{k:05d}.parquet" for k in range(files)]
    for k, name in enumerate(names):
        pq.write_table(table.slice(k * per, per), os.path.join(path, name))
    meta = {k: v for k, v in schema.read_mmbatch_meta(table.schema).items() if k != "schema_version"}
    with open(os.path.join(path, "_manifest.json"), "w") as f:
        json.dump({"kind": "fused", "rows": n, "files": names, "metadata": meta}, f)
    return names


def score(corpus: PlantedCorpus, issues: pa.Table) -> dict:
    """Precision and recall of the audit's flagged rows against what was planted, per kind."""
    from mmbatch.audit.score import precision_recall

    kinds = issues.column("kind").to_pylist()
    ids = issues.column("sample_id").to_pylist()
    le = {i for i, k in zip(ids, kinds) if k == "label_error"}
    mm = {i for i, k in zip(ids, kinds) if k.startswith("mismatched_")}
    right_modality = sum(1 for i, k in zip(ids, kinds)
                         if k.startswith("mismatched_") and corpus.mismatched.get(i) == k.split("_", 1)[1])
    out = {"label_error": precision_recall(le, corpus.label_errors),
           "mismatched": precision_recall(mm, set(corpus.mismatched))}
    out["mismatched"]["right_modality"] = right_modality
    return out
