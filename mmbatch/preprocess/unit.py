"""One unit of preprocess work, start to finish, in the worker that computes it (no Ray here).

:class:`UnitWorker` is built once per worker (extractors, completions, the
partner cache) and then, per unit (one row group of a canonical shard), runs two halves:

    prepare: read the row group -> complete missing modalities -> decode + embed each
    modality in batches (a model modality of the split shape: decode only) -> a UnitState
    finish: embed what was only decoded -> quarantine rows that failed -> the job's output ->
    write the final Parquet file (and the unit's quarantine file) -> PreprocessRecord

What a unit outputs is its job's type: a :class:`FusedUnitJob` filters splits, decides the final
split, attaches partners and fuses; a :class:`PartnerFeaturesJob` keeps a pairing partner's
per-modality features for the fused units to attach.

The fused shape (``features.gpu_shape: fused``) runs both halves in one worker
(:meth:`UnitWorker.__call__`); the split shape runs ``prepare`` in a CPU worker and
``finish`` in a GPU worker (:func:`make_decoder`, :func:`make_embedder`), with the same
batches given to the model, so the output bits are the same.

Batches are Arrow in, NumPy per modality, Arrow out (embeddings as
fixed-size lists built once per batch). Timings and quarantine reasons are
fields of the returned record, not columns. The same class serves a test, a
plain loop and the Ray Data actor pool (mmbatch.engine.units).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmbatch.engine import storage
from mmbatch.engine.commit import CommitRecord, UnitSink
from mmbatch.preprocess.features.sequence import columns_in_schema
from mmbatch.preprocess.fusion import embeddings_to_arrow
from mmbatch.preprocess.fuse import PartnerIndex, PartnerRows, fused_table
from mmbatch.preprocess.plan import META_COLS, Unit
from mmbatch.engine.provenance import UNIT_FP_KEY, job_fingerprint, weights_signature
from mmbatch.schema import MODALITIES, QUARANTINE, emb_column, has_column, normalize_split, quarantine_row


@dataclass
class PreprocessRecord(CommitRecord):
    """A preprocess unit's commit record: the engine's, and where the unit ran (in its marker and the
    run's placement summary)."""
    devices: dict = field(default_factory=dict)       # modality -> device it was embedded on
    shape: str = ""                             # "fused" or "split" (features.gpu_shape) as it ran


@dataclass
class UnitJob(ABC):
    """What every worker of one dataset's units needs (shipped once per worker). Its type says what
    the units write: :class:`FusedUnitJob` the fused rows, :class:`PartnerFeaturesJob` a pairing
    partner's per-modality features.

    Every field is part of the units' fingerprint (:meth:`fingerprint`) unless its metadata says
    otherwise: a new field that changes the output needs no other change."""
    role: ClassVar[str] = ""         # in the fingerprint: the units of the two types never share one
    # fingerprinted as if they were fields (see PartnerFeaturesJob)
    fingerprint_constants: ClassVar[dict] = {}
    dataset: str
    out_uri: str = field(metadata={"fingerprint": False})   # output directory of this dataset's units
    out_rel: str                     # that directory relative to the run's output root ("" or _features/<ds>)
    columns: list[str]
    specs: dict
    modalities: list[str]            # this dataset's own modalities
    dims: dict                       # every modality of the run -> embedding size
    schema: pa.Schema                # of the written table
    label_map: dict | None = None
    completions: list[dict] = field(default_factory=list)
    row_group_size: int = 4096
    # rows per extractor call (features.batch_size): changes a model's output bits, not a model-free one's
    batch_size: int = field(default=64, metadata={"fingerprint": "model"})
    features: dict = field(default_factory=dict)  # modality -> extractor describe() + weights content sha256
    # fsspec options (may hold secrets): where the bytes are, not what they are
    storage: dict = field(default_factory=storage.options, repr=False, metadata={"fingerprint": False})

    def fingerprint(self, uses_model: bool) -> dict:
        """The job's part of each unit's fingerprint (mmbatch.engine.provenance.job_fingerprint)."""
        return {**self.fingerprint_constants, "role": self.role, **job_fingerprint(self, uses_model)}

    def excluded(self) -> dict:
        """sample_id -> quarantine reason of rows to quarantine before any work (none here)."""
        return {}

    def columns_used(self) -> set[str]:
        """The input columns that the output reads besides META_COLS (a label map's)."""
        return {(self.label_map or {}).get("column")} - {None}

    @abstractmethod
    def output(self, meta: dict, table: pa.Table, embs: dict, present: dict, partner_rows) -> pa.Table:
        """The table a unit writes, from its light columns ``meta``, its input ``table`` (media
        dropped) and its embeddings; ``partner_rows``: the worker's PartnerRows."""


@dataclass
class PartnerFeaturesJob(UnitJob):
    """A pairing partner's units: their per-modality features, under ``OUT/_features/<dataset>/``,
    which the primary's units attach (mmbatch.preprocess.fuse)."""
    role: ClassVar[str] = "features"
    # the values these fields of a FusedUnitJob had in a features job while both were one class: units
    # committed then keep their fingerprints
    fingerprint_constants: ClassVar[dict] = {"keep_splits": None, "split_plan": None, "split_seed": 0,
                                              "fusion": {}, "pairing": {}, "partners": []}

    def output(self, meta: dict, table: pa.Table, embs: dict, present: dict, partner_rows) -> pa.Table:
        """Every row, its embeddings (or sequence features) and presence per own modality."""
        cols = dict(meta)
        for m in self.modalities:
            if emb_column(m) in self.schema.names:
                cols[emb_column(m)] = embeddings_to_arrow(embs[m], present[m])
            else:                                       # sequence features (mmbatch.preprocess.features.sequence)
                cols.update(columns_in_schema(m, embs[m], present[m], self.schema))
            cols[has_column(m)] = pa.array(present[m])
        return pa.table(cols, schema=self.schema)


@dataclass
class FusedUnitJob(UnitJob):
    """A primary dataset's units: the fused rows, in the run's output folder: split filter, pairing
    partners attached, final split decided, fused."""
    role: ClassVar[str] = "fused"
    keep_splits: list[str] | None = None
    split_plan: dict | None = None   # decide the final split (mmbatch.preprocess.splits) when set
    split_seed: int = 0
    fusion: dict = field(default_factory=dict)
    pairing: dict = field(default_factory=dict)
    partners: list[PartnerIndex] = field(default_factory=list)
    # sample_id -> quarantine reason (dedup.leakage: quarantine) of the dataset; each unit's
    # fingerprint holds only its own rows' (DatasetPlan.units, mmbatch.dedup.leakage.Leakage.by_unit)
    exclude: dict = field(default_factory=dict, metadata={"fingerprint": False})

    def excluded(self) -> dict:
        """Rows that duplicate a train row (mmbatch.dedup.leakage)."""
        return self.exclude

    def columns_used(self) -> set[str]:
        """A label map's column and the pairing key."""
        key = self.pairing.get("key") if self.pairing.get("by") == "key" else None
        return super().columns_used() | ({key} if key else set())

    def output(self, meta: dict, table: pa.Table, embs: dict, present: dict, partner_rows) -> pa.Table:
        keep = self._split_filter(meta["split"])
        paired_with = None
        if self.partners:      # partners share the dataset's own split (as ingested) where they have it
            keep, paired_with = self._attach_partners(meta, table, embs, present, keep, partner_rows)
        if self.split_plan is not None:
            from mmbatch.preprocess.splits import assign_splits
            final = assign_splits(meta["sample_id"].to_pylist(), meta["split"].to_pylist(), self.split_plan,
                                  self.split_seed)
            meta["split"] = pa.array(final.tolist(), pa.string())
        if keep is not None and not keep.all():
            meta = {k: v.filter(pa.array(keep)) for k, v in meta.items()}
            embs = {m: e[keep] for m, e in embs.items()}
            present = {m: p[keep] for m, p in present.items()}
            if paired_with is not None:
                paired_with = {k: [v for v, ok in zip(vals, keep) if ok] for k, vals in paired_with.items()}
        return fused_table(meta, embs, present, self.dims, self.fusion, self.schema, paired_with)

    def _split_filter(self, split: pa.Array) -> np.ndarray | None:
        wanted = self.keep_splits
        if not wanted:
            return None
        wanted = {s.lower() for s in wanted}
        ok = {v for v in pc.unique(split).to_pylist()
              if v is not None and (v.lower() in wanted or (normalize_split(v) or "") in wanted)}
        return np.asarray(pc.is_in(split, value_set=pa.array(sorted(ok), pa.string())).to_numpy(
            zero_copy_only=False), bool)

    def _attach_partners(self, meta, table, embs, present, keep, partner_rows):
        keep = np.ones(len(meta["sample_id"]), bool) if keep is None else keep
        ids = meta["sample_id"].to_pylist()
        labels, splits = meta["label"].to_pylist(), meta["split"].to_pylist()
        key = self.pairing.get("key", "sample_id")
        keys = (meta[key] if key in meta else table.column(key)).to_pylist() if self.pairing["by"] == "key" else None
        paired_with = {}
        for index in self.partners:
            pos = index.choose(ids, labels, splits, keys, self.pairing.get("seed", 0))
            if self.pairing["by"] == "key":
                keep &= pos >= 0
            p_embs, p_present, p_ids = partner_rows.take(index, pos, self.dims)
            for m in p_embs:
                if m not in self.modalities:
                    embs[m], present[m] = p_embs[m], p_present[m]
            paired_with[index.name] = p_ids
        return keep, paired_with


def extractor(modality: str, spec: dict):
    """One extractor per (modality, config) per worker process, pinned to one thread."""
    key = storage.fingerprint([modality, spec, weights_signature(spec)])   # rewritten weights: a new one
    ex = _EXTRACTORS.get(key)
    if ex is None:
        from mmbatch.config import feature_config
        from mmbatch.preprocess.features.registry import build_extractor
        from mmbatch.engine.runtime import pin_threads

        pin_threads()
        ex = _EXTRACTORS[key] = build_extractor(modality, feature_config(modality, spec))
    return ex


_EXTRACTORS: dict[str, Any] = {}


def raw_items(table: pa.Table, modality: str) -> tuple[list, list | None]:
    """(raw values per row: str for text, a zero-copy memoryview into the column's buffer for
    media, None where missing; media paths per row or None)."""
    if modality not in table.column_names:
        return [None] * table.num_rows, None
    col = table.column(modality).combine_chunks()
    if modality == "text":
        return col.to_pylist(), None
    return binary_views(pc.struct_field(col, "bytes")), pc.struct_field(col, "path").to_pylist()


def binary_views(arr: pa.Array) -> list[memoryview | None]:
    """Each value of a binary array as a memoryview into its data buffer (None where null), sliced
    by the offsets buffer: 0.2 us a row, against ~11 us for a scalar's ``as_buffer()``."""
    width = 8 if pa.types.is_large_binary(arr.type) else 4
    _, offsets, data = arr.buffers()
    bounds = np.frombuffer(offsets, f"<i{width}", len(arr) + 1, arr.offset * width).tolist()
    whole = memoryview(data) if data is not None else memoryview(b"")
    valid = [True] * len(arr) if arr.null_count == 0 else arr.is_valid().to_pylist()
    return [whole[bounds[i]:bounds[i + 1]] if valid[i] else None for i in range(len(arr))]


def read_unit(unit: Unit, columns: list[str]) -> pa.Table:
    """The unit's row group. A local file is memory-mapped: its uncompressed media columns are
    decoded from the page cache without first being copied into a read buffer. An object is read
    with ranged GETs of the footer and the row group's column chunks (:func:`storage.open_input`;
    ``pre_buffer`` coalesces the chunks' ranges into a few concurrent requests).
    One thread: the worker holds one CPU, and its units already keep every core busy."""
    fs, path = storage.url_to_fs(unit.path)
    if storage.is_local(fs):
        pf = pq.ParquetFile(path, memory_map=True)
        return pf.read_row_group(unit.row_group, columns=columns, use_threads=False)
    with storage.open_input(fs, path) as f:
        return pq.ParquetFile(f, pre_buffer=True).read_row_group(unit.row_group, columns=columns, use_threads=False)


@dataclass
class UnitState:
    """A unit between its two halves: what ``prepare`` read and computed, and what ``finish`` needs
    (the table without its media columns, the rows' failures, the embeddings, and per model
    modality of the split shape its decoded batches). Pickled from the CPU worker to the GPU one."""
    unit: Unit
    table: pa.Table
    failures: "Failures"
    embs: dict                           # modality -> embeddings (None: decoded only, in ``decoded``)
    present: dict                        # modality -> row has a value
    decoded: dict                        # modality -> [(row indices, decoded values)] per batch
    seconds: Counter
    actors: dict = field(default_factory=dict)     # step -> the actor that ran it (mmbatch.engine.units)


class UnitWorker:
    def __init__(self, job: UnitJob, shape: str = "fused", models: bool = True):
        """``shape``: "fused" (one worker runs the whole unit) or "split" (features.gpu_shape, as
        placed: a model modality is decoded in one worker and embedded in another). ``models=False``:
        the split shape's CPU worker, which only decodes for a model (it never builds one)."""
        self.job, self.shape = job, shape
        storage.configure(job.storage)
        self.extractors = {m: extractor(m, job.specs[m]) for m in job.modalities}
        self.device = {m: self._place(m, ex) if models else "cpu" for m, ex in self.extractors.items()}
        self.completions = []
        if job.completions:
            from mmbatch.convert.transforms import CompleteModality
            self.completions = [CompleteModality(c["kind"], c.get("source_column"), c.get("target"))
                                for c in job.completions]
        self.fs, self.out_dir = storage.url_to_fs(job.out_uri)
        self.sink = UnitSink(self.fs, self.out_dir)
        self.partner_rows = PartnerRows(self.fs)        # read only by units that pair (FusedUnitJob)

    def _place(self, modality: str, ex) -> str:
        if not ex.needs_model:
            return "cpu"
        import torch
        # Ray sets CUDA_VISIBLE_DEVICES for workers given GPUs; where the cluster only advertises
        # GPUs (or CUDA is missing), the model runs on the CPU.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.extractors[modality] = ex.to(device)
        return device

    def __call__(self, unit: Unit) -> PreprocessRecord:
        return self.finish(self.prepare(unit))

    def prepare(self, unit: Unit) -> UnitState:
        """The first half: read, complete, exclude, and embed (decode only, for a model modality of
        the split shape)."""
        sec: Counter = Counter()
        with _timed(sec, "read"):
            table = read_unit(unit, self.job.columns)
        for c in self.completions:
            with _timed(sec, "complete"):
                table = c(table)
        n = table.num_rows
        failures = Failures(n)
        exclude = self.job.excluded()
        if exclude:                      # rows that duplicate a train row (mmbatch.dedup.leakage)
            for i, sid in enumerate(table.column("sample_id").to_pylist()):
                if sid in exclude:
                    failures.bad[i], failures.reason[i] = True, exclude[sid]
                    failures.detail[i] = "duplicates a train row (dedup.leakage: quarantine)"
        embs, present, decoded = {}, {}, {}
        for m in self.job.modalities:
            if self.shape == "split" and self.extractors[m].needs_model:
                decoded[m] = []
            with _timed(sec, m):
                embs[m], present[m] = self._embed(m, table, failures, decoded.get(m))
        media = [m for m in MODALITIES if m in table.column_names and m not in self.job.columns_used()]
        return UnitState(unit, table.drop_columns(media), failures, embs, present, decoded, sec)

    def finish(self, state: UnitState) -> PreprocessRecord:
        """The second half: embed the decoded batches, quarantine, fuse, write; the unit's record."""
        unit, table, failures, sec = state.unit, state.table, state.failures, state.seconds
        embs, present, n = dict(state.embs), state.present, table.num_rows
        for m, batches in state.decoded.items():
            with _timed(sec, m):
                embs[m] = self.extractors[m].empty_rows(n)
                for rows, values in batches:
                    if len(rows):
                        embs[m][rows] = self.extractors[m].encode(values)
        with _timed(sec, "fuse"):
            quarantine = self._quarantine(table, failures)
            ok = np.flatnonzero(~failures.bad)
            if len(ok) < n:
                table = table.take(pa.array(ok))
                embs = {m: e[ok] for m, e in embs.items()}
                present = {m: p[ok] for m, p in present.items()}
            out = self.job.output(self._meta(table), table, embs, present, self.partner_rows)
        out = out.replace_schema_metadata({**(out.schema.metadata or {}), UNIT_FP_KEY: unit.fingerprint.encode()})
        with _timed(sec, "write"):
            data_file, qfile = self.sink.write(unit.id, out, quarantine, row_group_size=self.job.row_group_size)
        return PreprocessRecord(
            unit=unit.id, fingerprint=unit.fingerprint, input=f"{unit.path}#rg{unit.row_group}",
            files=[data_file], rows_in=n, rows=out.num_rows, quarantined=quarantine.num_rows,
            dropped=n - quarantine.num_rows - out.num_rows, quarantine_file=qfile,
            reasons=dict(Counter(quarantine.column("reason").to_pylist())), counts=_counts(out),
            seconds={k: round(v, 6) for k, v in sec.items()}, devices=dict(self.device), shape=self.shape,
            actors=dict(state.actors))

    def _embed(self, m: str, table: pa.Table, failures: "Failures",
               decoded: list | None = None) -> tuple[np.ndarray | None, np.ndarray]:
        """([n, dim] embeddings, presence) of modality ``m``, in batches of ``batch_size`` rows (bounded
        memory for big decoded items); rows that fail are recorded in ``failures``. With ``decoded``
        (a list), each batch is only decoded: its rows that decoded and their values go to the list,
        for :meth:`finish` to encode as ``Extractor.extract`` would have, and the embeddings are None."""
        items, paths = raw_items(table, m)
        has = np.fromiter((x is not None and len(x) > 0 for x in items), bool, count=table.num_rows)
        idx = np.flatnonzero(has)
        ex = self.extractors[m]
        emb = ex.empty_rows(table.num_rows) if decoded is None else None   # [n, dim] floats, or per-row arrays
        for start in range(0, len(idx), self.job.batch_size):
            part = idx[start:start + self.job.batch_size]
            if decoded is None:
                emb[part], errors = ex.extract([items[i] for i in part])
            else:
                dec = ex.decode([items[i] for i in part])
                errors = dec.errors
                ok = [k for k, e in enumerate(errors) if e is None]
                decoded.append((part[ok], [dec.values[k] for k in ok]))
            for i, err in zip(part, errors):
                if err is not None:
                    failures.add(i, m, err, paths[i] if paths else None)
        return emb, has

    # --- parts ---------------------------------------------------------------------------------
    def _meta(self, table: pa.Table) -> dict[str, pa.Array]:
        meta = {c: table.column(c).combine_chunks() for c in META_COLS}
        lm = self.job.label_map
        if lm:
            keys = pc.cast(table.column(lm["column"]).combine_chunks(), pa.string())
            values = pa.array(sorted(lm["mapping"], key=lm["mapping"].get), pa.string())
            meta["label"] = pc.cast(pc.index_in(keys, value_set=values), pa.int64())
            meta["label_name"] = keys
        return meta

    def _quarantine(self, table: pa.Table, failures: "Failures") -> pa.Table:
        if not failures.bad.any():
            return QUARANTINE.empty_table()
        idx = np.flatnonzero(failures.bad)
        ids = table.column("sample_id").take(pa.array(idx)).to_pylist()
        return pa.Table.from_pylist(
            [quarantine_row(failures.reason[i], failures.detail[i] or "", path=failures.path[i], sample_id=sid,
                            source=self.job.dataset, stage="preprocess") for i, sid in zip(idx, ids)],
            schema=QUARANTINE)


class Failures:
    """The first failure of each row of a unit: reason ``<modality>:<code>``, detail, media path."""

    def __init__(self, n: int):
        self.bad = np.zeros(n, bool)
        self.reason, self.detail, self.path = [None] * n, [None] * n, [None] * n

    def add(self, i: int, modality: str, err: tuple[str, str], path: str | None) -> None:
        if not self.bad[i]:
            self.bad[i] = True
            self.reason[i], self.detail[i], self.path[i] = f"{modality}:{err[0]}", err[1], path


@contextmanager
def _timed(seconds: Counter, stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] += time.perf_counter() - t0


def _value_counts(col) -> dict:
    out = {}
    for item in pc.value_counts(col).to_pylist():
        out[str(item["values"])] = int(item["counts"])
    return out


def _counts(t: pa.Table) -> dict:
    """Rows written per split, per label and per present modality (the manifest adds these up)."""
    if t.num_rows == 0:
        return {"split": {}, "label": {}, "presence": {}}
    return {"split": _value_counts(t.column("split")), "label": _value_counts(t.column("label")),
            "presence": {m: int(pc.sum(t.column(has_column(m))).as_py() or 0)
                         for m in MODALITIES if has_column(m) in t.column_names}}


def make_worker(job: UnitJob) -> UnitWorker:
    """The fused shape's one step: unit -> PreprocessRecord."""
    return UnitWorker(job)


def make_decoder(job: UnitJob):
    """The split shape's first step (a CPU worker): unit -> UnitState."""
    return UnitWorker(job, "split", models=False).prepare


def make_embedder(job: UnitJob):
    """The split shape's second step (one worker per GPU): UnitState -> PreprocessRecord."""
    return UnitWorker(job, "split").finish
