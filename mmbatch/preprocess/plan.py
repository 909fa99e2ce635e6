"""Planning a preprocess run (driver, no Ray; of row data only the label column, for a label map):
datasets, units, fingerprints.

A **unit** is one row group of one canonical input shard. Its output is one
Parquet file with a deterministic name (``<dataset>--<shard>-rg<k>.parquet``),
and its fingerprint covers everything that changes that file: the input
shard (its ingest fingerprint), the row group, the extractor parameters, the
label map, completions, fusion, pairing partners and the split plan. A rerun
skips units committed with the same fingerprint; anything else is redone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.parquet as pq

from mmbatch.engine import storage
from mmbatch.config import DatasetConfig, Workflow
from mmbatch.errors import UsageError
from mmbatch.engine.manifest import Manifest
from mmbatch.schema import MODALITIES, label_indices, normalize_split

FEATURES_DIR = "_features"      # per-modality features of pairing partners (read by the primary's units)
PLAN_VERSION = "units-1"
META_COLS = ["sample_id", "source", "split", "label", "label_name"]


@dataclass(frozen=True)
class Unit:
    id: str                     # marker name and output file stem
    path: str                   # input shard: a local path or a URI with its scheme (s3://bucket/key)
    row_group: int
    rows: int
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.id} ({self.path} row group {self.row_group})"


@dataclass
class DatasetPlan:
    cfg: DatasetConfig
    files: list[str]
    modalities: list[str]
    label_map: dict | None
    row_groups: dict[str, list[int]]        # input file -> rows per row group
    input_fps: dict[str, object]            # input file -> its ingest fingerprint (or size + mtime)
    split_counts: dict[str, int]            # raw split value -> rows (ingest manifest)
    columns: list[str] = field(default_factory=list)   # canonical columns the units read

    @property
    def rows(self) -> int:
        return sum(sum(v) for v in self.row_groups.values())

    def units(self, fingerprint_extra: dict, exclude: dict | None = None) -> list[Unit]:
        """Every unit of this dataset, largest first (the short ones fill the gaps at the end).
        ``exclude``: (file, row group) -> the unit's quarantined rows (dedup.leakage), in its fingerprint."""
        out = []
        for f in self.files:
            sid = shard_id(f)
            for k, n in enumerate(self.row_groups[f]):
                uid = f"{self.cfg.name}--{sid}-rg{k:03d}"
                fp = storage.fingerprint({"input": self.input_fps[f], "row_group": k, "rows": n,
                                          "v": PLAN_VERSION, **fingerprint_extra,
                                          "exclude": (exclude or {}).get((f, k), {})})
                out.append(Unit(uid, f, k, n, fp))
        return sorted(out, key=lambda u: -u.rows)


def shard_id(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(".parquet")] if base.endswith(".parquet") else base


def feature_specs(wf: Workflow) -> dict[str, dict]:
    return {m: getattr(wf.features, m).model_dump(mode="json") for m in MODALITIES}


def row_group_sizes(fs, path: str) -> list[int]:
    """Rows per row group of one Parquet file (its footer only)."""
    meta = pq.ParquetFile(path, filesystem=fs).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _dataset_modalities(fs, files: list[str], ds: DatasetConfig) -> list[str]:
    """Modalities this dataset provides: configured, else those with any non-null value
    (from the Parquet footers' statistics; the columns are read only when they have none)."""
    if ds.modalities:
        return [m for m in MODALITIES if m in ds.modalities]
    present = set()
    for f in files:
        meta = pq.ParquetFile(f, filesystem=fs).metadata
        for rg in range(meta.num_row_groups):
            stats = meta.row_group(rg)
            for ci in range(stats.num_columns):
                col = stats.column(ci)
                m = col.path_in_schema.split(".")[0]
                if m in MODALITIES and col.statistics is not None and col.statistics.null_count < stats.num_rows:
                    present.add(m)
        if len(present) == len(MODALITIES):
            break
    if not present:
        t = pq.read_table(files[0], columns=list(MODALITIES), filesystem=fs)
        present = {m for m in MODALITIES if t.column(m).null_count < t.num_rows}
    return [m for m in MODALITIES if m in present]


def _label_map(fs, files: list[str], column: str) -> dict:
    import pyarrow.compute as pc

    values: set = set()
    for f in files:
        col = pq.read_table(f, columns=[column], filesystem=fs).column(column)
        values.update(str(v) for v in pc.unique(col).to_pylist() if v is not None)
    return {"column": column, "mapping": label_indices(values)}


def plan_dataset(ds: DatasetConfig) -> DatasetPlan:
    """Read the footers and markers of an ingested dataset: its units' inputs (no row data)."""
    fs, root = storage.url_to_fs(ds.path)
    if not fs.exists(root):
        raise UsageError(f"dataset '{ds.name}': path {ds.path} does not exist (run `mmbatch ingest` first)")
    manifest = Manifest.read_at(fs, root)
    if manifest is None:
        raise UsageError(f"dataset '{ds.name}': {ds.path} has no _manifest.json: the ingest did not finish")
    # with their scheme: a unit's path travels to a worker, which must not take s3://b/k for a local b/k
    files = [storage.uri(fs, f) for f in manifest.paths(fs, root)]
    if not files:
        raise UsageError(f"dataset '{ds.name}': no Parquet shards under {ds.path}")
    modalities = _dataset_modalities(fs, files, ds)
    if ds.complete and not ds.modalities:
        from mmbatch.convert.transforms import KINDS
        targets = {c.target or KINDS[c.kind][1] for c in ds.complete}
        modalities = [m for m in MODALITIES if m in modalities or m in targets]
    if not modalities:
        raise UsageError(f"dataset '{ds.name}': no image, audio or text values found")
    label_map = _label_map(fs, files, ds.label_column) if ds.label_column else None
    row_groups, input_fps = {}, {}
    for f in files:
        marker = storage.read_marker(fs, root, shard_id(f))
        info = fs.info(f) if marker is None else {}
        input_fps[f] = marker["fingerprint"] if marker else [info.get("size"), str(info.get("mtime", ""))]
        row_groups[f] = row_group_sizes(fs, f)
    split_counts = dict(manifest.counts.get("split") or {})
    columns = [*META_COLS, *modalities]
    if label_map:
        columns.append(label_map["column"])
    for c in ds.complete:
        if c.source_column and c.source_column not in columns:
            columns.append(c.source_column)
    return DatasetPlan(ds, files, modalities, label_map, row_groups, input_fps, split_counts, columns)


def present_splits(plans: list[DatasetPlan]) -> set:
    """Normalised split values of the data, from the ingest manifests' counts (None: rows without one)."""
    out = set()
    for p in plans:
        for raw in p.split_counts:
            s = None if raw in ("None", "", None) else normalize_split(str(raw))
            out.add(s if s in ("train", "validation", "test") else None)
    return out
