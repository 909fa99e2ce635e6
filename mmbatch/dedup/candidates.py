"""Candidate pairs without an all-pairs comparison: pure functions over signature arrays, no Ray.

* exact: rows grouped by key (a sort, O(n log n));
* images and audio: k nearest neighbours of each embedding among the rows of its nearest
  k-means lists (an inverted file, O(n) to search), kept when the cosine clears a loose bar;
* text: MinHash LSH banding of datasketch MinHashes (a sort per band, O(n log n)).

Every candidate then goes to a verifier (signatures.*_similarity); these
functions only have to keep true copies in, not look-alikes out.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KNN = 10                  # neighbours per row: a copy is nearer than any look-alike, groups are small
KNN_MIN_COSINE = 0.9      # copies measured >= 0.99 on the candidate embeddings (planted corpus)
IVF_LIST_ROWS = 256     # rows per inverted list (k-means cluster): the number of lists grows with n
IVF_NPROBE = 8          # lists each row searches: recall of the candidates >= 0.99 (synthetic copies)
IVF_TRAIN_PER_LIST = 32  # k-means: rows of the training sample per list, and iterations
IVF_NITER = 10
BLOCK_CELLS = 1 << 22   # similarities computed at once (16 MiB of float32)
MAX_GROUP_PAIRS = 64      # a group with more pairs than this gives a star (each member with the first)
FULL_GROUP = max(g for g in range(2, 64) if g * (g - 1) // 2 <= MAX_GROUP_PAIRS)     # 11 rows
# MinHash banding (128 values): 32 bands of 4. A pair of Jaccard J shares a band with probability
# 1 - (1 - J^4)^32: 0.87 at J = 0.5 (the verify threshold), 0.99 at 0.6, 1e-5 at 0.05.
LSH_BANDS = 32
LSH_ROWS = 4


def group_by_key(keys) -> list[np.ndarray]:
    """Index arrays of the rows that share a key (None keys never group); only groups of >= 2,
    in the order of their first rows. ``keys``: a list or an Arrow (chunked) array."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    enc = pc.dictionary_encode(keys if isinstance(keys, pa.Array) else pa.array(keys))
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]]) if len(sc) else np.empty(0, np.int64)
    sizes = np.diff(np.r_[starts, len(sc)])
    multi = (sizes > 1) & (sc[starts] >= 0)
    return [order[st:st + sz] for st, sz in zip(starts[multi], sizes[multi])]


def group_pairs(group: np.ndarray) -> np.ndarray:
    """Pairs (n x 2) inside one group of rows: all of them, or a star for very large groups."""
    n = len(group)
    if n <= FULL_GROUP:
        i, j = np.triu_indices(n, 1)
        return np.stack([group[i], group[j]], axis=1)
    return np.stack([np.full(n - 1, group[0]), group[1:]], axis=1)


def knn_pairs(emb: np.ndarray, k: int = KNN, min_cosine: float = KNN_MIN_COSINE) -> np.ndarray:
    """Unique (i < j) pairs where j is among i's k nearest neighbours by inner product (the
    embeddings are unit vectors) and the cosine is >= ``min_cosine``.

    An inverted-file search done as a blocked self-join: faiss k-means puts ~IVF_LIST_ROWS rows
    in each list (the number of lists grows with n), each row is stored in its nearest list and
    probes its IVF_NPROBE nearest lists, and each list is one matrix product of its probing rows
    with its stored rows. A row's cost is then constant (IVF_NPROBE x IVF_LIST_ROWS products), so
    the search grows linearly with n. Measured on the shared 2-core VM with the synthetic
    signatures of benchmarks/duplicates.py, 50,000 -> 200,000 rows: faiss HNSW 1.8 -> 36 s;
    faiss IndexIVFFlat.search over the same lists and probes 0.85 -> 4.4 CPU s (its per-query
    heaps); this join 0.8 -> 3.1 CPU s, and at 50,000 rows the same 1,933 pairs as an exact search.
    With at most IVF_NPROBE lists (n < (IVF_NPROBE + 1) x IVF_LIST_ROWS) it is the exact search.
    """
    import faiss

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    if n < 2:
        return np.empty((0, 2), np.int64)
    nlist = max(1, n // IVF_LIST_ROWS)
    nprobe = min(nlist, IVF_NPROBE)
    if nlist > 1:
        faiss.omp_set_num_threads(os.cpu_count() or 1)     # the driver's k-means: every core here
        sample = np.random.default_rng(0).choice(n, min(n, IVF_TRAIN_PER_LIST * nlist), replace=False)
        km = faiss.Kmeans(d, nlist, niter=IVF_NITER, spherical=True, seed=1,
                          max_points_per_centroid=IVF_TRAIN_PER_LIST, min_points_per_centroid=1)
        km.train(emb[np.sort(sample)])
        _, probes = km.index.search(emb, nprobe)            # n x nprobe, nearest list first
    else:
        probes = np.zeros((n, 1), np.int64)
    stored_order = np.argsort(probes[:, 0], kind="stable")
    stored_bounds = np.searchsorted(probes[stored_order, 0], np.arange(nlist + 1))
    probe_rows = np.repeat(np.arange(n), nprobe)
    probe_order = np.argsort(probes.ravel(), kind="stable")
    probe_bounds = np.searchsorted(probes.ravel()[probe_order], np.arange(nlist + 1))
    qs, ss, sims = [], [], []
    for c in range(nlist):
        stored = stored_order[stored_bounds[c]:stored_bounds[c + 1]]
        probing = probe_rows[probe_order[probe_bounds[c]:probe_bounds[c + 1]]]
        step = max(1, BLOCK_CELLS // max(1, len(stored)))        # a dense list: in slices
        for q0 in range(0, len(probing) if len(stored) else 0, step):
            query = probing[q0:q0 + step]
            block = emb[query] @ emb[stored].T
            qi, si = np.nonzero(block >= min_cosine)
            keep = query[qi] != stored[si]
            q, s, sim = _top_k(query[qi[keep]], stored[si[keep]], block[qi[keep], si[keep]], k)
            qs.append(q)
            ss.append(s)
            sims.append(sim)
    if not qs:
        return np.empty((0, 2), np.int64)
    q, s, _ = _top_k(np.concatenate(qs), np.concatenate(ss), np.concatenate(sims), k)
    return unique_pairs(q, s)


def _top_k(q: np.ndarray, s: np.ndarray, sim: np.ndarray, k: int):
    """The k most similar (q, s, sim) of each q: a row in a dense cluster keeps k candidates."""
    order = np.lexsort((-sim, q))
    q, s, sim = q[order], s[order], sim[order]
    keep = np.arange(len(q)) - np.searchsorted(q, q, side="left") < k
    return q[keep], s[keep], sim[keep]


def minhash_pairs(minhashes: np.ndarray, bands: int = None, rows: int = None) -> np.ndarray:
    """Unique (i < j) pairs of rows (MinHash values, n x num_perm uint32) that agree on all
    ``rows`` values of at least one of ``bands`` bands: the banding of MinHash LSH.

    datasketch computes the MinHashes (on the workers); its MinHashLSH index inserts and
    queries one key at a time in Python (docs/duplicates.md), so the driver bands the whole
    matrix with numpy instead: a sort per band.
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
        p = run_pairs(order, key[order])
        a.append(p[:, 0])
        b.append(p[:, 1])
    return unique_pairs(np.concatenate(a), np.concatenate(b))


def run_pairs(order: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """:func:`group_pairs` of every run of equal ``sorted_keys`` (rows ``order``), vectorised:
    a Python loop over the groups of each band took 3.5 of the 4.8 s of banding 200,000 texts."""
    n = len(sorted_keys)
    new_run = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    run = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    size = np.diff(np.r_[starts, n])[run]
    pos = np.flatnonzero((size > 1) & (size <= FULL_GROUP))     # all pairs of small groups
    a, b = [], []
    for d in range(1, FULL_GROUP):
        p = pos[pos + d < n]
        p = p[run[p + d] == run[p]]
        a.append(order[p])
        b.append(order[p + d])
    star = np.flatnonzero((size > FULL_GROUP) & ~new_run)           # larger groups: a star
    a.append(order[starts[run[star]]])
    b.append(order[star])
    return np.stack([np.concatenate(a), np.concatenate(b)], axis=1).astype(np.int64)


def unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted unique (lo, hi) rows of the pairs a[i]-b[i], either order (one int64 key a pair)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if not len(a):
        return np.empty((0, 2), np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    width = int(hi.max()) + 1
    key = np.unique(lo * width + hi)
    return np.stack([key // width, key % width], axis=1)
