"""`mmbatch preprocess`: canonical shards -> per-modality features -> fused Parquet.

Two steps, each committed shard by shard (see storage.py for the protocol):

1. Features, per input dataset: one streaming Ray Data job reads the canonical
   shards that have no committed output for the current extractor config,
   decodes and embeds (stages.py), and stages pieces; the driver commits a
   shard (``OUT/_features/<dataset>/<shard>.parquet`` + marker) as soon as all
   of its rows are written or quarantined. A rerun skips committed shards; a
   changed extractor config changes the fingerprint and reprocesses.
2. Pairing + fusion, per primary shard (Ray tasks): partner embeddings are
   attached (fusion.py), the ``fused`` column computed, and
   ``OUT/<dataset>--<shard>.parquet`` committed. ``_manifest.json`` is last.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmbatch import __version__, storage
from mmbatch.config import DatasetConfig, Workflow
from mmbatch.errors import UsageError
from mmbatch.features.stages import row_group_sizes, shard_id
from mmbatch.schema import (
    MODALITIES, QUARANTINE, emb_column, fused_schema, has_column, normalize_split,
    with_metadata,
)

log = logging.getLogger("mmbatch.preprocess")
FEATURES_DIR = "_features"
STAGING_DIR = "_staging"


@dataclass
class StageStat:
    rows: int = 0
    seconds: float = 0.0
    workers: float = 1.0


@dataclass
class PreprocessSummary:
    out: str
    rows_in: int = 0
    features_rows: int = 0
    quarantined: int = 0
    rows_out: int = 0
    dropped: int = 0                 # rows not in the fused output by design (unpaired / split filter)
    shards_processed: int = 0
    shards_skipped: int = 0
    fused_processed: int = 0
    fused_skipped: int = 0
    fingerprint: str = ""
    elapsed: float = 0.0
    stages: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)
    quarantine_reasons: dict = field(default_factory=dict)

    @property
    def reconciles(self) -> bool:
        return self.rows_in == self.features_rows + self.quarantined


# --- planning -----------------------------------------------------------------------
def _feature_specs(wf: Workflow) -> dict[str, dict]:
    return {m: getattr(wf.features, m).model_dump(mode="json") for m in MODALITIES}


def _dataset_modalities(fs, files: list[str], ds: DatasetConfig) -> list[str]:
    """Modalities this dataset provides: configured, else those with any non-null value."""
    if ds.modalities:
        return [m for m in MODALITIES if m in ds.modalities]
    present = set()
    for f in files:
        pf = pq.ParquetFile(f, filesystem=fs)
        for rg in range(pf.num_row_groups):
            stats = pf.metadata.row_group(rg)
            for m in MODALITIES:
                for ci in range(stats.num_columns):
                    col = stats.column(ci)
                    if col.path_in_schema.split(".")[0] == m and col.statistics is not None \
                            and col.statistics.null_count < stats.num_rows:
                        present.add(m)
        if len(present) == len(MODALITIES):
            break
    if not present:  # no statistics: read the columns
        t = pq.read_table(files[0], columns=[m for m in MODALITIES], filesystem=fs)
        present = {m for m in MODALITIES if t.column(m).null_count < t.num_rows}
    return [m for m in MODALITIES if m in present]


def _label_map(fs, files: list[str], column: str) -> dict:
    values = set()
    for f in files:
        t = pq.read_table(f, columns=[column], filesystem=fs)
        values.update(str(v) for v in t.column(column).to_pylist() if v is not None)
    return {"column": column, "mapping": {v: i for i, v in enumerate(sorted(values))}}


@dataclass
class DatasetPlan:
    cfg: DatasetConfig
    files: list[str]
    modalities: list[str]
    label_map: dict | None
    expected: dict[str, int]          # input file -> rows
    row_groups: dict[str, list[int]]  # input file -> rows per row group (the work units)
    fingerprints: dict[str, str]      # input file -> shard fingerprint (input + extractor config)
    feature_dir: str


def plan_dataset(wf: Workflow, ds: DatasetConfig, out_fs, out_root: str, specs: dict) -> DatasetPlan:
    fs, root = storage.url_to_fs(ds.path)
    if not fs.exists(root):
        raise UsageError(f"dataset '{ds.name}': path {ds.path} does not exist (run `mmbatch ingest` first)")
    files = storage.list_parquet(fs, root)
    if not files:
        raise UsageError(f"dataset '{ds.name}': no Parquet shards under {ds.path}")
    manifest = storage.read_json(fs, storage.join(root, storage.MANIFEST))
    if manifest is None:
        raise UsageError(f"dataset '{ds.name}': {ds.path} has no _manifest.json: the ingest did not finish")
    modalities = _dataset_modalities(fs, files, ds)
    if ds.complete and not ds.modalities:
        from mmbatch.convert.transforms import KINDS
        targets = {c.target or KINDS[c.kind][1] for c in ds.complete}
        modalities = [m for m in MODALITIES if m in modalities or m in targets]
    if not modalities:
        raise UsageError(f"dataset '{ds.name}': no image, audio or text values found")
    label_map = _label_map(fs, files, ds.label_column) if ds.label_column else None
    expected, row_groups, fps = {}, {}, {}
    for f in files:
        sid = shard_id(f)
        marker = storage.read_marker(fs, root, sid)
        info = fs.info(f)
        input_fp = marker["fingerprint"] if marker else [info.get("size"), str(info.get("mtime", ""))]
        row_groups[f] = row_group_sizes(fs, f)
        expected[f] = sum(row_groups[f])
        fps[f] = storage.fingerprint({"input": input_fp, "specs": {m: specs[m] for m in modalities},
                                      "label_map": label_map, "v": "features-1",
                                      "complete": [c.model_dump(mode="json") for c in ds.complete]})
    return DatasetPlan(ds, files, modalities, label_map, expected, row_groups, fps,
                       storage.join(out_root, FEATURES_DIR, ds.name))


# --- step 1: features ------------------------------------------------------------------
def _placement(ex_needs_model: dict[str, bool], wf: Workflow) -> dict[str, dict]:
    """Resources per model stage: a GPU fraction when the cluster has GPUs, CPUs otherwise."""
    from mmbatch.runtime import cluster_cpus, cluster_gpus

    gpus, cpus = cluster_gpus(), cluster_cpus()
    model_mods = [m for m, need in ex_needs_model.items() if need]
    plan = {}
    for m in model_mods:
        cfg = getattr(wf.features, m)
        if gpus > 0:
            # Model stages share the GPUs; their actors need little CPU (decoding runs in the CPU
            # stage), so they take a quarter CPU each and leave the cores to decode tasks.
            frac = min(1.0, cfg.num_gpus if cfg.num_gpus is not None else 1.0 / len(model_mods))
            n = max(1, int(gpus / frac / len(model_mods)))
            plan[m] = {"num_gpus": frac, "num_cpus": 0.25, "concurrency": (1, n), "device": "gpu"}
        else:
            share = 1.0 / len(model_mods)
            n = max(1, int((cpus - 1) / share / len(model_mods)))
            plan[m] = {"num_gpus": 0, "num_cpus": share, "concurrency": (1, n), "device": "cpu"}
    return plan


class ShardTracker:
    """Driver side of the commit protocol: counts staged rows, commits complete shards."""

    def __init__(self, plan: DatasetPlan, out_fs, quarantine_dir: str, summary: PreprocessSummary,
                 on_commit=None):
        self.plan, self.fs, self.qdir, self.summary = plan, out_fs, quarantine_dir, summary
        self.on_commit = on_commit
        self.pieces: dict[str, list] = {}
        self.counts: dict[str, list[int]] = {}
        self.done: set[str] = set()

    def add(self, row: dict) -> None:
        shard = row["shard"]
        self.pieces.setdefault(shard, []).append(row)
        c = self.counts.setdefault(shard, [0, 0])
        c[0] += int(row["rows"])
        c[1] += int(row["quarantined"])
        for k, v in row.items():
            if k.startswith("_t_") and v is not None:
                st = self.summary.stages.setdefault(k[3:], StageStat())
                st.seconds += float(v)
                st.rows += int(row["rows"]) + int(row["quarantined"])
            if k.startswith("_dev_") and v:
                self.summary.placement.setdefault(k[5:], {}).setdefault("devices", set()).update(v.split(","))
        if sum(c) >= self.plan.expected[shard] and shard not in self.done:
            self.commit(shard)

    def commit(self, shard: str, empty: pa.Table | None = None) -> None:
        sid = shard_id(shard)
        pieces = self.pieces.get(shard, [])
        good = pa.concat_tables([pq.read_table(p["piece"], filesystem=self.fs) for p in pieces],
                                promote_options="default") if pieces else empty
        qparts = [pq.read_table(p["qpiece"], filesystem=self.fs) for p in pieces if p["qpiece"]]
        # A retried task may have staged the same rows twice: features are deterministic, keep one.
        good = _dedupe(good)
        quar = _dedupe(pa.concat_tables(qparts)) if qparts else QUARANTINE.empty_table()
        if good.num_rows + quar.num_rows != self.plan.expected[shard]:
            raise RuntimeError(f"shard {shard}: {good.num_rows} rows + {quar.num_rows} quarantined "
                               f"!= {self.plan.expected[shard]} input rows")
        good = good.sort_by("sample_id")
        feat_dir = self.plan.feature_dir
        storage.atomic_write_table(self.fs, storage.join(feat_dir, f"{sid}.parquet"), good)
        files = [f"{sid}.parquet"]
        qname = f"{self.plan.cfg.name}--{sid}.parquet"
        qpath = storage.join(self.qdir, qname)
        if quar.num_rows:
            storage.atomic_write_table(self.fs, qpath, quar)
        elif self.fs.exists(qpath):
            self.fs.rm(qpath)
        storage.write_marker(self.fs, feat_dir, sid, {
            "fingerprint": self.plan.fingerprints[shard], "rows": good.num_rows,
            "quarantined": quar.num_rows, "files": files, "quarantine_file": qname if quar.num_rows else None,
            "input": shard})
        staged = storage.join(feat_dir, STAGING_DIR, sid)
        if self.fs.exists(staged):
            self.fs.rm(staged, recursive=True)
        self.done.add(shard)
        self.summary.shards_processed += 1
        if self.on_commit is not None:
            self.on_commit(self.plan, shard, good)


def _dedupe(t: pa.Table) -> pa.Table:
    if t.num_rows == 0:
        return t
    ids = t.column("sample_id").to_pylist()
    seen, keep = set(), []
    for i, s in enumerate(ids):
        if s not in seen:
            seen.add(s)
            keep.append(i)
    return t if len(keep) == t.num_rows else t.take(pa.array(keep))


def extract_features(wf: Workflow, plan: DatasetPlan, out_fs, out_root: str, specs: dict,
                     summary: PreprocessSummary, on_commit=None) -> None:
    import ray

    from mmbatch.features.stages import (
        EncodeStage, ExtractUnits, decode_batch, get_extractor, read_and_decode, read_units, work_units,
        write_pieces,
    )
    from mmbatch.runtime import cluster_cpus

    fs_in, _ = storage.url_to_fs(plan.cfg.path)
    qdir = storage.join(out_root, storage.QUARANTINE_DIR)
    pending = []
    for f in plan.files:
        sid = shard_id(f)
        if storage.committed(out_fs, plan.feature_dir, sid, plan.fingerprints[f]):
            summary.shards_skipped += 1
        else:
            pending.append(f)
    storage.remove_stale(out_fs, plan.feature_dir,
                         [shard_id(f) for f in plan.files])
    tracker = ShardTracker(plan, out_fs, qdir, summary, on_commit)
    for f in [f for f in pending if plan.expected[f] == 0]:
        # every row of this input shard was quarantined at ingest: no row will ever reach the tracker
        tracker.commit(f, empty=_empty_features(fs_in, f, plan, specs))
    pending = [f for f in pending if f not in tracker.done]
    if not pending:
        return
    needs_model = {m: get_extractor(m, specs[m]).needs_model for m in plan.modalities}
    placement = _placement(needs_model, wf)
    for m in plan.modalities:
        summary.placement.setdefault(m, {}).update(
            {"stage": "encode actor pool" if needs_model[m] else "decode task" if placement else "extract actor pool",
             **({k: v for k, v in placement[m].items()} if m in placement else {"device": "cpu"})})

    columns = ["sample_id", "source", "split", "label", "label_name", *plan.modalities]
    if plan.label_map:
        columns.append(plan.label_map["column"])
    for c in plan.cfg.complete:
        if c.source_column and c.source_column not in columns:
            columns.append(c.source_column)
    units = work_units({f: plan.row_groups[f] for f in pending})
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    bs = wf.features.batch_size
    decode_kwargs = {"specs": specs, "modalities": plan.modalities, "label_map": plan.label_map}
    read_kwargs = {"dataset_uri": plan.cfg.path, "columns": columns}
    staging = storage.join(plan.feature_dir, STAGING_DIR)
    write_kwargs = {"staging": staging if storage.is_local(out_fs) else out_fs.unstrip_protocol(staging),
                    "modalities": plan.modalities, "source_name": plan.cfg.name}
    one_stage = not plan.cfg.complete and not placement
    if one_stage:
        # every extractor is model-free: one CPU stage reads, extracts and stages each unit
        ds = ds.map_batches(ExtractUnits, batch_format="pyarrow", batch_size=1, num_cpus=1,
                            fn_constructor_kwargs={"read": read_kwargs, "decode": decode_kwargs,
                                                   "write": write_kwargs, "batch_size": bs},
                            compute=ray.data.ActorPoolStrategy(size=max(1, int(cluster_cpus())),
                                                               max_tasks_in_flight_per_actor=2))
    elif not plan.cfg.complete:
        ds = ds.map_batches(read_and_decode, batch_format="pyarrow", batch_size=1,
                            fn_kwargs={**read_kwargs, "batch_size": bs, **decode_kwargs})
    else:
        ds = ds.map_batches(read_units, batch_format="pyarrow", batch_size=1, fn_kwargs=read_kwargs)
        from mmbatch.convert.transforms import KINDS, CompleteModality
        for c in plan.cfg.complete:
            src = KINDS[c.kind][0]
            if src not in columns and not c.source_column:
                raise UsageError(f"dataset '{plan.cfg.name}': completion {c.kind} needs the {src!r} column; "
                                 f"add it to modalities or set source_column")
            ds = ds.map_batches(CompleteModality(c.kind, c.source_column, c.target),
                                **CompleteModality.RAY_OPTIONS)
        ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=bs, zero_copy_batch=True,
                            fn_kwargs=decode_kwargs)
    for m, p in placement.items():
        ds = ds.map_batches(EncodeStage, batch_format="pyarrow", batch_size=getattr(wf.features, m).batch_size,
                            fn_constructor_kwargs={"modality": m, "spec": specs[m]},
                            num_gpus=p["num_gpus"] or None, num_cpus=p["num_cpus"],
                            compute=ray.data.ActorPoolStrategy(min_size=p["concurrency"][0],
                                                               max_size=p["concurrency"][1]))
    if not one_stage:
        ds = ds.map_batches(write_pieces, batch_format="pyarrow", batch_size=None, fn_kwargs=write_kwargs)
    for row in ds.iter_rows():
        tracker.add(row)
    missing = [f for f in pending if f not in tracker.done]
    if missing:
        raise RuntimeError(f"dataset '{plan.cfg.name}': shards not completed: {missing}")


def _empty_features(fs, path: str, plan: DatasetPlan, specs: dict) -> pa.Table:
    """The 0-row features table of an input shard without rows, typed as write_pieces writes pieces."""
    from mmbatch.features.stages import META_COLS, get_extractor
    from mmbatch.fusion import embeddings_to_arrow

    t = pq.read_table(path, columns=META_COLS, filesystem=fs)
    if plan.label_map:
        t = t.set_column(t.schema.get_field_index("label"), "label", pa.array([], pa.int64()))
        t = t.set_column(t.schema.get_field_index("label_name"), "label_name", pa.array([], pa.string()))
    for m in plan.modalities:
        dim = get_extractor(m, specs[m]).dim
        t = t.append_column(emb_column(m), embeddings_to_arrow(np.zeros((0, dim), np.float32)))
        t = t.append_column(has_column(m), pa.array([], pa.bool_()))
    return t


# --- step 2: pairing + fusion ----------------------------------------------------------------
def _read_features(fs, plan: DatasetPlan) -> pa.Table:
    tables = []
    for f in plan.files:
        sid = shard_id(f)
        tables.append(pq.read_table(storage.join(plan.feature_dir, f"{sid}.parquet"), filesystem=fs))
    return pa.concat_tables(tables, promote_options="default")


def _fuse_shard(feat_path: str, out_path: str, fs_uri_root: str, partners: dict, ctx: dict,
                features: pa.Table | None = None) -> dict:
    """Pair one primary feature shard with partner embeddings, fuse, commit. Runs as a Ray task,
    or on the driver with the shard's ``features`` table it has just committed (no re-read)."""
    from mmbatch.fusion import LabelIndex, embeddings_to_arrow, embeddings_to_numpy, fuse, take_embeddings

    fs, _ = storage.url_to_fs(fs_uri_root)
    t = features if features is not None else pq.read_table(feat_path, filesystem=fs)
    n_in = t.num_rows
    splits = ctx["splits"]
    if splits and n_in:
        wanted = {s.lower() for s in splits}
        t = t.filter(pa.array([sp is not None and (sp.lower() in wanted or (normalize_split(sp) or "") in wanted)
                               for sp in t.column("split").to_pylist()]))
    dims, own = ctx["dims"], ctx["own_modalities"]
    embs, present = {}, {}
    for m in own:
        embs[m] = embeddings_to_numpy(t.column(emb_column(m)), dims[m])
        present[m] = np.asarray(t.column(has_column(m)).to_numpy(zero_copy_only=False), bool)
    sample_ids = t.column("sample_id").to_pylist()
    paired_cols: dict[str, list] = {}
    keep_rows = np.ones(t.num_rows, bool)
    for name, (ptable, pmods) in partners.items():
        if ctx["pairing"]["by"] == "label":
            index = ctx["_index"].get(name) or LabelIndex(name, ptable.column("sample_id").to_pylist(),
                                                          ptable.column("label").to_pylist(),
                                                          ptable.column("split").to_pylist())
            ctx["_index"][name] = index
            labels, spl = t.column("label").to_pylist(), t.column("split").to_pylist()
            rows = [index.choose(s, lab, sp, ctx["pairing"]["seed"]) for s, lab, sp in zip(sample_ids, labels, spl)]
        else:
            key = ctx["pairing"]["key"]
            pos = {k: i for i, k in enumerate(ptable.column(key).to_pylist())}
            mine = t.column(key).to_pylist()
            rows = [pos.get(k) for k in mine]
            keep_rows &= np.array([r is not None for r in rows], bool)
        pids = ptable.column("sample_id").to_pylist()
        paired_cols[name] = [pids[r] if r is not None else None for r in rows]
        for m in pmods:
            if m in own:
                continue
            e, p = take_embeddings(ptable, rows, m, dims[m])
            embs[m], present[m] = e, p
    fused = fuse(embs, present, dims, ctx["fusion"]["method"], ctx["fusion"]["dim"],
                 ctx["fusion"]["weights"], ctx["fusion"]["seed"])
    schema = pa.schema([f.remove_metadata() for f in ctx["schema"]]).with_metadata(ctx["schema_metadata"])
    cols = {c: t.column(c) for c in ("sample_id", "source", "split", "label", "label_name")}
    for m in MODALITIES:
        if m in dims:
            pm = present.get(m, np.zeros(t.num_rows, bool))
            cols[emb_column(m)] = embeddings_to_arrow(embs.get(m, np.zeros((t.num_rows, dims[m]), np.float32)), pm)
    for m in MODALITIES:
        if m in dims:
            cols[has_column(m)] = pa.array(present.get(m, np.zeros(t.num_rows, bool)))
    cols["fused"] = embeddings_to_arrow(fused)
    if "paired_with" in schema.names:
        cols["paired_with"] = pa.array(
            [json.dumps({k: v[i] for k, v in paired_cols.items()}) for i in range(t.num_rows)], pa.string())
    table = pa.table(cols, schema=schema)
    if not keep_rows.all():
        table = table.filter(pa.array(keep_rows))
    storage.atomic_write_table(fs, out_path, table, row_group_size=ctx["row_group_size"])
    return {"rows_in": n_in, "rows": table.num_rows}


class FusionStep:
    """Step 2: pairing + fusion of every primary shard, committed shard by shard.

    Without pairing (``pairing.by: none``) a shard needs nothing but its own features, so
    :meth:`fuse_now` fuses it on the driver as soon as step 1 commits it, overlapping the
    feature extraction of the other shards. With pairing, :meth:`run` fuses every shard in
    Ray tasks once all datasets' features are committed.
    """

    def __init__(self, wf: Workflow, plans: list[DatasetPlan], out_fs, out_root: str, out_uri: str,
                 descriptions: dict):
        from mmbatch.fusion import fused_dim

        by = wf.pairing.by
        if by != "none" and len(plans) < 2:
            raise UsageError(f"pairing.by={by!r} needs at least two datasets; got {len(plans)}")
        if by == "none":
            primaries, partner_plans = plans, []
        else:
            primary_name = wf.pairing.primary or plans[0].cfg.name
            names = [p.cfg.name for p in plans]
            if primary_name not in names:
                raise UsageError(f"pairing.primary={primary_name!r} is not a dataset name; allowed: {names}")
            primaries = [p for p in plans if p.cfg.name == primary_name]
            partner_plans = [p for p in plans if p.cfg.name != primary_name]
        all_mods = [m for m in MODALITIES if any(m in p.modalities for p in plans)]
        dims = {m: descriptions[m]["dim"] for m in all_mods}
        fdim = fused_dim(wf.fusion.method, dims, wf.fusion.dim)
        schema = fused_schema(dims, fdim)
        if partner_plans:
            schema = schema.append(pa.field("paired_with", pa.string()))
        self.meta = {
            "kind": "fused", "mmbatch_version": __version__, "features": {m: descriptions[m] for m in all_mods},
            "dims": dims, "fused_dim": fdim, "fusion": wf.fusion.model_dump(mode="json"),
            "pairing": wf.pairing.model_dump(mode="json"),
            "datasets": {p.cfg.name: {"path": p.cfg.path, "modalities": p.modalities,
                                      "label_map": p.label_map} for p in plans},
            "workflow_hash": storage.fingerprint(wf.model_dump(mode="json")),
        }
        schema = with_metadata(schema, self.meta)
        self.partner_fp = {p.cfg.name: sorted(p.fingerprints.values()) for p in partner_plans}
        self.ctx_base = {"dims": dims, "pairing": wf.pairing.model_dump(mode="json"),
                         "fusion": wf.fusion.model_dump(mode="json"), "row_group_size": wf.output.row_group_size,
                         "schema": list(schema), "schema_metadata": schema.metadata, "_index": {}}
        self.primaries, self.partner_plans = primaries, partner_plans
        self.out_fs, self.out_root, self.out_uri = out_fs, out_root, out_uri
        self.fingerprints: dict[str, str] = {}
        self.done: set[str] = set()
        self.seconds = 0.0

    @property
    def streams(self) -> bool:
        """True when shards can be fused as soon as their features are committed."""
        return not self.partner_plans

    def _job(self, p: DatasetPlan, f: str) -> tuple[str, str, str, str, dict]:
        sid = shard_id(f)
        out_id = f"{p.cfg.name}--{sid}"
        fp = storage.fingerprint({"features": p.fingerprints[f], "partners": self.partner_fp,
                                  "fusion": self.ctx_base["fusion"], "pairing": self.ctx_base["pairing"],
                                  "splits": p.cfg.splits, "dims": self.ctx_base["dims"], "v": "fused-1"})
        self.fingerprints[out_id] = fp
        ctx = dict(self.ctx_base, own_modalities=p.modalities, splits=p.cfg.splits)
        return (out_id, fp, storage.join(p.feature_dir, f"{sid}.parquet"),
                storage.join(self.out_root, f"{out_id}.parquet"), ctx)

    def _commit(self, out_id: str, fp: str, res: dict, summary: PreprocessSummary) -> None:
        storage.write_marker(self.out_fs, self.out_root, out_id, {
            "fingerprint": fp, "rows": res["rows"], "rows_in": res["rows_in"], "files": [f"{out_id}.parquet"]})
        self.done.add(out_id)
        summary.fused_processed += 1

    def fuse_now(self, p: DatasetPlan, f: str, summary: PreprocessSummary, features: pa.Table) -> None:
        """Fuse one freshly committed feature shard (its table, as committed) on the driver
        (no pairing only)."""
        t0 = time.perf_counter()
        out_id, fp, feat_path, out_path, ctx = self._job(p, f)
        self._commit(out_id, fp, _fuse_shard(feat_path, out_path, self.out_uri, {}, ctx, features), summary)
        self.seconds += time.perf_counter() - t0

    def run(self, summary: PreprocessSummary) -> dict:
        """Fuse every primary shard not fused yet (Ray tasks); drop outputs of vanished shards."""
        import ray

        t0 = time.perf_counter()
        futures, keep_ids = [], []
        partners_ref = None
        fuse_task = ray.remote(num_cpus=1)(_fuse_task)
        for p in self.primaries:
            for f in p.files:
                out_id, fp, feat_path, out_path, ctx = self._job(p, f)
                keep_ids.append(out_id)
                if out_id in self.done:
                    continue
                if storage.committed(self.out_fs, self.out_root, out_id, fp):
                    summary.fused_skipped += 1
                    continue
                if partners_ref is None and self.partner_plans:
                    partners_ref = ray.put({q.cfg.name: (_read_features(self.out_fs, q), q.modalities)
                                            for q in self.partner_plans})
                futures.append((out_id, fp, fuse_task.remote(feat_path, out_path, self.out_uri, partners_ref, ctx)))
        for out_id, fp, fut in futures:
            self._commit(out_id, fp, ray.get(fut), summary)
        storage.remove_stale(self.out_fs, self.out_root, keep_ids)
        self.seconds += time.perf_counter() - t0
        return {"schema_meta": self.meta, "fingerprints": self.fingerprints}


def _fuse_task(feat_path, out_path, out_uri, partners, ctx):
    return _fuse_shard(feat_path, out_path, out_uri, partners or {}, ctx)


# --- entry point ----------------------------------------------------------------------------
def run_preprocess(wf: Workflow, progress: bool = True) -> PreprocessSummary:
    from mmbatch.features.stages import get_extractor
    from mmbatch.runtime import init_ray

    t0 = time.time()
    if not wf.datasets:
        raise UsageError("workflow has no datasets: add at least one under 'datasets:' "
                         "(name + path of an ingested dataset)")
    init_ray(wf.ray.address, wf.ray.num_cpus, wf.ray.num_gpus, wf.ray.object_store_memory)
    out_uri = wf.output.path
    out_fs, out_root = storage.url_to_fs(out_uri)
    out_fs.makedirs(out_root, exist_ok=True)
    specs = _feature_specs(wf)
    summary = PreprocessSummary(out=out_uri)
    plans = [plan_dataset(wf, d, out_fs, out_root, specs) for d in wf.datasets]
    used = [m for m in MODALITIES if any(m in p.modalities for p in plans)]
    descriptions = {m: get_extractor(m, specs[m]).describe() for m in used}
    fusion = FusionStep(wf, plans, out_fs, out_root, out_uri, descriptions)
    on_commit = (lambda plan, shard, table: fusion.fuse_now(plan, shard, summary, table)) if fusion.streams else None
    for p in plans:
        summary.rows_in += sum(p.expected.values())
        extract_features(wf, p, out_fs, out_root, specs, summary, on_commit)
    # counts from committed markers (covers skipped shards too)
    quarantine_reasons: dict[str, int] = {}
    for p in plans:
        for f in p.files:
            sid = shard_id(f)
            m = storage.read_marker(out_fs, p.feature_dir, sid) or {}
            summary.features_rows += int(m.get("rows", 0))
            summary.quarantined += int(m.get("quarantined", 0))
            if m.get("quarantine_file"):
                q = pq.read_table(storage.join(out_root, storage.QUARANTINE_DIR, m["quarantine_file"]),
                                  filesystem=out_fs, columns=["reason"])
                for r in q.column("reason").to_pylist():
                    quarantine_reasons[r] = quarantine_reasons.get(r, 0) + 1
    summary.quarantine_reasons = quarantine_reasons
    fused = fusion.run(summary)
    summary.stages["fuse"] = StageStat(rows=summary.features_rows, seconds=fusion.seconds)
    summary.fingerprint = storage.fingerprint(sorted(fused["fingerprints"].items()))
    storage.clean_tmp(out_fs, out_root)
    for p in plans:
        storage.clean_tmp(out_fs, p.feature_dir)
        # every shard is committed now; pieces left here belong to a run killed between a shard's
        # marker and the removal of its staged pieces (or before a shard's commit): garbage
        staging = storage.join(p.feature_dir, STAGING_DIR)
        if out_fs.exists(staging):
            out_fs.rm(staging, recursive=True)
    manifest = _write_manifest(wf, out_fs, out_root, fused, summary, t0)
    summary.rows_out = manifest["rows"]
    summary.dropped = summary.features_rows - summary.rows_out
    summary.elapsed = time.time() - t0
    if progress:
        print(render_summary(summary))
    return summary


def _write_manifest(wf, out_fs, out_root, fused, summary, t0) -> dict:
    files = storage.list_parquet(out_fs, out_root)
    counts_split: dict[str, int] = {}
    counts_label: dict[str, int] = {}
    presence: dict[str, int] = {}
    rows = 0
    for f in files:
        t = pq.read_table(f, filesystem=out_fs, columns=["split", "label"] +
                          [c for c in pq.read_schema(f, filesystem=out_fs).names if c.startswith("has_")])
        rows += t.num_rows
        for k, v in zip(*np.unique(np.array(t.column("split").to_pylist(), dtype=object).astype(str),
                                   return_counts=True)):
            counts_split[k] = counts_split.get(k, 0) + int(v)
        for k, v in zip(*np.unique(np.array(t.column("label").to_pylist(), dtype=object).astype(str),
                                   return_counts=True)):
            counts_label[k] = counts_label.get(k, 0) + int(v)
        for c in t.column_names:
            if c.startswith("has_"):
                presence[c[4:]] = presence.get(c[4:], 0) + int(pc.sum(t.column(c)).as_py() or 0)
    manifest = {
        "kind": "fused", "mmbatch_version": __version__, "rows": rows, "rows_in": summary.rows_in,
        "features_rows": summary.features_rows, "quarantined": summary.quarantined,
        "quarantine_reasons": summary.quarantine_reasons, "dropped": summary.features_rows - rows,
        "counts": {"split": counts_split, "label": counts_label, "presence": presence},
        "files": [f.rstrip("/").rsplit("/", 1)[-1] for f in files],
        "fingerprint": storage.fingerprint(sorted(fused["fingerprints"].items())),
        "metadata": fused["schema_meta"],
        "shards": {"processed": summary.shards_processed, "skipped": summary.shards_skipped,
                   "fused_processed": summary.fused_processed, "fused_skipped": summary.fused_skipped},
        "stages": {k: {"rows": v.rows, "busy_seconds": round(v.seconds, 3)} for k, v in summary.stages.items()},
        "placement": _jsonable(summary.placement),
        "elapsed_seconds": round(time.time() - t0, 3),
    }
    storage.write_json(out_fs, storage.join(out_root, storage.MANIFEST), manifest)
    return manifest


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (set, tuple, list)):
        return sorted(_jsonable(v) for v in x) if isinstance(x, set) else [_jsonable(v) for v in x]
    return x


def render_summary(s: PreprocessSummary) -> str:
    lines = [f"preprocess -> {s.out}",
             f"  rows in {s.rows_in}  features {s.features_rows}  quarantined {s.quarantined}  "
             f"fused rows out {s.rows_out}  (dropped by pairing/filters: {s.features_rows - s.rows_out})",
             f"  shards: {s.shards_processed} processed, {s.shards_skipped} already committed; "
             f"fused files: {s.fused_processed} written, {s.fused_skipped} unchanged",
             f"  reconciles (in = features + quarantined): {'yes' if s.reconciles else 'NO'}"]
    if s.quarantine_reasons:
        lines.append("  quarantined by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(s.quarantine_reasons.items())))
    if s.stages:
        lines.append(f"  {'stage':<10}{'rows':>8}{'busy s':>10}{'rows/busy s':>14}")
        worst = max(s.stages.items(), key=lambda kv: kv[1].seconds)[0]
        for k, v in s.stages.items():
            rate = v.rows / v.seconds if v.seconds > 0 else float("inf")
            mark = "  <- bottleneck" if k == worst else ""
            lines.append(f"  {k:<10}{v.rows:>8}{v.seconds:>10.2f}{rate:>14.1f}{mark}")
    if s.placement:
        lines.append("  placement: " + "; ".join(
            f"{m}: {p.get('stage', '?')} on {','.join(sorted(p.get('devices', []))) or p.get('device', 'cpu')}"
            for m, p in s.placement.items()))
    lines.append(f"  elapsed {s.elapsed:.1f} s")
    return "\n".join(lines)
