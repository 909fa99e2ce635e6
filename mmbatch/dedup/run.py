"""`mmbatch duplicates`: signatures on Ray, candidates on the driver, verification on Ray.

1. One Ray task per canonical shard reads the shard's media and text and returns
   two objects: a small Arrow table (ids, split, exact key, candidate embedding or
   MinHash per modality) that comes to the driver, and the verify payloads
   (thumbnails, log-mels, shingle hashes), which stay in the object store.
2. The driver groups exact keys, keeps one representative per group, and finds
   near candidates among the representatives (k-means inverted lists, MinHash LSH).
3. Verify tasks score the candidates with the payloads of the shards they touch.
4. Pairs, summary.json and report.html are written to the output folder.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmbatch import schema
from mmbatch.engine import storage
from mmbatch.dedup import candidates as cand
from mmbatch.dedup import signatures as sig
from mmbatch.errors import UsageError
from mmbatch.engine.manifest import data_files
from mmbatch.schema import MODALITIES, normalize_split

log = logging.getLogger("mmbatch.dedup")

SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}
VERIFY_CHUNK = 4000
THRESHOLDS = sig.THRESHOLDS
# the signals each verifier reports (pairs.parquet columns); the last is the score held against the threshold
SIGNALS = {"image": ("structure", "colour", "score"), "audio": ("audio_corr", "audio_lag_ms", "score"),
           "text": ("text_jaccard", "score")}
SIGNAL_COLUMNS = ("structure", "colour", "audio_corr", "audio_lag_ms", "text_jaccard")
HASH_COLUMNS = {"image": "image_hash", "audio": "audio_hash"}     # written by ingest (schema.py)

PAIR_SCHEMA = pa.schema([
    ("a_dataset", pa.string()), ("a_sample_id", pa.string()), ("a_split", pa.string()),
    ("b_dataset", pa.string()), ("b_sample_id", pa.string()), ("b_split", pa.string()),
    ("modality", pa.string()), ("kind", pa.string()), ("similarity", pa.float64()),
    *[(c, pa.float64()) for c in SIGNAL_COLUMNS], ("group", pa.int64()),
])
GROUP_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("sample_id", pa.string()), ("split", pa.string()), ("modality", pa.string()),
    ("group", pa.int64()), ("group_size", pa.int64()), ("first", pa.bool_()),
])
SIG_SCHEMA = pa.schema([
    ("row", pa.int64()), ("sample_id", pa.string()), ("split", pa.string()), ("modality", pa.string()),
    ("exact", pa.string()), ("emb", pa.list_(pa.float32())), ("minhash", pa.list_(pa.uint32())),
])


@dataclass(frozen=True)
class Shard:
    dataset: str
    uri: str            # dataset root URI
    path: str           # file path within the dataset's filesystem


def list_shards(datasets: list[str]) -> list[Shard]:
    """Canonical Parquet shards of each dataset (a folder's committed data files, with or without a manifest:
    mmbatch.engine.manifest.data_files, or a single file); the dataset name is its folder's name."""
    shards, names = [], set()
    for uri in datasets:
        fs, files, _ = data_files(uri, allow_incomplete=True)
        root = storage.url_to_fs(uri)[1]
        if not files:
            raise UsageError(f"{uri}: no Parquet shards (is it a canonical folder written by `mmbatch ingest`?)")
        name = root.rstrip("/").rsplit("/", 1)[-1] or "dataset"
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        shards += [Shard(name, uri, f) for f in files]
    return shards


# --- 1. signatures (one shard; runs in a Ray task, callable without Ray) ------------------------------
def shard_signatures(shard: Shard) -> tuple[pa.Table, list]:
    """(signature table, verify payloads aligned with its rows) of one canonical shard."""
    fs, _ = storage.url_to_fs(shard.uri)
    file_schema = pq.read_schema(shard.path, filesystem=fs)
    names = file_schema.names
    # hashes written with another function (or none) are computed again from the bytes
    if schema.read_mmbatch_meta(file_schema).get("content_hash") != sig.HASH_NAME:
        names = [n for n in names if n not in HASH_COLUMNS.values()]
    if "sample_id" not in names:
        raise UsageError(f"{shard.path}: no sample_id column (not canonical mmbatch data)")
    cols = [c for c in ("sample_id", "split", *MODALITIES, *HASH_COLUMNS.values()) if c in names]
    t = pq.read_table(shard.path, filesystem=fs, columns=cols)
    ids = t.column("sample_id").to_pylist()
    splits = t.column("split").to_pylist() if "split" in names else [None] * t.num_rows
    out = defaultdict(list)
    payloads = []

    def add(i, modality, exact, emb=None, minhash=None, payload=None):
        out["row"].append(i)
        out["sample_id"].append(ids[i])
        out["split"].append(normalize_split(splits[i]))
        out["modality"].append(modality)
        out["exact"].append(exact)
        out["emb"].append(None if emb is None else emb.tolist())
        out["minhash"].append(None if minhash is None else minhash.tolist())
        payloads.append(payload)

    for m, fn in (("image", sig.image_signature), ("audio", sig.audio_signature)):
        if m not in names:
            continue
        media = t.column(m).combine_chunks()
        data = media.field("bytes").to_pylist()
        known = t.column(HASH_COLUMNS[m]).to_pylist() if HASH_COLUMNS[m] in names else [None] * t.num_rows
        for i, b in enumerate(data):
            if not b:
                continue
            key = known[i] or sig.content_hash(b)
            try:
                emb, payload = fn(b)
            except Exception as e:          # undecodable or silent: still an exact key, no near signature
                log.debug("%s %s: %s", m, ids[i], e)
                emb = payload = None
            add(i, m, key, emb=emb, payload=payload)
    if "text" in names:
        for i, text in enumerate(t.column("text").to_pylist()):
            key = sig.text_key(text)
            if key is None:
                continue
            hashes = sig.shingle_hashes(text)
            mh = None if hashes is None else np.asarray(sig.text_minhash(hashes).hashvalues, np.uint32)
            add(i, "text", key, minhash=mh, payload=hashes)
    return pa.table(dict(out), schema=SIG_SCHEMA) if out else SIG_SCHEMA.empty_table(), payloads


# --- 3. verification ---------------------------------------------------------------------------------
def verify_pairs(modality: str, sa: np.ndarray, la: np.ndarray, sb: np.ndarray, lb: np.ndarray,
                 shard_ids: list[int], *payloads) -> np.ndarray:
    """Signals (n x len(SIGNALS[modality]), the score last) of candidate pairs, given as (shard,
    slot) of each side, from the payloads of ``shard_ids`` (each indexable by slot: a shard's
    payload list, or a dict of the picked ones); a pair with a missing payload scores 0."""
    by_shard = dict(zip(shard_ids, payloads))
    names = SIGNALS[modality]
    out = np.zeros((len(sa), len(names)), np.float64)
    for n in range(len(sa)):
        x, y = by_shard[int(sa[n])][int(la[n])], by_shard[int(sb[n])][int(lb[n])]
        if x is not None and y is not None:
            got = signals(modality, x, y)
            out[n] = [got[k] for k in names]
    return out


def signals(modality: str, x, y) -> dict:
    """The verifier's signals of two payloads of ``modality``, keyed as in :data:`SIGNALS`."""
    if modality == "image":
        return sig.image_signals(x, y)
    if modality == "audio":
        got = sig.audio_signals(x, y)
        return {"audio_corr": got["corr"], "audio_lag_ms": got["lag_ms"], "score": got["score"]}
    j = sig.text_similarity(x, y)
    return {"text_jaccard": j, "score": j}


def pick_payloads(payloads, slots: list[int]) -> dict:
    """The payloads of the rows of one shard that take part in candidate pairs."""
    return {s: payloads[s] for s in slots}


class RayVerifier:
    """Verification on Ray: one task per shard picks the payloads of its rows in candidate pairs
    (few), then a few verify tasks, each with the picked payloads of the shards its pairs touch.
    Neither the full payloads nor per-row arrays of every row travel to each task, so the cost
    grows with the number of candidates, not with rows x tasks."""

    def __init__(self, heavy_refs: list):
        import ray

        from mmbatch.engine import capacity

        self.heavy = heavy_refs
        self.pick = ray.remote(pick_payloads)
        self.task = ray.remote(verify_pairs)
        # two tasks per CPU the cluster can have for CPU work: pending tasks make the autoscaler add nodes
        self.parallel = max(1, 2 * int(capacity.task_cpus(capacity.snapshot())))

    def __call__(self, m, sa, la, sb, lb):
        import ray

        shards_all, slots_all = np.concatenate([sa, sb]), np.concatenate([la, lb])
        picked = {}
        for sh in np.unique(shards_all).tolist():
            slots = np.unique(slots_all[shards_all == sh]).tolist()
            picked[sh] = self.pick.remote(self.heavy[sh], slots)
        n_tasks = max(1, min(self.parallel, -(-len(sa) // VERIFY_CHUNK)))
        futures = []
        for idx in np.array_split(np.arange(len(sa)), n_tasks):
            ids = sorted(set(sa[idx].tolist()) | set(sb[idx].tolist()))
            futures.append(self.task.remote(m, sa[idx], la[idx], sb[idx], lb[idx], ids, *[picked[i] for i in ids]))
        return np.concatenate(ray.get(futures))


# --- driver --------------------------------------------------------------------------------------------
@dataclass
class DuplicatesResult:
    out: str
    pairs: pa.Table
    summary: dict
    groups: pa.Table = None
    scored: dict = None          # modality -> every verified candidate (rows a, b; signals), for tuning


def check_thresholds(thresholds: dict | None) -> dict:
    """THRESHOLDS with ``thresholds`` (modality -> score) laid over; a clear error for a bad one."""
    out = dict(THRESHOLDS)
    for m, v in (thresholds or {}).items():
        if m not in THRESHOLDS:
            raise UsageError(f"threshold for {m!r}: the modalities are {', '.join(THRESHOLDS)}")
        if not isinstance(v, (int, float)) or not -1.0 <= float(v) <= 1.0:
            raise UsageError(f"threshold {m}={v!r}: a number in [-1, 1]")
        out[m] = float(v)
    return out


def run_duplicates(datasets: list[str], out: str, *, address: str | None = None,
                   report: bool = True, thresholds: dict | None = None) -> DuplicatesResult:
    from mmbatch.engine import ownership

    thresholds = check_thresholds(thresholds)
    ownership.check_disjoint({"--out": out}, {f"CANONICAL {i + 1}": d for i, d in enumerate(datasets)})
    shards = list_shards(datasets)
    ownership.claim(out, "duplicates")
    res = find_duplicates(shards, shard_signatures, address=address, thresholds=thresholds)
    write_outputs(out, res, shards if report else None)
    res.out = out
    return res


def find_duplicates(shards: list, signature_fn, *, address: str | None = None, final_splits=None,
                    thresholds: dict | None = None) -> DuplicatesResult:
    """Pairs, groups and summary of ``shards``; ``signature_fn(shard) -> (table, payloads)`` runs in
    one Ray task per shard (benchmarks/duplicates.py passes a synthetic one). ``final_splits(dataset,
    sample_ids, splits) -> splits`` replaces the rows' split values (preprocess: the final split)."""
    import ray

    from mmbatch.engine.runtime import init_ray

    t0 = time.time()
    init_ray(address)
    t_init = time.time()
    sig_task = ray.remote(num_returns=2)(signature_fn)
    refs = [sig_task.remote(s) for s in shards]
    heavy_refs = [r[1] for r in refs]
    tables = ray.get([r[0] for r in refs])
    if final_splits is not None:
        tables = [t.set_column(t.schema.get_field_index("split"), "split", pa.array(
            list(final_splits(sh.dataset, t.column("sample_id").to_pylist(), t.column("split").to_pylist())),
            pa.string())) for sh, t in zip(shards, tables)]
    t_sig = time.time()
    seconds: dict = defaultdict(float)
    thresholds = check_thresholds(thresholds)
    pairs, groups, scored = find_pairs(shards, tables, RayVerifier(heavy_refs), seconds, thresholds)
    summary = summarize(pairs, groups, shards, tables, thresholds)
    summary["seconds"] = {"ray_init": round(t_init - t0, 3), "signatures": round(t_sig - t_init, 3),
                          **{k: round(v, 3) for k, v in seconds.items()}, "total": round(time.time() - t0, 3)}
    return DuplicatesResult("", pairs, summary, groups, scored)


def find_pairs(shards: list[Shard], tables: list[pa.Table], verify, seconds: dict | None = None,
               thresholds: dict | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """(pairs, groups, scored) from the signature tables: exact groups, near candidates among one
    representative per exact group, verified; the rows joined by either form groups, and each
    member of a group is paired with the group's first row. ``verify(modality, shard_a, slot_a,
    shard_b, slot_b) -> signals`` scores candidate pairs (:class:`RayVerifier`); ``seconds``
    collects the time spent finding candidates and verifying them; ``scored``: per modality the
    rows of every verified candidate pair and its signals (under the threshold too)."""
    seconds = defaultdict(float) if seconds is None else seconds
    thresholds = check_thresholds(thresholds)
    if tables:
        sigs = pa.concat_tables([t.append_column("shard", pa.array(np.full(t.num_rows, k, np.int64)))
                                 .append_column("slot", pa.array(np.arange(t.num_rows, dtype=np.int64)))
                                 for k, t in enumerate(tables)])
    else:
        sigs = SIG_SCHEMA.empty_table()
    parts, gparts, scored = [], [], {}
    for m in MODALITIES:
        rows = sigs.filter(pc.equal(sigs.column("modality"), m))
        if rows.num_rows:
            p, g, scored[m] = _modality_pairs(m, rows, shards, verify, seconds, thresholds[m])
            parts.append(p)
            gparts.append(g)
    return (pa.concat_tables(parts) if parts else PAIR_SCHEMA.empty_table(),
            pa.concat_tables(gparts) if gparts else GROUP_SCHEMA.empty_table(), scored)


def _modality_pairs(m: str, rows: pa.Table, shards: list[Shard], verify, seconds: dict, threshold: float):
    t0 = time.perf_counter()
    groups = cand.group_by_key(rows.column("exact"))
    rep_of = np.arange(rows.num_rows)            # the first row of each exact group, or the row itself
    for g in groups:
        rep_of[g] = g[0]
    is_rep = rep_of == np.arange(rows.num_rows)
    valid, mat = _matrix(rows.column("minhash" if m == "text" else "emb"))
    reps = np.flatnonzero(is_rep & valid)
    t_exact = time.perf_counter()
    vecs = mat[(np.cumsum(valid) - 1)[reps]]
    cpairs = cand.minhash_pairs(vecs) if m == "text" else cand.knn_pairs(vecs)
    cpairs = reps[cpairs] if len(cpairs) else cpairs.reshape(0, 2)
    t1 = time.perf_counter()
    sigs = _verify(m, cpairs, rows, verify)
    near = cpairs[sigs[:, -1] >= threshold]
    label, first = row_groups(rows, shards, rep_of, near)
    members = np.flatnonzero(first[label] != np.arange(rows.num_rows))
    pairs = np.stack([first[label[members]], members], 1)
    # the signals of each (first, member) pair: its verified candidate pair, or verified now
    known = {(int(a), int(b)): k for k, (a, b) in enumerate(cpairs)}
    rp = np.sort(np.stack([rep_of[pairs[:, 0]], rep_of[pairs[:, 1]]], 1), axis=1)
    is_near = rp[:, 0] != rp[:, 1]
    at = np.array([known.get((int(a), int(b)), -1) for a, b in rp], np.int64)
    missing = np.flatnonzero(is_near & (at < 0))
    extra = _verify(m, rp[missing], rows, verify)
    sig_of = np.zeros((len(pairs), len(SIGNALS[m])))
    sig_of[is_near & (at >= 0)] = sigs[at[is_near & (at >= 0)]]
    sig_of[missing] = extra
    seconds["exact"] += t_exact - t0
    seconds["candidates"] += t1 - t_exact
    seconds["verify"] += time.perf_counter() - t1
    scored = {"a": cpairs[:, 0], "b": cpairs[:, 1], "signals": sigs, "names": SIGNALS[m],
              "ids": rows.column("sample_id"), "shard": rows.column("shard").to_numpy()}
    return (_pair_table(m, rows, shards, pairs, is_near, sig_of, label),
            _group_table(m, rows, shards, label, first), scored)


def row_groups(rows: pa.Table, shards: list[Shard], rep_of: np.ndarray, near: np.ndarray):
    """(group label of each row, the first row of each label): connected components of the exact
    groups and the verified near pairs (scipy.sparse.csgraph); a group's first row is its earliest
    by split (train < validation < test), then dataset, then sample_id."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = rows.num_rows
    a = np.concatenate([rep_of, near[:, 0]]).astype(np.int64)
    b = np.concatenate([np.arange(n), near[:, 1]]).astype(np.int64)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    split_rank = np.array([SPLIT_ORDER.get(x, 3) for x in rows.column("split").to_pylist()])
    ds = np.array([shards[int(k)].dataset for k in rows.column("shard").to_numpy()], object)
    ids = np.array(rows.column("sample_id").to_pylist(), object)
    order = np.lexsort((ids.astype(str), ds.astype(str), split_rank, label))
    starts = np.flatnonzero(np.r_[True, label[order][1:] != label[order][:-1]])
    first = np.empty(label.max() + 1 if n else 0, np.int64)
    first[label[order][starts]] = order[starts]
    return label, first


def _matrix(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(row has a value, the values of those rows as one n x width matrix) of a list column."""
    arr = col.combine_chunks()
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    flat = arr.flatten().to_numpy()
    width = len(flat) // max(1, int(valid.sum()))
    return valid, flat.reshape(-1, width) if width else flat.reshape(0, 0)


def _verify(m: str, cpairs: np.ndarray, rows: pa.Table, verify) -> np.ndarray:
    if not len(cpairs):
        return np.empty((0, len(SIGNALS[m])))
    shard_of = rows.column("shard").to_numpy()
    slot_of = rows.column("slot").to_numpy()
    order = np.lexsort((shard_of[cpairs[:, 1]], shard_of[cpairs[:, 0]]))     # neighbouring shards together
    a, b = cpairs[order, 0], cpairs[order, 1]
    out = np.empty((len(cpairs), len(SIGNALS[m])))
    out[order] = np.asarray(verify(m, shard_of[a], slot_of[a], shard_of[b], slot_of[b])).reshape(len(a), -1)
    return out


def _pair_table(m, rows, shards, pairs, is_near, sig_of, label) -> pa.Table:
    """One row per group member after the first: (first, member), exact or near, with the signals."""
    if not len(pairs):
        return PAIR_SCHEMA.empty_table()
    shard_of = rows.column("shard").to_numpy()
    ds = pa.array([shards[int(k)].dataset for k in shard_of], pa.string())
    cols = {}
    for side, idx in (("a", pairs[:, 0]), ("b", pairs[:, 1])):
        take = pa.array(idx)
        cols[f"{side}_dataset"] = ds.take(take)
        cols[f"{side}_sample_id"] = rows.column("sample_id").take(take)
        cols[f"{side}_split"] = rows.column("split").take(take)
    cols["modality"] = pa.array([m] * len(pairs), pa.string())
    cols["kind"] = pa.array(np.where(is_near, "near", "exact"), pa.string())
    names = SIGNALS[m]
    cols["similarity"] = pa.array(np.where(is_near, np.minimum(1.0, sig_of[:, -1]), 1.0))
    for c in SIGNAL_COLUMNS:
        cols[c] = (pa.array(sig_of[:, names.index(c)], mask=~is_near) if c in names
                   else pa.nulls(len(pairs), pa.float64()))
    cols["group"] = pa.array(label[pairs[:, 0]].astype(np.int64))
    return pa.table(cols, schema=PAIR_SCHEMA)


def _group_table(m, rows, shards, label, first) -> pa.Table:
    """Every row of ``m`` with its group (a row without duplicates is a group of one)."""
    n = rows.num_rows
    size = np.bincount(label, minlength=len(first))[label] if n else np.empty(0, np.int64)
    return pa.table({
        "dataset": pa.array([shards[int(k)].dataset for k in rows.column("shard").to_numpy()], pa.string()),
        "sample_id": rows.column("sample_id"), "split": rows.column("split"),
        "modality": pa.array([m] * n, pa.string()), "group": pa.array(label.astype(np.int64)),
        "group_size": pa.array(size.astype(np.int64)), "first": pa.array(first[label] == np.arange(n)),
    }, schema=GROUP_SCHEMA)


# --- summary ---------------------------------------------------------------------------------------------
def leaked_rows(groups: pa.Table) -> dict[tuple[str, str], tuple[str, list[tuple[str, str, str]]]]:
    """(dataset, sample_id) of each validation/test row in a group (of any modality) with a train
    row -> (its split, [(modality, train dataset, train sample_id), ...]): the train row named is
    the group's first row. Decided per group: a test row leaks when any train row is in its group,
    directly verified against it or not."""
    g = groups.filter(pc.greater(groups.column("group_size"), 1))
    out: dict = {}
    firsts = {(r["modality"], r["group"]): r for r in g.filter(g.column("first")).to_pylist()}
    for r in g.to_pylist():
        f = firsts[(r["modality"], r["group"])]
        if r["split"] in ("validation", "test") and f["split"] == "train":
            out.setdefault((r["dataset"], r["sample_id"]), (r["split"], []))[1].append(
                (r["modality"], f["dataset"], f["sample_id"]))
    return out


def summarize(pairs: pa.Table, groups: pa.Table, shards: list[Shard], tables: list[pa.Table],
              thresholds: dict | None = None) -> dict:
    rows_by_mod: dict = defaultdict(int)
    no_near: dict = defaultdict(int)
    for t in tables:
        mods = t.column("modality").to_numpy(zero_copy_only=False)
        none = ~(t.column("emb").is_valid().to_numpy(zero_copy_only=False)
                 | t.column("minhash").is_valid().to_numpy(zero_copy_only=False))
        for m in MODALITIES:
            rows_by_mod[m] += int((mods == m).sum())
            no_near[m] += int(((mods == m) & none).sum())
    leaks = leaked_rows(groups)
    dup = groups.filter(pc.and_(pc.greater(groups.column("group_size"), 1), groups.column("first")))
    n_groups = dict(zip(*np.unique(dup.column("modality").to_numpy(zero_copy_only=False), return_counts=True)))
    per_mod = {}
    recs = pairs.to_pylist()
    for m in MODALITIES:
        mine = [r for r in recs if r["modality"] == m]
        split_pairs: dict = {}
        for r in mine:
            key = f"{r['a_split']}|{r['b_split']}"
            sp = split_pairs.setdefault(key, {"pairs": 0, "exact": 0, "near": 0, "_rows": set()})
            sp["pairs"] += 1
            sp[r["kind"]] += 1
            sp["_rows"].update({(r["a_dataset"], r["a_sample_id"]), (r["b_dataset"], r["b_sample_id"])})
        involved = set().union(*[s["_rows"] for s in split_pairs.values()]) if split_pairs else set()
        for sp in split_pairs.values():
            sp["rows_involved"] = len(sp.pop("_rows"))
        leaked = {split: sum(1 for sp_, dups in leaks.values() if sp_ == split and any(x[0] == m for x in dups))
                  for split in ("validation", "test")}
        per_mod[m] = {"rows": rows_by_mod[m], "rows_without_near_signature": no_near[m],
                      "groups": int(n_groups.get(m, 0)), "pairs": len(mine),
                      "exact": sum(r["kind"] == "exact" for r in mine),
                      "near": sum(r["kind"] == "near" for r in mine), "rows_involved": len(involved),
                      "split_pairs": split_pairs,
                      "test_rows_with_train_duplicate": leaked["test"],
                      "validation_rows_with_train_duplicate": leaked["validation"]}
    return {"datasets": sorted({s.dataset: s.uri for s in shards}.items()), "modalities": per_mod,
            "thresholds": check_thresholds(thresholds), "leakage": {
                split: {m: per_mod[m][f"{split}_rows_with_train_duplicate"] for m in MODALITIES}
                for split in ("validation", "test")}}


def write_outputs(out: str, res: DuplicatesResult, shards: list[Shard] | None, curves: dict | None = None) -> None:
    """pairs.parquet, groups.parquet, summary.json and (with ``shards``) report.html under ``out``;
    ``curves``: the report's precision/recall curves (default: the package's heldout_curve.json)."""
    fs, root = storage.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    storage.atomic_write_table(fs, storage.join(root, "pairs.parquet"), res.pairs)
    storage.atomic_write_table(fs, storage.join(root, "groups.parquet"), res.groups)
    storage.write_json(fs, storage.join(root, "summary.json"), res.summary)
    if shards is not None:
        from mmbatch.dedup.report import render_report
        storage.atomic_write_bytes(fs, storage.join(root, "report.html"),
                                   render_report(res.pairs, res.summary, shards, curves).encode("utf-8"))


def render_summary(summary: dict) -> str:
    lines = []
    for m, s in summary["modalities"].items():
        if not s["rows"]:
            continue
        lines.append(f"{m:<6} {s['rows']:>8} rows  {s['groups']:>6} groups ({s['exact']} exact + {s['near']} near "
                     f"pairs with their first rows), "
                     f"{s['rows_involved']} rows involved; test rows with a train duplicate: "
                     f"{s['test_rows_with_train_duplicate']}, validation: {s['validation_rows_with_train_duplicate']}")
    return "\n".join(lines) or "no image, audio or text values found"

