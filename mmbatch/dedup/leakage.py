"""Preprocess's `dedup: {leakage: off|report|quarantine}`: validation and test rows that duplicate
a train row, found by `mmbatch duplicates`' pipeline over the workflow's primary datasets with
the final splits (mmbatch.preprocess.splits), before any unit runs.

* ``report``: counts per split and modality go into the preprocess summary and ``_manifest.json``;
  the units and their fingerprints are untouched (their output does not change).
* ``quarantine``: each such row is quarantined by its unit with the reason
  ``duplicate_of_train:<modality>:<train sample_id>``; the dataset's exclusions travel in its
  FusedUnitJob (``exclude``), and each unit's fingerprint holds the exclusions of its own rows
  (:meth:`Leakage.by_unit`), so changing the setting (or the leaked rows) redoes only the units
  whose rows it changes.

The result is cached in ``OUT/_dedup/leakage.json`` under a fingerprint of the inputs and
settings, so a rerun with nothing to do neither recomputes it nor starts Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mmbatch.engine import storage
from mmbatch.schema import MODALITIES

CACHE = "_dedup/leakage.json"
REASON = "duplicate_of_train"
VERSION = "leakage-2"      # 2: per group, with the image colour signal


@dataclass
class Leakage:
    mode: str
    counts: dict = field(default_factory=dict)        # {"validation": {modality: rows}, "test": {...}}
    exclude: dict = field(default_factory=dict)       # dataset -> {sample_id: quarantine reason}

    def for_dataset(self, name: str) -> dict:
        return self.exclude.get(name, {}) if self.mode == "quarantine" else {}

    def by_unit(self, plan) -> dict:
        """(input file, row group) -> {sample_id: reason} of the excluded rows of ``plan`` (a
        preprocess DatasetPlan) in each unit that has any: the part of a unit's fingerprint that
        quarantine adds. Reads the sample_id column of the dataset's shards (only when it has any)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        exclude = self.for_dataset(plan.cfg.name)
        out: dict = {}
        if not exclude:
            return out
        wanted = pa.array(list(exclude), pa.string())
        for f in plan.files:
            fs, path = storage.url_to_fs(f)
            with fs.open(path, "rb") as fh:
                ids = pq.read_table(fh, columns=["sample_id"]).column("sample_id")
            rows = np.flatnonzero(pc.is_in(ids, value_set=wanted).to_numpy(zero_copy_only=False))
            groups = np.searchsorted(np.cumsum(plan.row_groups[f]), rows, side="right")
            for sid, k in zip(ids.take(pa.array(rows)).to_pylist(), groups.tolist()):
                out.setdefault((f, k), {})[sid] = exclude[sid]
        return out

    def manifest(self) -> dict:
        return {"mode": self.mode, "rows_duplicating_train": self.counts,
                "quarantined": sum(len(v) for v in self.exclude.values()) if self.mode == "quarantine" else 0}


def leakage_line(leak: dict) -> str:
    """One line for people: the ``leakage`` entry of a fused ``_manifest.json``."""
    counts = leak.get("rows_duplicating_train", {})
    parts = [f"{split} " + (", ".join(f"{m} {n}" for m, n in sorted(counts[split].items())) or "none")
             for split in ("validation", "test") if split in counts]
    q = f", {leak['quarantined']} quarantined" if leak.get("quarantined") else ""
    return f"rows duplicating a train row: {'; '.join(parts)} (dedup.leakage: {leak.get('mode')}{q})"


def reason(modality: str, train_id: str) -> str:
    return f"{REASON}:{modality}:{train_id}"


def find_leakage(mode: str, plans: list, split_plan: dict, seed: int, fs, out_root: str, ray_cfg=None,
                 thresholds: dict | None = None) -> Leakage:
    """Leaked rows of the datasets in ``plans`` (preprocess DatasetPlans) under the final splits,
    decided per group (mmbatch.dedup.run.leaked_rows); ``thresholds``: per modality (defaults:
    mmbatch.dedup.run.THRESHOLDS)."""
    if mode == "off":
        return Leakage(mode)
    from mmbatch.dedup.run import Shard, check_thresholds, find_duplicates, leaked_rows, shard_signatures
    from mmbatch.preprocess.splits import assign_splits

    key = storage.fingerprint({"v": VERSION, "inputs": {p.cfg.name: sorted(map(str, p.input_fps.values()))
                                                        for p in plans},
                               "split_plan": split_plan, "seed": seed,
                               "thresholds": check_thresholds(thresholds)})
    path = storage.join(out_root, CACHE)
    cached = storage.read_json(fs, path)
    if cached and cached.get("key") == key:
        found = cached["found"]
    else:
        from mmbatch.engine.runtime import init_ray

        if ray_cfg is not None:           # the workflow's Ray settings (find_duplicates would use defaults)
            init_ray(ray_cfg.address, ray_cfg.num_cpus, ray_cfg.num_gpus, ray_cfg.object_store_memory)
        shards = [Shard(p.cfg.name, p.cfg.path, f) for p in plans for f in p.files]
        res = find_duplicates(shards, shard_signatures, thresholds=thresholds, final_splits=lambda ds, ids, raw: (
            assign_splits(ids, raw, split_plan, seed).tolist()))
        found = [[ds, sid, split, dups] for (ds, sid), (split, dups) in sorted(leaked_rows(res.groups).items())]
        storage.write_json(fs, path, {"key": key, "found": found})
    counts = {s: {} for s in ("validation", "test")}
    exclude: dict = {}
    for ds, sid, split, dups in found:
        for m in sorted({d[0] for d in dups}):
            counts[split][m] = counts[split].get(m, 0) + 1
        # one reason per row: image before audio before text, then the smallest train id
        modality, _, train_id = min(dups, key=lambda d: (MODALITIES.index(d[0]), d[2]))
        exclude.setdefault(ds, {})[sid] = reason(modality, train_id)
    return Leakage(mode, counts, exclude)
