"""Ingest: read a corpus into canonical Arrow rows, as sharded Parquet, on Ray.

1. Plan (driver, no Ray): the KIND's source module lists INPUT once and returns
   one record per candidate sample plus the problems already visible
   (missing audio/transcripts, paths outside INPUT, ...); duplicates of a
   ``sample_id`` are quarantined here (the first in sorted path order wins).
2. Shard: records in a fixed order, grouped by estimated raw bytes
   (``shard_mb``, ``shard_rows``; a small input is still cut into up to
   ``PARALLEL_SHARDS`` shards of at least ``MIN_SHARD_ROWS`` rows, whatever the
   cluster's size, so it reads in parallel). A shard's fingerprint covers its
   records (with file sizes and mtimes), the options and the schema version.
3. Read (a Ray Data job, one unit per shard: mmbatch.engine.units): fetch the files, probe each image/audio
   header, write ``OUT/<shard>.parquet`` (CANONICAL + HF feature metadata) and
   ``OUT/quarantine/<shard>.parquet`` atomically, then the shard marker.
   Shards whose marker matches are skipped: a rerun after a killed driver only
   redoes what was not committed.
4. Finish: planning problems to ``quarantine/planning.parquet``, stale shards
   removed, ``_manifest.json`` written last. ``rows_in == ingested + quarantined``
   always; a mismatch is a bug and raises.

An unusable INPUT (missing, wrong KIND, nothing found) raises UsageError and
writes nothing.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa

import mmbatch
from mmbatch import schema
from mmbatch.engine import ownership, progress, storage
from mmbatch.engine.commit import CommitRecord, UnitSink
from mmbatch.schema import HASH_NAME, add_content_hashes
from mmbatch.errors import UsageError
from mmbatch.engine.manifest import Manifest
from mmbatch.ingest.sources import KINDS, common, source_module

log = logging.getLogger("mmbatch.ingest.run")

PLANNING_QUARANTINE = "planning"          # quarantine/planning.parquet
ROW_GROUP_BYTES = 32 * 2**20              # aim for ~32 MB row groups inside a shard ...
ROW_GROUP_ROWS = 1024                     # ... of at most this many rows
MAX_VALUE_MB = 2048                       # Arrow binary offsets are int32: one value < 2 GiB
UNSTORABLE = "unstorable_row"             # a row Arrow cannot convert (a value out of its column's range)


@dataclass
class IngestOptions:
    shard_mb: float = 256.0          # target raw media bytes per shard (MiB)
    shard_rows: int | None = None    # cap rows per shard
    include_sa: bool = False         # timit: ingest SA1/SA2
    phones: int = 61                 # timit: 61, 48 or 39 phone set
    columns: str | None = None       # hf/manifest: 'src=dst,...' column mapping
    split: str | None = None         # hf/manifest (and a bare class-folder tree): split when the data has none
    allow_outside: bool = False      # follow paths / symlinks outside INPUT
    max_file_mb: float = 512.0       # quarantine (too_large), unread, a sample whose files exceed this (MiB)

    def validate(self) -> None:
        if not self.shard_mb or self.shard_mb <= 0:
            raise UsageError(f"--shard-mb must be > 0 (got {self.shard_mb})")
        if self.shard_rows is not None and self.shard_rows < 1:
            raise UsageError(f"--shard-rows must be >= 1 (got {self.shard_rows})")
        if not self.max_file_mb or not 0 < self.max_file_mb < MAX_VALUE_MB:
            raise UsageError(f"--max-file-mb must be > 0 and < {MAX_VALUE_MB} (a Parquet binary value holds "
                             f"less than 2 GiB; got {self.max_file_mb})")
        if self.phones not in (61, 48, 39):
            raise UsageError(f"--phones must be 61, 48 or 39 (got {self.phones})")
        common.parse_columns(self.columns)

    def content_options(self) -> dict:
        """The options that change row content (part of every shard fingerprint; ``max_file_mb`` is:
        it decides which rows are quarantined)."""
        d = asdict(self)
        d.pop("shard_mb")
        d.pop("shard_rows")
        return d


@dataclass
class IngestSummary:
    kind: str
    input: str
    out: str
    rows_in: int
    ingested: int
    quarantined: int
    shards_total: int
    shards_skipped: int
    splits: dict[str, int] = field(default_factory=dict)     # ingested rows per split
    labels: dict[str, int] = field(default_factory=dict)     # ingested rows per label (name, else index)
    reasons: dict[str, int] = field(default_factory=dict)    # quarantined rows per reason
    skipped: dict[str, int] = field(default_factory=dict)    # deliberately not ingested (not rows)
    elapsed: float = 0.0

    @property
    def reconciled(self) -> bool:
        return self.rows_in == self.ingested + self.quarantined

    def render(self) -> str:
        w = max([len(k) for k in (*self.splits, *self.reasons, "quarantined")] + [12]) + 2
        lines = [f"ingest {self.kind}: {self.input} -> {self.out}",
                 f"  {'rows in':<{w}}{self.rows_in:>9}",
                 f"  {'ingested':<{w}}{self.ingested:>9}",
                 f"  {'quarantined':<{w}}{self.quarantined:>9}"]
        for r, n in sorted(self.reasons.items(), key=lambda x: (-x[1], x[0])):
            lines.append(f"    {r:<{w - 2}}{n:>9}")
        if self.splits:
            lines.append(f"  {'split':<{w}}{'rows':>9}")
            for s, n in sorted(self.splits.items()):
                lines.append(f"    {s:<{w - 2}}{n:>9}")
        notes = {k: v for k, v in self.skipped.items() if v}
        if notes:
            lines.append("  not ingested (by design): " + ", ".join(f"{k} {v}" for k, v in sorted(notes.items())))
        lines.append(f"  shards {self.shards_total} ({self.shards_skipped} already committed, skipped); "
                     f"{self.elapsed:.1f} s")
        if not self.reconciled:
            lines.append("  WARNING: rows in != ingested + quarantined")
        return "\n".join(lines)


# --- planning (driver) ------------------------------------------------------------------
@dataclass
class ShardTask:
    shard_id: str
    fingerprint: str
    samples: list[common.Sample]
    nbytes: int


def plan_ingest(kind: str, input: str, out: str,
                opts: IngestOptions) -> tuple[common.Plan, list[common.Sample], list[common.Problem]]:
    """(plan, samples to read in key order, planning problems incl. duplicates) — no Ray, no writes."""
    if kind not in KINDS:
        raise UsageError(f"unknown ingest kind {kind!r}; choose from {', '.join(KINDS)}")
    mod = source_module(kind)
    out_fs, out_path = storage.url_to_fs(out)
    exclude = [os.path.realpath(out_path) if storage.is_local(out_fs) else out_path]
    plan = mod.plan(input, opts, exclude=exclude)
    samples, duplicates = common.dedupe(plan.samples)
    problems = list(plan.problems) + duplicates
    if not samples:
        reasons = Counter(p.reason for p in problems)
        why = (": " + ", ".join(f"{r} x{n}" for r, n in reasons.most_common())) if reasons else ""
        raise UsageError(f"{kind}: nothing ingestible under {input!r}{why}; nothing was written")
    return plan, samples, problems


# A small input is still cut into PARALLEL_SHARDS shards (enough to keep a 16-CPU cluster's ingest and
# preprocess workers busy), but no shard is planned below MIN_SHARD_ROWS rows for that. The plan
# depends on the data and the options only, never on the cluster's size when the run starts: a
# rerun on an autoscaled cluster finds every shard it committed before.
PARALLEL_SHARDS = 8
MIN_SHARD_ROWS = 4


def min_shards(n_samples: int) -> int:
    return max(1, min(PARALLEL_SHARDS, n_samples // MIN_SHARD_ROWS))


def shard_plan(plan: common.Plan, samples: list[common.Sample], opts: IngestOptions) -> list[ShardTask]:
    """Group the samples into shards (see PARALLEL_SHARDS) and fingerprint each."""
    groups = common.make_shards(samples, opts.shard_mb * 2**20, opts.shard_rows,
                                min_shards=min_shards(len(samples)))
    base = {"kind": plan.kind, "root": plan.root, "options": opts.content_options(),
            "schema_version": schema.SCHEMA_VERSION, "content_hash": HASH_NAME}
    shards = []
    for i, g in enumerate(groups):
        fp = storage.fingerprint({**base, "samples": [s.to_dict() for s in g]})
        shards.append(ShardTask(common.shard_name(i), fp, g, sum(s.nbytes for s in g)))
    return shards


# --- one shard (runs in a Ray task; plain Python, callable without Ray) ----------------------
def data_schema(kind: str, options: dict) -> pa.Schema:
    return schema.with_metadata(schema.CANONICAL, {"stage": "ingest", "kind": kind, "options": options,
                                                   "mmbatch_version": mmbatch.__version__,
                                                   "content_hash": HASH_NAME})


def quarantine_schema(kind: str) -> pa.Schema:
    return schema.with_metadata(schema.QUARANTINE, {"stage": "ingest", "kind": kind}, hf=False)


def _counts(rows: list[dict]) -> dict:
    splits = Counter(str(r["split"]) for r in rows)
    labels = Counter(str(r["label_name"] if r["label_name"] is not None else r["label"])
                     for r in rows if r["label"] is not None or r["label_name"] is not None)
    return {"split": dict(splits), "label": dict(labels)}


# Media bytes are already compressed (JPEG, PNG, FLAC): zstd on them costs CPU for ~nothing.
MEDIA_COMPRESSION = {"image.bytes": "none", "audio.bytes": "none"}


def ingest_shard(shard_id: str, fingerprint: str, samples: list[common.Sample], ctx: dict) -> CommitRecord:
    """Read one shard's samples, write its data + quarantine Parquet; return its commit record
    (the driver writes the marker)."""
    t0 = time.perf_counter()
    kind = ctx["kind"]
    mod = source_module(kind)
    rctx = common.ReadContext(kind=kind, uri=ctx["uri"], root=ctx["root"], options=ctx["options"],
                              info=ctx.get("info") or {})
    if hasattr(mod, "read_shard"):
        rows, bad = mod.read_shard(samples, rctx)
    else:
        rows, bad = common.read_file_shard(samples, rctx, mod.build_row)
    if len(rows) + len(bad) != len(samples):  # every record must end as a row or a quarantine row
        raise RuntimeError(f"{shard_id}: {len(samples)} records gave {len(rows)} rows + {len(bad)} quarantined")
    add_content_hashes(rows)
    t1 = time.perf_counter()
    fs, out = storage.url_to_fs(ctx["out"])
    sch = data_schema(kind, ctx["options"])
    table, rows, unstorable = rows_to_table(rows, sch, kind)
    bad.extend(unstorable)
    nbytes = sum(s.nbytes for s in samples) or 1
    row_group = row_group_rows(len(rows), nbytes) if rows else None
    quarantine = pa.Table.from_pylist(bad, schema=quarantine_schema(kind)) if bad else None
    data_rel, q_rel = UnitSink(fs, out).write(shard_id, table, quarantine, row_group_size=row_group,
                                              compression=MEDIA_COMPRESSION)
    del table, quarantine
    return CommitRecord(unit=shard_id, fingerprint=fingerprint, input=f"{len(samples)} samples",
                        files=[data_rel, *([q_rel] if q_rel else [])],
                        rows_in=len(samples), rows=len(rows), quarantined=len(bad),
                        quarantine_file=q_rel, reasons=dict(Counter(b["reason"] for b in bad)),
                        counts=_counts(rows), seconds={"read": round(t1 - t0, 6),
                                                       "write": round(time.perf_counter() - t1, 6)})


def rows_to_table(rows: list[dict], sch: pa.Schema, kind: str) -> tuple[pa.Table, list[dict], list[dict]]:
    """(table, the rows in it, quarantine rows): a row that Arrow cannot convert (a value out of its
    column's range, a value over 2 GiB) is quarantined as ``unstorable_row``, naming the column, and
    the others are written; one row never fails the shard."""
    if not rows:
        return sch.empty_table(), rows, []
    try:
        return pa.Table.from_pylist(rows, schema=sch), rows, []
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        pass
    kept, bad = [], []
    for r in rows:
        why = _unstorable(r, sch)
        if why is None:
            kept.append(r)
            continue
        media = r.get("image") or r.get("audio") or {}
        bad.append(schema.quarantine_row(UNSTORABLE, why, path=media.get("path"), sample_id=r.get("sample_id"),
                                         source=kind, stage="ingest"))
    table = pa.Table.from_pylist(kept, schema=sch) if kept else sch.empty_table()
    return table, kept, bad


def _unstorable(row: dict, sch: pa.Schema) -> str | None:
    """Why one canonical row cannot become Arrow (the first column that fails), or None."""
    for f in sch:
        try:
            pa.array([row.get(f.name)], type=f.type)
        except (pa.ArrowException, OverflowError, TypeError, ValueError) as e:
            return f"column {f.name}: {type(e).__name__}: {e}"
    return None


def row_group_rows(rows: int, nbytes: int) -> int:
    """Rows per row group: ~ROW_GROUP_BYTES of media, and at most ROW_GROUP_ROWS rows (a row group is
    one unit of preprocess work: small enough that the units of a job spread over the workers)."""
    return max(1, min(ROW_GROUP_ROWS, int(rows * ROW_GROUP_BYTES / nbytes)))


class IngestWorker:
    """The per-process side of ingest: one shard in, one commit record out (see mmbatch.engine.units)."""

    def __init__(self, ctx: dict):
        self.ctx = ctx

    def __call__(self, task: "ShardTask") -> CommitRecord:
        return ingest_shard(task.shard_id, task.fingerprint, task.samples, self.ctx)


def _run_shards(pending: list[ShardTask], ctx: dict, on_result, max_workers: int | None = None) -> None:
    from mmbatch.engine import capacity
    from mmbatch.engine.units import Resources, run_units

    res = Resources(num_cpus=1)
    workers = capacity.pool_size(capacity.snapshot(), res.num_cpus, res.num_gpus, len(pending), max_workers)
    run_units(IngestWorker, ctx, sorted(pending, key=lambda t: -t.nbytes), on_result,
              workers=workers, resources=res, name=lambda t: t.shard_id,
              label=f"mmbatch ingest {ctx['kind']}")


def _summary(kind: str, input: str, out: str, plan, shards: list[ShardTask], records: dict[str, CommitRecord],
             problems: list, skipped: int, t0: float) -> IngestSummary:
    """The run's counts, from the commit records of its shards and the planning-time problems."""
    splits: Counter = Counter()
    labels: Counter = Counter()
    reasons: Counter = Counter(p.reason for p in problems)
    ingested = quarantined = 0
    for t in shards:
        r = records[t.shard_id]
        ingested += r.rows
        quarantined += r.quarantined
        splits.update(r.counts.get("split") or {})
        labels.update(r.counts.get("label") or {})
        reasons.update(r.reasons)
    quarantined += len(problems)
    rows_in = sum(len(t.samples) for t in shards) + len(problems)
    if rows_in != ingested + quarantined:
        raise RuntimeError(f"ingest bug: rows_in {rows_in} != ingested {ingested} + quarantined {quarantined}")
    return IngestSummary(kind=kind, input=input, out=out, rows_in=rows_in, ingested=ingested,
                         quarantined=quarantined, shards_total=len(shards), shards_skipped=skipped,
                         splits=dict(splits), labels=dict(labels), reasons=dict(reasons),
                         skipped=dict(plan.skipped), elapsed=time.time() - t0)


def ingest_manifest(s: IngestSummary, opts: IngestOptions, plan, shards: list[ShardTask],
                    records: dict[str, CommitRecord], qrows: list[dict]) -> Manifest:
    """The canonical folder's manifest (mmbatch.engine.manifest): its data shards, counts and the run's facts."""
    return Manifest(
        stage="ingest", kind=s.kind,
        files=[f"{t.shard_id}.parquet" for t in shards],
        counts={"split": s.splits, "label": s.labels, "quarantine_reasons": s.reasons, **s.skipped},
        extra={
            "input": s.input, "options": asdict(opts),
            "rows_in": s.rows_in, "ingested": s.ingested, "quarantined": s.quarantined,
            "input_fingerprint": storage.fingerprint([t.fingerprint for t in shards] + qrows),
            "mmbatch_version": mmbatch.__version__, "schema_version": schema.SCHEMA_VERSION,
            "quarantine_files": [f"{storage.QUARANTINE_DIR}/{PLANNING_QUARANTINE}.parquet"] + sorted(
                f for t in shards for f in records[t.shard_id].files if f.startswith(storage.QUARANTINE_DIR)),
            "info": plan.info,
            "shards_total": s.shards_total, "shards_skipped": s.shards_skipped,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": round(s.elapsed, 3),
        })


# --- the stage ----------------------------------------------------------------------------
def run_ingest(kind: str, input: str, out: str, opts: IngestOptions | None = None,
               address: str | None = None, echo: bool = True, max_workers: int | None = None) -> IngestSummary:
    """Ingest INPUT (a KIND corpus) into OUT; see the module docstring. Prints the summary when ``echo``."""
    from mmbatch.engine.runtime import init_ray

    t0 = time.time()
    opts = opts or IngestOptions()
    opts.validate()
    if max_workers is not None and max_workers < 1:
        raise UsageError(f"--max-workers must be >= 1 (got {max_workers})")
    fs, out_path = storage.url_to_fs(out)
    ownership.check_disjoint({"--out": out}, {"INPUT": input})
    plan, samples, problems = plan_ingest(kind, input, out, opts)   # UsageError before Ray starts
    shards = shard_plan(plan, samples, opts)

    ownership.claim(out, "canonical")
    storage.remove_manifest(fs, out_path)   # "complete" no longer holds while shards change

    sink = UnitSink(fs, out_path)
    records: dict[str, CommitRecord] = {}
    pending: list[ShardTask] = []
    for t in shards:
        rec = sink.committed(t.shard_id, t.fingerprint)
        if rec is not None:
            records[t.shard_id] = rec
        else:
            pending.append(t)
    skipped = len(records)
    sink.on_write_start([t.shard_id for t in shards], data_dirs=("", storage.QUARANTINE_DIR))

    # planning-time quarantine (always rewritten, possibly empty)
    qsch = quarantine_schema(kind)
    qrows = [p.to_row(kind) for p in problems]
    storage.atomic_write_table(fs, storage.join(out_path, storage.QUARANTINE_DIR, f"{PLANNING_QUARANTINE}.parquet"),
                               pa.Table.from_pylist(qrows, schema=qsch) if qrows else qsch.empty_table())

    if pending:
        init_ray(address=address)
        ctx = {"kind": kind, "uri": plan.uri, "root": plan.root, "out": out,
               "options": opts.content_options(), "info": plan.info}
        log.info("ingest %s: %d shards to read (%d already committed)", kind, len(pending), skipped)

        with progress.bar(f"ingest {kind}", total=sum(len(t.samples) for t in pending), unit="samples") as bar:
            def on_result(task: ShardTask, rec: CommitRecord) -> None:
                sink.on_write_complete(rec)
                records[task.shard_id] = rec
                bar.update(rec.rows_in)

            _run_shards(pending, ctx, on_result, max_workers)
    storage.clean_tmp(fs, out_path)

    summary = _summary(kind, input, out, plan, shards, records, problems, skipped, t0)
    ingest_manifest(summary, opts, plan, shards, records, qrows).write(fs, out_path)
    storage.clean_tmp(fs, out_path)          # the temp dirs of the manifest's and markers' atomic writes
    if echo:
        print(summary.render())
    return summary
