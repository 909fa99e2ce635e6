"""Counts, the per-stage table and the manifest of a preprocess run, from commit records only."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mmbatch import __version__
from mmbatch.engine import storage
from mmbatch.engine.manifest import Manifest

if TYPE_CHECKING:
    from mmbatch.preprocess.unit import PreprocessRecord


@dataclass
class StageStat:
    rows: int = 0
    seconds: float = 0.0


@dataclass
class PreprocessSummary:
    out: str
    rows_in: int = 0
    features_rows: int = 0           # rows that passed extraction (every dataset)
    quarantined: int = 0
    rows_out: int = 0                # fused rows written
    dropped: int = 0                 # rows not in the fused output by design (pairing partners, split filter)
    shards_processed: int = 0        # units (row groups) computed in this run, every dataset
    shards_skipped: int = 0          # units already committed with the same fingerprint
    fused_processed: int = 0         # ... of which fused output units
    fused_skipped: int = 0
    fingerprint: str = ""
    elapsed: float = 0.0
    stages: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)
    quarantine_reasons: dict = field(default_factory=dict)
    quarantine_files: list = field(default_factory=list)
    driver_cpu_s: float = 0.0
    leakage: dict = field(default_factory=dict)    # dedup.leakage: rows duplicating train (mmbatch.dedup.leakage)

    @property
    def reconciles(self) -> bool:
        return self.rows_in == self.features_rows + self.quarantined

    def add(self, rec: PreprocessRecord, fused: bool, processed: bool) -> None:
        """Count one unit (computed now, or committed by an earlier run)."""
        self.rows_in += rec.rows_in
        self.quarantined += rec.quarantined
        self.features_rows += rec.rows_in - rec.quarantined
        if fused:
            self.rows_out += rec.rows
        for r, k in rec.reasons.items():
            self.quarantine_reasons[r] = self.quarantine_reasons.get(r, 0) + k
        if rec.quarantine_file:
            self.quarantine_files.append(rec.quarantine_file)
        if processed:
            self.shards_processed += 1
            self.fused_processed += int(fused)
            for stage, s in rec.seconds.items():
                st = self.stages.setdefault(stage, StageStat())
                st.seconds += s
                st.rows += rec.rows_in
            for m, d in rec.devices.items():
                self.placement.setdefault(m, {}).setdefault("devices", set()).add(d)
        else:
            self.shards_skipped += 1
            self.fused_skipped += int(fused)


def write_manifest(fs, out_root: str, records: list[PreprocessRecord], summary: PreprocessSummary,
                   meta: dict, t0: float, workflow_hash: str = "") -> Manifest:
    """``_manifest.json`` from the fused units' records of this run's plan (no data file is read): what
    readers check the data files against (mmbatch.engine.provenance.check_fused)."""
    counts: dict[str, Counter] = {"split": Counter(), "label": Counter(), "presence": Counter()}
    for r in records:
        for k in counts:
            counts[k].update(r.counts.get(k, {}))
    manifest = Manifest(
        stage="preprocess", kind="fused",
        files=sorted(f for r in records for f in r.files),
        counts={**{k: dict(v) for k, v in counts.items()}, "quarantine_reasons": summary.quarantine_reasons},
        metadata=meta,
        extra={
            "mmbatch_version": __version__, "rows": summary.rows_out, "rows_in": summary.rows_in,
            "features_rows": summary.features_rows, "quarantined": summary.quarantined, "dropped": summary.dropped,
            "quarantine_files": sorted(summary.quarantine_files),
            "fingerprint": summary.fingerprint,
            "unit_fingerprints": {f: r.fingerprint for r in records for f in r.files},
            "workflow_hash": workflow_hash,
            "shards": {"processed": summary.shards_processed, "skipped": summary.shards_skipped,
                       "fused_processed": summary.fused_processed, "fused_skipped": summary.fused_skipped},
            "stages": {k: {"rows": v.rows, "busy_seconds": round(v.seconds, 3)} for k, v in summary.stages.items()},
            "placement": storage.jsonable(summary.placement),
            "driver_cpu_seconds": round(summary.driver_cpu_s, 3),
            **({"leakage": summary.leakage} if summary.leakage else {}),
            "elapsed_seconds": round(time.time() - t0, 3),
        })
    manifest.write(fs, out_root)
    return manifest


def render_summary(s: PreprocessSummary) -> str:
    lines = [f"preprocess -> {s.out}",
             f"  rows in {s.rows_in}  features {s.features_rows}  quarantined {s.quarantined}  "
             f"fused rows out {s.rows_out}  (dropped by pairing/filters: {s.features_rows - s.rows_out})",
             f"  units: {s.shards_processed} processed, {s.shards_skipped} already committed; "
             f"fused files: {s.fused_processed} written, {s.fused_skipped} unchanged",
             f"  reconciles (in = features + quarantined): {'yes' if s.reconciles else 'NO'}"]
    if s.quarantine_reasons:
        lines.append("  quarantined by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(s.quarantine_reasons.items())))
        lines.append(f"  quarantined rows are listed in {storage.join(s.out, storage.QUARANTINE_DIR)}/ "
                     f"({len(s.quarantine_files)} file(s))")
    if s.leakage:
        from mmbatch.dedup.leakage import leakage_line
        lines.append("  " + leakage_line(s.leakage))
    if s.stages:
        lines.append(f"  {'stage':<10}{'rows':>8}{'busy s':>10}{'rows/busy s':>14}")
        worst = max(s.stages.items(), key=lambda kv: kv[1].seconds)[0]
        for k, v in s.stages.items():
            rate = v.rows / v.seconds if v.seconds > 0 else float("inf")
            mark = "  <- bottleneck" if k == worst else ""
            lines.append(f"  {k:<10}{v.rows:>8}{v.seconds:>10.2f}{rate:>14.1f}{mark}")
    if s.placement:
        lines.append("  placement: " + "; ".join(
            f"{m}: {p.get('shape', 'fused')} shape, {p.get('stage', 'unit worker')} "
            f"on {','.join(sorted(p.get('devices', []))) or p.get('device', 'cpu')}"
            for m, p in s.placement.items()))
    lines.append(f"  elapsed {s.elapsed:.1f} s (driver CPU {s.driver_cpu_s:.2f} s)")
    return "\n".join(lines)
