"""Candidate pairs without an all-pairs comparison: pure functions over signature arrays, no Ray.

* exact: rows grouped by key (a sort, O(n log n));
* images and audio: k nearest neighbours of each embedding in a faiss HNSW graph
  (O(n log n) to build and query), kept when the cosine clears a loose bar;
* text: MinHash LSH banding of datasketch MinHashes (a sort per band, O(n log n)).

Every candidate then goes to a verifier (signatures.*_similarity); these
functions only have to keep true copies in, not look-alikes out.
"""
from __future__ import annotations

import os

import numpy as np

KNN = 10                  # neighbours per row: a copy is nearer than any look-alike, groups are small
KNN_MIN_COSINE = 0.9      # copies measured >= 0.99 on the candidate embeddings (planted corpus)
HNSW_M = 16
HNSW_EF = 40            # efConstruction; efSearch = max(this, 2 k)
MAX_GROUP_PAIRS = 64
# MinHash banding (128 values): 32 bands of 4. A pair of Jaccard J shares a band with probability
# 1 - (1 - J^4)^32: 0.87 at J = 0.5 (the verify threshold), 0.99 at 0.6, 1e-5 at 0.05.
LSH_BANDS = 32
LSH_ROWS = 4      # an exact group larger than this gives a star (each member with the first)


def group_by_key(keys: list) -> list[np.ndarray]:
    """Index arrays of the rows that share a key (None keys never group); only groups of >= 2."""
    order: dict = {}
    for i, k in enumerate(keys):
        if k is not None:
            order.setdefault(k, []).append(i)
    return [np.asarray(v, np.int64) for v in order.values() if len(v) > 1]


def group_pairs(group: np.ndarray) -> np.ndarray:
    """Pairs (n x 2) inside one group of rows: all of them, or a star for very large groups."""
    n = len(group)
    if n * (n - 1) // 2 <= MAX_GROUP_PAIRS:
        i, j = np.triu_indices(n, 1)
        return np.stack([group[i], group[j]], axis=1)
    return np.stack([np.full(n - 1, group[0]), group[1:]], axis=1)


def knn_pairs(emb: np.ndarray, k: int = KNN, min_cosine: float = KNN_MIN_COSINE) -> np.ndarray:
    """Unique (i < j) pairs where j is among i's k nearest neighbours by inner product (the
    embeddings are unit vectors) and the cosine is >= ``min_cosine``."""
    import faiss

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = emb.shape[0]
    if n < 2:
        return np.empty((0, 2), np.int64)
    # the driver runs this while the workers wait for candidates: every core of this machine
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = faiss.IndexHNSWFlat(emb.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF
    index.hnsw.efSearch = max(HNSW_EF, 2 * k)
    index.add(emb)
    kk = min(k + 1, n)
    sims, nbrs = index.search(emb, kk)
    rows = np.repeat(np.arange(n), kk)
    nbrs, sims = nbrs.ravel(), sims.ravel()
    keep = (nbrs >= 0) & (nbrs != rows) & (sims >= min_cosine)
    return unique_pairs(rows[keep], nbrs[keep])


def minhash_pairs(minhashes: np.ndarray, bands: int = None, rows: int = None) -> np.ndarray:
    """Unique (i < j) pairs of rows (MinHash values, n x num_perm uint32) that agree on all
    ``rows`` values of at least one of ``bands`` bands: the banding of MinHash LSH.

    datasketch computes the MinHashes (on the workers); its MinHashLSH index inserts and
    queries one key at a time in Python (0.3-0.5 ms a row measured here, 100 s at 200,000
    rows), so the driver bands the whole matrix with numpy instead: a sort per band.
    """
    bands = bands or LSH_BANDS
    rows = rows or LSH_ROWS
    m = np.ascontiguousarray(minhashes, dtype=np.uint32)
    n = m.shape[0]
    if n < 2:
        return np.empty((0, 2), np.int64)
    a, b = [], []
    mult = (np.uint64(0x9E3779B97F4A7C15) ** np.arange(rows, dtype=np.uint64)).astype(np.uint64)
    for k in range(bands):
        with np.errstate(over="ignore"):
            key = (m[:, k * rows:(k + 1) * rows].astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        sizes = np.diff(np.r_[starts, n])
        for st, sz in zip(starts[sizes > 1], sizes[sizes > 1]):
            p = group_pairs(order[st:st + sz])
            a.append(p[:, 0])
            b.append(p[:, 1])
    if not a:
        return np.empty((0, 2), np.int64)
    return unique_pairs(np.concatenate(a), np.concatenate(b))


def unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs = np.stack([lo, hi], axis=1).astype(np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)
