"""Fused feature rows -> train / validation / test tensors.

Three layers, so tests and the scoring path can use them without Ray:

- :mod:`mmbatch.preprocess.splits` -- which split each row belongs to. Data written with
  ``"splits_final": true`` in its metadata carries its final split in the
  ``split`` column, read as it is; older data gets its splits decided here by the
  same pure functions (:func:`split_plan` / :func:`assign_splits`).
- :func:`to_arrays` -- one Arrow batch -> model-ready NumPy columns
  (``<m>_emb`` float32 [n, dim], ``has_<m>`` bool, ``y`` class index).
- :class:`FusedData` -- opens a fused Parquet folder (local path or fsspec
  URI), scans the light columns once on the driver (split, label, label_name,
  sample_id) to fix the split plan, the classes and the class counts, and
  hands out lazy Ray Datasets per split for Ray Train.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmbatch import schema
from mmbatch.engine import storage
from mmbatch.errors import UsageError
from mmbatch.preprocess.fusion import embeddings_to_numpy
from mmbatch.engine.manifest import Manifest, data_files
from mmbatch.preprocess.splits import (assign_splits, final_plan, normalized_splits, row_uniform, split_plan,  # noqa: F401
                            splits_are_final)
from mmbatch.train.exclude import EXCLUDED_SPLITS, exclude_fingerprint
from mmbatch.train.sequences import sequence_column_names, sequence_dims, sequence_input

log = logging.getLogger("mmbatch.train")

SPLITS = schema.SPLITS
MIN_SCORABLE_ROWS = 10               # a validation/test split smaller than this is reported, not scored
LIGHT_COLUMNS = ["sample_id", "split", "label", "label_name"]


# --- Arrow -> NumPy (pure) ------------------------------------------------------------------
def to_arrays(table: pa.Table, modalities: Sequence[str], dims: Mapping[str, int],
              class_ids: Sequence[int], split: Optional[str] = None, plan: Optional[Mapping] = None,
              seed: int = 0, exclude: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """Model-ready columns for the rows of ``table`` in ``split`` (all rows when None).

    Rows with a null label or a label outside ``class_ids`` are dropped, and so are the rows whose
    sample_id is in ``exclude`` when ``split`` is train or validation (``train.exclude``).
    ``has_<m>`` is true only where the flag is set (or absent) *and* the
    embedding is not null.
    """
    if split is not None and split != "all":
        splits = assign_splits(table.column("sample_id").to_pylist(),
                               _column_or_none(table, "split"), plan, seed)
        table = table.filter(pa.array(splits == split))
    if exclude and split in EXCLUDED_SPLITS:
        import pyarrow.compute as pc
        table = table.filter(pc.invert(pc.is_in(table.column("sample_id"), pa.array(list(exclude), pa.string()))))
    labels = table.column("label").to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0)
    labels = np.asarray(nulls_to_nan(labels), dtype=np.float64)
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
        lengths = None
        if schema.seq_column(m) in table.column_names:          # sequence features (training.sequences)
            mat, valid, lengths = sequence_input(table, m, dims[m])
        else:
            col = table.column(schema.emb_column(m))
            mat = embeddings_to_numpy(col, dims[m])
            valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        flag_col = schema.has_column(m)
        if flag_col in table.column_names:
            flag = table.column(flag_col).to_numpy(zero_copy_only=False)
            flag = np.array([bool(f) if f is not None else True for f in flag], dtype=bool) \
                if flag.dtype == object else flag.astype(bool)
        else:
            flag = np.ones(len(valid), bool)
        present = valid & flag
        mat[~present] = 0
        out[schema.emb_column(m)] = mat[keep]
        out[schema.has_column(m)] = present[keep]
        if lengths is not None:
            out[f"{m}_len"] = (lengths * present)[keep]
    return out


def nulls_to_nan(a: np.ndarray) -> np.ndarray:
    """Labels as read from Arrow: an object array with None (a nullable column) becomes a float
    array with nan in their place; any other array is returned as it is."""
    if a.dtype == object:
        return np.array([np.nan if v is None else v for v in a], dtype=np.float64)
    return a


def _column_or_none(table: pa.Table, name: str) -> list:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [None] * table.num_rows


# --- files -------------------------------------------------------------------------------------
def parquet_files(uri: str) -> tuple[object, list[str]]:
    """(fsspec filesystem, data files) of a fused Parquet folder or single file: the files committed on
    disk (mmbatch.engine.manifest.data_files). Train and evaluate check the folder against its manifest first
    (mmbatch.engine.provenance.check_fused), so these are the files the manifest names unless an incomplete
    folder was allowed."""
    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        raise UsageError(f"fused feature data not found: {uri}")
    fs, files, _ = data_files(uri, allow_incomplete=True)
    if not files:
        raise UsageError(f"no Parquet files under {uri} (expected fused features written by `mmbatch preprocess`)")
    return fs, files


def read_table(uri: str, columns: list[str]) -> pa.Table:
    """All rows of ``columns``, read in this process through fsspec (the audit's light scan: it holds
    every row's features anyway; training streams instead)."""
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
    dims.update(sequence_dims(sch))
    return dims


def distinct_splits(uri: str) -> list[Optional[str]]:
    """The distinct values of the ``split`` column (None included when a row has none), read file by
    file: what :func:`data_split_plan` needs, without a Python object per row."""
    import pyarrow.compute as pc

    fs, files = parquet_files(uri)
    seen: set = set()
    for f in files:
        if "split" not in pq.read_schema(f, filesystem=fs).names:
            seen.add(None)
            continue
        seen.update(pc.unique(pq.read_table(f, filesystem=fs, columns=["split"]).column("split")).to_pylist())
    return sorted(seen, key=lambda v: (v is None, str(v)))


def scan_labels(uri: str, plan: Mapping, seed: int,
                exclude: frozenset = frozenset()) -> tuple[dict[int, str], Counter, int, int, int]:
    """One pass over the light columns, file by file (memory bounded by one file's light columns):
    (label id -> name, (split, label id) -> rows, unlabelled rows, labelled rows without a split,
    train/validation rows left out by ``exclude``)."""
    fs, files = parquet_files(uri)
    id_to_name: dict[int, str] = {}
    pairs: Counter = Counter()
    dropped = unassigned = excluded = 0
    for f in files:
        avail = pq.read_schema(f, filesystem=fs).names
        t = pq.read_table(f, filesystem=fs, columns=[c for c in LIGHT_COLUMNS if c in avail])
        n = t.num_rows
        col = (lambda c: t.column(c).to_pylist() if c in t.column_names else [None] * n)
        labels, names = col("label"), col("label_name")
        splits = assign_splits(col("sample_id"), col("split"), plan, seed)
        for lab, nm in zip(labels, names):
            if lab is not None and int(lab) not in id_to_name:
                id_to_name[int(lab)] = str(nm) if nm is not None else str(lab)
        for sp, lab, sid in zip(splits, labels, col("sample_id")):
            if lab is None:
                dropped += 1
            elif sp is None:
                unassigned += 1
            elif sp in EXCLUDED_SPLITS and sid in exclude:
                excluded += 1
            else:
                pairs[(sp, int(lab))] += 1
    return id_to_name, pairs, dropped, unassigned, excluded


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
    leakage: Optional[dict] = None   # validation/test rows duplicating train (the manifest's, preprocess dedup.leakage)
    exclude: frozenset = frozenset()  # sample ids left out of train and validation (train.exclude)
    excluded: int = 0                # rows of train and validation left out by ``exclude``

    @classmethod
    def open(cls, uri: str, seed: int = 0, val_fraction: float = 0.15,
             test_fraction: float = 0.15, exclude: frozenset = frozenset()) -> "FusedData":
        sch = read_schema(uri)
        for col in ("sample_id", "label"):
            if col not in sch.names:
                raise UsageError(f"{uri}: column '{col}' missing: not fused feature data")
        dims = data_modalities(sch)
        if not dims:
            raise UsageError(f"{uri}: no <modality>_emb columns: not fused feature data")
        meta = schema.read_mmbatch_meta(sch)
        manifest = Manifest.read(uri) if not uri.endswith(".parquet") else None
        plan = data_split_plan(meta, manifest, distinct_splits(uri), val_fraction, test_fraction)
        id_to_name, pairs, dropped, unassigned, excluded = scan_labels(uri, plan, seed, frozenset(exclude))
        if len(id_to_name) < 2:
            raise UsageError(f"{uri}: found {len(id_to_name)} label value(s); training needs at least 2 classes")
        classes = [{"id": i, "name": id_to_name[i]} for i in sorted(id_to_name)]
        counts: dict[str, dict[str, int]] = {s: {c["name"]: 0 for c in classes} for s in SPLITS}
        for (split, lab), n in pairs.items():
            counts[split][id_to_name[lab]] += n
        if unassigned:
            log.warning("%s: %d labelled row(s) have no train/validation/test value in their final split "
                        "column; they are left out", uri, unassigned)
        if sum(counts["train"].values()) == 0:
            raise UsageError(f"{uri}: no training rows after the split (plan: {plan})")
        fs, files = parquet_files(uri)
        fp_of = {"manifest": manifest.to_dict() if manifest else [(f, fs.size(f)) for f in files],
                 "meta": meta, "counts": counts}
        if exclude:                  # only then: the fingerprint of data without an exclusion is unchanged
            fp_of["exclude"] = exclude_fingerprint(exclude)
        return cls(uri=uri, meta=meta, dims=dims, classes=classes, plan=plan, seed=seed,
                   counts=counts, dropped_unlabeled=dropped, fingerprint=storage.fingerprint(fp_of),
                   leakage=manifest.get("leakage") if manifest else None, exclude=frozenset(exclude),
                   excluded=excluded)

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

    def unscorable(self) -> dict[str, str]:
        """split -> why its accuracy would mean nothing (validation / test only; see :func:`unscorable_reason`)."""
        out = {}
        for split in ("validation", "test"):
            why = unscorable_reason(self.counts.get(split, {}))
            if why:
                out[split] = why
        return out

    # -- Ray Data
    def dataset(self, split: str, modalities: Sequence[str]):
        """Lazy Ray Dataset of model-ready columns for ``split`` (read with :func:`read_parquet_tasks`)."""
        fs, files = parquet_files(self.uri)
        columns = split_columns(modalities)
        sch = read_schema(self.uri)
        columns = [c for c in columns if c in sch.names]
        ds = read_parquet_tasks(files, None if storage.is_local(fs) else fs, columns=columns)
        return ds.map_batches(batch_to_arrays, batch_format="pyarrow", batch_size=1024, zero_copy_batch=True,
                              fn_kwargs=dict(modalities=list(modalities), dims=dict(self.dims),
                                             class_ids=self.class_ids, split=split, plan=self.plan,
                                             seed=self.seed, exclude=sorted(self.exclude)))

    def arrays(self, split: str, modalities: Sequence[str]) -> dict[str, np.ndarray]:
        """The same columns as :meth:`dataset`, the whole split read in this process (small splits)."""
        return read_split_arrays(self.uri, split, modalities, self.dims, self.class_ids, self.plan, self.seed,
                                 exclude=sorted(self.exclude))

    def batches(self, split: str, modalities: Sequence[str], groups=None):
        """The same columns as :meth:`arrays`, one dict per row group (:func:`iter_split_arrays`)."""
        return iter_split_arrays(self.uri, split, modalities, self.dims, self.class_ids, self.plan, self.seed,
                                 groups=groups, exclude=sorted(self.exclude))

    def array_bytes(self, split: str, modalities: Sequence[str]) -> int:
        """About the bytes of :meth:`arrays` of ``split`` (float32 features and a flag per modality)."""
        return self.split_sizes()[split] * sum(4 * self.dims[m] + 1 for m in modalities)

    def input_stats(self, modalities: Sequence[str], max_rows: int) -> dict:
        """:func:`feature_stats` of the train split, streamed (:class:`RunningStats`) over row groups of
        about ``max_rows`` rows in all spread evenly over the data (all of it when smaller)."""
        from mmbatch.train.models import RunningStats

        acc = RunningStats(modalities)
        for part in self.batches("train", modalities, groups=spread_sample(row_groups(self.uri), max_rows)):
            acc.add(part)
        return acc.result()


def read_parquet_tasks(files: list[str], fs=None, columns: Optional[list[str]] = None):
    """``ray.data.read_parquet(files)`` through Ray Data's task-based Parquet reader. Ray 2.60's default
    reader (``DataContext.use_datasource_v2``) starts a pool of footer-reading actors -- up to 32 new
    worker processes -- each time the dataset executes, which Ray Train does every epoch; Ray then warns
    about worker processes started beyond its startup concurrency. The task reader reuses the workers.
    ``columns``: read only those (the ``fused`` column, as large as the embeddings together, is never
    read for training)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = getattr(ctx, "use_datasource_v2", None)
    if before is not None:
        ctx.use_datasource_v2 = False
    try:
        if fs is None:
            return ray.data.read_parquet(files, columns=columns)
        from pyarrow.fs import FSSpecHandler, PyFileSystem
        return ray.data.read_parquet(files, filesystem=PyFileSystem(FSSpecHandler(fs)), columns=columns)
    finally:
        if before is not None:
            ctx.use_datasource_v2 = before


def data_split_plan(meta: Optional[Mapping], manifest: Optional[Manifest], raw_splits: Sequence[Optional[str]],
                    val_fraction: float, test_fraction: float) -> dict:
    """The split plan of fused data: ``final`` (read the split column as is) when its Parquet
    metadata or its manifest's ``metadata`` says ``"splits_final": true``, else decided from
    the split values it has (:func:`split_plan`)."""
    if splits_are_final(meta) or splits_are_final(manifest.metadata if manifest else None):
        return final_plan()
    return split_plan(normalized_splits(raw_splits), val_fraction, test_fraction)


def unscorable_reason(class_counts: Mapping[str, int]) -> Optional[str]:
    """Why a split with these rows per class cannot be scored meaningfully (None when it can):
    fewer than MIN_SCORABLE_ROWS rows, or a single class."""
    n = int(sum(class_counts.values()))
    present = sum(1 for v in class_counts.values() if v > 0)
    if n < MIN_SCORABLE_ROWS:
        return f"only {n} row(s) (fewer than {MIN_SCORABLE_ROWS})"
    if present < 2:
        return "only one class"
    return None


def split_columns(modalities: Sequence[str]) -> list[str]:
    """The fused columns :func:`to_arrays` reads for ``modalities``."""
    return LIGHT_COLUMNS + [schema.emb_column(m) for m in modalities] + [schema.has_column(m) for m in modalities] \
        + sequence_column_names(modalities)


def row_groups(uri: str) -> list[tuple[str, int, int]]:
    """(file, row group, rows) of every row group of a fused folder, in file order (footers only)."""
    fs, files = parquet_files(uri)
    out = []
    for f in files:
        md = pq.ParquetFile(f, filesystem=fs).metadata
        out += [(f, rg, md.row_group(rg).num_rows) for rg in range(md.num_row_groups)]
    return out


def iter_split_arrays(uri: str, split: str, modalities: Sequence[str], dims: Mapping[str, int],
                      class_ids: Sequence[int], plan: Mapping, seed: int,
                      groups: Optional[Sequence[tuple[str, int, int]]] = None,
                      exclude: Optional[Sequence[str]] = None):
    """Model-ready arrays of one split, one dict per Parquet row group (``groups``: those row groups of
    :func:`row_groups` only): memory bounded by a row group, whatever the split's size. ``exclude``:
    see :func:`to_arrays`."""
    fs, files = parquet_files(uri)
    wanted = split_columns(modalities)
    by_file: dict[str, list[int]] = {}
    for f, rg, _ in (groups if groups is not None else [(f, None, 0) for f in files]):
        by_file.setdefault(f, []).append(rg)
    for f, rgs in by_file.items():
        pf = pq.ParquetFile(f, filesystem=fs)
        cols = [c for c in wanted if c in pf.schema_arrow.names]
        for rg in (range(pf.num_row_groups) if rgs == [None] else rgs):
            yield to_arrays(pf.read_row_group(rg, columns=cols), modalities, dims, class_ids, split, plan, seed,
                            exclude)


def empty_arrays(modalities: Sequence[str], dims: Mapping[str, int], class_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Model-ready arrays of no rows."""
    return to_arrays(pa.table({"sample_id": pa.array([], pa.string()), "label": pa.array([], pa.int64()),
                               **{schema.emb_column(m): pa.array([], schema.embedding_type(dims[m]))
                                  for m in modalities}}), modalities, dims, class_ids)


def concat_arrays(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def read_split_arrays(uri: str, split: str, modalities: Sequence[str], dims: Mapping[str, int],
                      class_ids: Sequence[int], plan: Mapping, seed: int,
                      exclude: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """Model-ready arrays of one whole split, read row group by row group (memory: the split's arrays;
    for a split of any size use :func:`iter_split_arrays`). ``exclude``: see :func:`to_arrays`."""
    parts = list(iter_split_arrays(uri, split, modalities, dims, class_ids, plan, seed, exclude=exclude))
    return concat_arrays(parts) if parts else empty_arrays(modalities, dims, class_ids)


def spread_sample(groups: Sequence[tuple[str, int, int]], max_rows: int) -> list[tuple[str, int, int]]:
    """Row groups holding about ``max_rows`` rows, spread evenly over ``groups`` (every k-th one), so a
    statistic taken over them sees every part of the data set, not its first files only."""
    total = sum(n for _, _, n in groups)
    if total <= max_rows:
        return list(groups)
    share, want, got, picked = max_rows / total, 0.0, 0, []
    for g in groups:
        want += g[2] * share
        if got < want:               # behind the even share: take this row group
            picked.append(g)
            got += g[2]
    return picked


def batch_to_arrays(batch: pa.Table, **kw) -> dict[str, np.ndarray]:
    """:func:`to_arrays` of one Ray Data batch (the ``map_batches`` function of :meth:`FusedData.dataset`)."""
    return to_arrays(batch, **kw)


def class_balance(counts: Mapping[str, int]) -> dict:
    """Counts per class and the max/min ratio (inf when a class has no rows)."""
    vals = [int(v) for v in counts.values()]
    lo, hi = (min(vals), max(vals)) if vals else (0, 0)
    return {"counts": {k: int(v) for k, v in counts.items()},
            "max_min_ratio": (hi / lo) if lo > 0 else (float("inf") if hi > 0 else None)}
