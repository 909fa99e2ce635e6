"""Fused feature rows -> train / validation / test tensors.

Three layers, so tests and the scoring path can use them without Ray:

- :func:`split_plan` / :func:`assign_splits` -- pure functions that decide the
  split of every row. The ``split`` column is normalised
  (``schema.normalize_split``); a missing test split is carved from validation,
  a missing validation split from train, and rows without a usable split value
  are spread over all three by ``val_fraction`` / ``test_fraction``. Carving
  hashes ``seed:sample_id`` to a number in [0, 1): the same rows land in the
  same split on every run, on every machine, in any file order.
- :func:`to_arrays` -- one Arrow batch -> model-ready NumPy columns
  (``<m>_emb`` float32 [n, dim], ``has_<m>`` bool, ``y`` class index).
- :class:`FusedData` -- opens a fused Parquet folder (local path or fsspec
  URI), scans the light columns once on the driver (split, label, label_name,
  sample_id) to fix the split plan, the classes and the class counts, and
  hands out lazy Ray Datasets per split for Ray Train.
"""
from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmbatch import schema, storage
from mmbatch.errors import UsageError

log = logging.getLogger("mmbatch.training")

SPLITS = schema.SPLITS
LIGHT_COLUMNS = ["sample_id", "split", "label", "label_name"]


# --- split assignment (pure) ------------------------------------------------------------
def split_plan(present: Iterable[Optional[str]], val_fraction: float, test_fraction: float) -> dict:
    """How to turn the normalised split values found in the data into train/validation/test.

    ``present`` holds the normalised split values of the data (``None`` for rows
    without one). Returns a JSON-able plan used by :func:`assign_splits`.
    """
    present = set(present)
    has = {s: s in present for s in SPLITS}
    if not has["train"] and not has["validation"] and not has["test"]:
        mode = "unsplit"          # no usable split values: spread every row
    else:
        mode = "column"
    vf, tf = float(val_fraction), float(test_fraction)
    return {
        "mode": mode,
        "seed_based": True,
        "val_fraction": vf,
        "test_fraction": tf,
        # train rows give validation (and test) rows when those splits are missing
        "carve_val_from_train": mode == "column" and not has["validation"],
        "carve_test_from_train": mode == "column" and not has["validation"] and not has["test"],
        # validation rows give test rows when test is missing
        "carve_test_from_val": mode == "column" and has["validation"] and not has["test"],
        "present": sorted(s for s in present if s is not None),
    }


def row_uniform(sample_ids: Sequence[str], seed: int) -> np.ndarray:
    """A reproducible number in [0, 1) per sample id (blake2b of ``seed:sample_id``)."""
    out = np.empty(len(sample_ids), dtype=np.float64)
    prefix = f"{seed}:".encode()
    for i, sid in enumerate(sample_ids):
        h = hashlib.blake2b(prefix + str(sid).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "big") / 2.0 ** 64
    return out


def assign_splits(sample_ids: Sequence[str], raw_splits: Sequence[Optional[str]],
                  plan: Mapping, seed: int) -> np.ndarray:
    """The final split (``train``/``validation``/``test``) of each row, as an object array."""
    n = len(sample_ids)
    norm = np.array([_norm(s) for s in raw_splits], dtype=object)
    u = row_uniform(sample_ids, seed)
    vf, tf = plan["val_fraction"], plan["test_fraction"]
    out = norm.copy()

    # rows without a usable split value (or the whole data set when it has none)
    loose = np.array([s not in SPLITS for s in norm], dtype=bool) if n else np.zeros(0, bool)
    out[loose] = _spread(u[loose], vf, tf)

    if plan["carve_val_from_train"]:
        tr = norm == "train"
        test_share = tf if plan["carve_test_from_train"] else 0.0
        out[tr] = _spread(u[tr], vf, test_share)
    if plan["carve_test_from_val"]:
        va = norm == "validation"
        share = tf / (vf + tf) if (vf + tf) > 0 else 0.5
        out[va] = np.where(u[va] < share, "test", "validation")
    return out


def normalized_splits(raw: Iterable[Optional[str]]) -> set:
    """The set of normalised split values (None for rows without a usable one)."""
    out = set()
    for s in set(raw):
        n = _norm(s)
        out.add(n if n in SPLITS else None)
    return out


def _norm(s: Optional[str]) -> Optional[str]:
    if s is None or (isinstance(s, float) and np.isnan(s)) or s == "":
        return None
    return schema.normalize_split(str(s))


def _spread(u: np.ndarray, vf: float, tf: float) -> np.ndarray:
    return np.where(u < vf, "validation", np.where(u < vf + tf, "test", "train")).astype(object)


# --- Arrow -> NumPy (pure) ------------------------------------------------------------------
def embedding_matrix(col: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """fixed_size_list<float32>[dim] column -> (float32 [n, dim] with zeros for nulls, valid mask)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if n == 0:
        return np.zeros((0, dim), np.float32), np.zeros(0, bool)
    if not pa.types.is_fixed_size_list(arr.type):
        arr = arr.cast(pa.list_(pa.float32(), dim))
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    values = arr.values.slice(arr.offset * dim, n * dim)
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=True)  # nulls -> nan
    mat = np.nan_to_num(flat.reshape(n, dim), nan=0.0, posinf=0.0, neginf=0.0)
    mat[~valid] = 0.0
    return mat, valid


def to_arrays(table: pa.Table, modalities: Sequence[str], dims: Mapping[str, int],
              class_ids: Sequence[int], split: Optional[str] = None, plan: Optional[Mapping] = None,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Model-ready columns for the rows of ``table`` in ``split`` (all rows when None).

    Rows with a null label or a label outside ``class_ids`` are dropped.
    ``has_<m>`` is true only where the flag is set (or absent) *and* the
    embedding is not null.
    """
    if split is not None and split != "all":
        splits = assign_splits(table.column("sample_id").to_pylist(),
                               _column_or_none(table, "split"), plan, seed)
        table = table.filter(pa.array(splits == split))
    labels = table.column("label").to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0)
    labels = np.asarray(pd_fill(labels), dtype=np.float64)
    ids = np.asarray(sorted(class_ids), dtype=np.int64)
    y = np.full(len(labels), -1, dtype=np.int64)
    ok = ~np.isnan(labels)
    pos = np.searchsorted(ids, labels[ok].astype(np.int64)) if len(ids) else np.zeros(ok.sum(), np.int64)
    pos = np.clip(pos, 0, max(len(ids) - 1, 0))
    known = ids[pos] == labels[ok].astype(np.int64) if len(ids) else np.zeros(ok.sum(), bool)
    y_ok = np.where(known, pos, -1)
    y[ok] = y_ok
    keep = y >= 0
    out: dict[str, np.ndarray] = {"y": y[keep]}
    for m in modalities:
        mat, valid = embedding_matrix(table.column(schema.emb_column(m)), dims[m])
        flag_col = schema.has_column(m)
        if flag_col in table.column_names:
            flag = table.column(flag_col).to_numpy(zero_copy_only=False)
            flag = np.array([bool(f) if f is not None else True for f in flag], dtype=bool) \
                if flag.dtype == object else flag.astype(bool)
        else:
            flag = np.ones(len(valid), bool)
        present = valid & flag
        mat[~present] = 0.0
        out[schema.emb_column(m)] = mat[keep]
        out[schema.has_column(m)] = present[keep]
    return out


def pd_fill(a: np.ndarray) -> np.ndarray:
    """Object array with None -> float array with nan."""
    if a.dtype == object:
        return np.array([np.nan if v is None else v for v in a], dtype=np.float64)
    return a


def _column_or_none(table: pa.Table, name: str) -> list:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [None] * table.num_rows


# --- files -------------------------------------------------------------------------------------
def parquet_files(uri: str) -> tuple[object, list[str]]:
    """(fsspec filesystem, data files) of a fused Parquet folder or single file."""
    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        raise UsageError(f"fused feature data not found: {uri}")
    if fs.isfile(path):
        return fs, [path]
    files = storage.list_parquet(fs, path)
    if not files:  # partitioned layouts: look one level down, skipping _tmp/_shards/quarantine
        files = sorted(p for p in fs.glob(posixpath.join(path, "**", "*.parquet"))
                       if not any(part.startswith(("_", ".")) or part == storage.QUARANTINE_DIR
                                  for part in posixpath.relpath(p, path).split("/")))
    if not files:
        raise UsageError(f"no Parquet files under {uri} (expected fused features written by `mmbatch preprocess`)")
    return fs, files


def read_schema(uri: str) -> pa.Schema:
    fs, files = parquet_files(uri)
    return pq.read_schema(files[0], filesystem=fs)


def data_modalities(sch: pa.Schema) -> dict[str, int]:
    """modality -> embedding size, from the columns of a fused schema."""
    dims = {}
    for m in schema.MODALITIES:
        name = schema.emb_column(m)
        if name in sch.names:
            t = sch.field(name).type
            if not pa.types.is_fixed_size_list(t):
                raise UsageError(f"column {name} is {t}, expected fixed_size_list<float32> (fused features)")
            dims[m] = t.list_size
    return dims


def read_table(uri: str, columns: list[str]) -> pa.Table:
    """All rows of ``columns`` (driver-side read through fsspec; used for the light scan and scoring)."""
    fs, files = parquet_files(uri)
    tables = []
    for f in files:
        avail = pq.read_schema(f, filesystem=fs).names
        t = pq.read_table(f, filesystem=fs, columns=[c for c in columns if c in avail])
        for c in columns:
            if c not in t.column_names:
                t = t.append_column(c, pa.nulls(t.num_rows, pa.string() if c in ("split", "label_name") else pa.int64()))
        tables.append(t.select(columns))
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


# --- the data set as training sees it -------------------------------------------------------
@dataclass
class FusedData:
    uri: str
    meta: dict                       # the `mmbatch` Parquet metadata of the fused data
    dims: dict[str, int]             # modality -> embedding size (every modality in the data)
    classes: list[dict]              # [{"id": label id, "name": label name}], sorted by id
    plan: dict                       # split plan (see split_plan)
    seed: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)   # split -> class name -> rows
    dropped_unlabeled: int = 0
    fingerprint: str = ""

    @classmethod
    def open(cls, uri: str, seed: int = 0, val_fraction: float = 0.15,
             test_fraction: float = 0.15) -> "FusedData":
        sch = read_schema(uri)
        for col in ("sample_id", "label"):
            if col not in sch.names:
                raise UsageError(f"{uri}: column '{col}' missing: not fused feature data")
        dims = data_modalities(sch)
        if not dims:
            raise UsageError(f"{uri}: no <modality>_emb columns: not fused feature data")
        meta = schema.read_mmbatch_meta(sch)
        light = read_table(uri, LIGHT_COLUMNS)
        raw_splits = light.column("split").to_pylist()
        plan = split_plan(normalized_splits(raw_splits), val_fraction, test_fraction)
        splits = assign_splits(light.column("sample_id").to_pylist(), raw_splits, plan, seed)
        labels = light.column("label").to_pylist()
        names = light.column("label_name").to_pylist()
        id_to_name: dict[int, str] = {}
        for lab, nm in zip(labels, names):
            if lab is not None and int(lab) not in id_to_name:
                id_to_name[int(lab)] = str(nm) if nm is not None else str(lab)
        if len(id_to_name) < 2:
            raise UsageError(f"{uri}: found {len(id_to_name)} label value(s); training needs at least 2 classes")
        classes = [{"id": i, "name": id_to_name[i]} for i in sorted(id_to_name)]
        counts: dict[str, dict[str, int]] = {s: {c["name"]: 0 for c in classes} for s in SPLITS}
        dropped = 0
        for s, lab in zip(splits, labels):
            if lab is None:
                dropped += 1
                continue
            counts[s][id_to_name[int(lab)]] += 1
        if sum(counts["train"].values()) == 0:
            raise UsageError(f"{uri}: no training rows after the split (plan: {plan})")
        manifest = storage.read_manifest(uri) if not uri.endswith(".parquet") else None
        fs, files = parquet_files(uri)
        fp = storage.fingerprint({"manifest": manifest or [(f, fs.size(f)) for f in files],
                                  "meta": meta, "counts": counts})
        return cls(uri=uri, meta=meta, dims=dims, classes=classes, plan=plan, seed=seed,
                   counts=counts, dropped_unlabeled=dropped, fingerprint=fp)

    # -- facts for the model spec and the report
    @property
    def class_ids(self) -> list[int]:
        return [c["id"] for c in self.classes]

    def features(self, modalities: Sequence[str]) -> dict:
        """Extractor metadata (name, version, dim, params) per modality, from the data's metadata."""
        feats = self.meta.get("features") or {}
        out = {}
        for m in modalities:
            f = dict(feats.get(m) or {})
            f.setdefault("dim", self.dims[m])
            out[m] = f
        return out

    def imbalance(self, split: str = "train") -> dict:
        return class_balance(self.counts.get(split, {}))

    def split_sizes(self) -> dict[str, int]:
        return {s: int(sum(c.values())) for s, c in self.counts.items()}

    # -- Ray Data
    def dataset(self, split: str, modalities: Sequence[str]):
        """Lazy Ray Dataset of model-ready columns for ``split`` (read with ``ray.data.read_parquet``)."""
        import ray.data
        fs, files = parquet_files(self.uri)
        columns = LIGHT_COLUMNS + [schema.emb_column(m) for m in modalities] + \
            [schema.has_column(m) for m in modalities]
        sch = read_schema(self.uri)
        columns = [c for c in columns if c in sch.names]
        if storage.is_local(fs):
            ds = ray.data.read_parquet(files)
        else:
            from pyarrow.fs import FSSpecHandler, PyFileSystem
            ds = ray.data.read_parquet(files, filesystem=PyFileSystem(FSSpecHandler(fs)))
        return ds.select_columns(columns).map_batches(_SplitArrays, batch_format="pyarrow", batch_size=1024, zero_copy_batch=True,
                              fn_kwargs=dict(modalities=list(modalities), dims=dict(self.dims),
                                             class_ids=self.class_ids, split=split, plan=self.plan,
                                             seed=self.seed))

    def arrays(self, split: str, modalities: Sequence[str]) -> dict[str, np.ndarray]:
        """The same columns as :meth:`dataset`, read in this process (validation, scoring)."""
        return read_split_arrays(self.uri, split, modalities, self.dims, self.class_ids, self.plan, self.seed)


def read_split_arrays(uri: str, split: str, modalities: Sequence[str], dims: Mapping[str, int],
                      class_ids: Sequence[int], plan: Mapping, seed: int) -> dict[str, np.ndarray]:
    """Model-ready arrays of one split, read row group by row group (memory bounded by the split)."""
    fs, files = parquet_files(uri)
    wanted = LIGHT_COLUMNS + [schema.emb_column(m) for m in modalities] + [schema.has_column(m) for m in modalities]
    parts = []
    for f in files:
        pf = pq.ParquetFile(f, filesystem=fs)
        cols = [c for c in wanted if c in pf.schema_arrow.names]
        for rg in range(pf.num_row_groups):
            parts.append(to_arrays(pf.read_row_group(rg, columns=cols), modalities, dims, class_ids, split, plan, seed))
    if not parts:
        parts = [to_arrays(pa.table({"sample_id": pa.array([], pa.string()), "label": pa.array([], pa.int64()),
                                     **{schema.emb_column(m): pa.array([], schema.embedding_type(dims[m]))
                                        for m in modalities}}), modalities, dims, class_ids)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _SplitArrays(batch: pa.Table, **kw) -> dict[str, np.ndarray]:  # noqa: N802 - used as a map_batches fn
    return to_arrays(batch, **kw)


def class_balance(counts: Mapping[str, int]) -> dict:
    """Counts per class and the max/min ratio (inf when a class has no rows)."""
    vals = [int(v) for v in counts.values()]
    lo, hi = (min(vals), max(vals)) if vals else (0, 0)
    return {"counts": {k: int(v) for k, v in counts.items()},
            "max_min_ratio": (hi / lo) if lo > 0 else (float("inf") if hi > 0 else None)}
