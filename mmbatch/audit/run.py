"""`mmbatch audit`: rows a model should not learn from, found across modalities.

1. The fused features of the audited splits (``audit.splits``) are read once on the driver.
2. ``audit.folds`` stratified folds; one Ray task per (fold, view) trains the training code's model on
   the other folds and predicts the fold (:mod:`mmbatch.audit.folds`). Views: each audited modality
   alone, and all of them fused.
3. The out-of-fold probabilities are scored (:mod:`mmbatch.audit.score`, cleanlab for the label part).
4. ``issues.parquet``, ``summary.json`` and ``report.html`` go to the output folder (owned as kind
   ``audit``). The command exits 3 when it flagged rows.

``train.exclude: <out>/issues.parquet`` then trains without the flagged train/validation rows.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mmbatch.audit import folds as F
from mmbatch.audit.score import FUSED, find_issues
from mmbatch.config import Workflow
from mmbatch.engine import ownership, storage
from mmbatch.errors import UsageError
from mmbatch.train.data import FusedData, LIGHT_COLUMNS, assign_splits, read_table

log = logging.getLogger("mmbatch.audit")

ISSUES = "issues.parquet"
SUMMARY = "summary.json"
REPORT = "report.html"


@dataclass
class AuditResult:
    out: str
    issues: pa.Table
    summary: dict

    @property
    def flagged(self) -> int:
        return self.issues.num_rows


def run_audit(wf: Workflow, out: str, allow_incomplete: bool = False, report: bool = True) -> AuditResult:
    """Audit the fused data of ``wf`` (``train.data`` or ``output.path``) into ``out``."""
    from mmbatch.engine.provenance import check_fused_uri
    from mmbatch.engine.runtime import init_ray
    from mmbatch.train.run import resolve_modalities

    t0 = time.time()
    ownership.check_disjoint({"--out": out}, {"train.data": wf.train_data()})
    check_fused_uri(wf.train_data(), allow_incomplete=allow_incomplete)
    ownership.claim(out, "audit", wf.name)
    sp, a = wf.splits, wf.audit
    data = FusedData.open(wf.train_data(), seed=sp.seed, val_fraction=sp.val_fraction, test_fraction=sp.test_fraction)
    mods = resolve_modalities(a.modalities, data)
    arrays, ids, splits = audited_rows(data, mods, a.splits)
    if len(ids) < 2 * a.folds:
        raise UsageError(f"{data.uri}: {len(ids)} labelled row(s) in audit.splits {a.splits}: too few for "
                         f"audit.folds={a.folds}")
    init_ray(wf.ray.address, wf.ray.num_cpus, wf.ray.num_gpus, wf.ray.object_store_memory)
    views = view_specs(wf, data, mods)
    t_read = time.time()
    probs = F.out_of_fold(arrays, F.fold_of(arrays["y"], a.folds, a.seed), views, fit_config(wf),
                          len(data.classes), mods, a.cpus_per_task)
    if len(mods) == 1:
        probs[mods[0]] = probs[FUSED]
    t_fit = time.time()
    found = find_issues(arrays["y"], probs, mods, a.min_odds)
    names = [c["name"] for c in data.classes]
    issues = issues_table(ids, splits, arrays["y"], probs, found, names, mods)
    summary = summarize(issues, splits, probs, arrays["y"], mods, wf, data)
    summary["seconds"] = {"read": round(t_read - t0, 3), "folds": round(t_fit - t_read, 3),
                          "total": round(time.time() - t0, 3)}
    write_outputs(out, issues, summary, wf if report else None)
    return AuditResult(out, issues, summary)


def audited_rows(data: FusedData, mods: list[str], splits: list[str]):
    """(arrays, sample ids, split of each row) of the labelled rows of ``splits``, in the order
    :meth:`FusedData.arrays` reads them."""
    light = read_table(data.uri, LIGHT_COLUMNS)
    row_split = assign_splits(light.column("sample_id").to_pylist(), light.column("split").to_pylist(),
                              data.plan, data.seed)
    labels = light.column("label").to_pylist()
    known = set(data.class_ids)
    all_ids = light.column("sample_id").to_pylist()
    parts, ids, where = [], [], []
    for s in splits:
        part = data.arrays(s, mods)
        mine = [i for i, (rs, lab) in enumerate(zip(row_split, labels)) if rs == s and lab is not None
                and int(lab) in known]
        if len(mine) != len(part["y"]):
            raise RuntimeError(f"{data.uri}: {s} split read as {len(part['y'])} rows and {len(mine)} ids")
        parts.append(part)
        ids += [all_ids[i] for i in mine]
        where += [s] * len(mine)
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return arrays, ids, where


def view_specs(wf: Workflow, data: FusedData, mods: list[str]) -> dict[str, dict]:
    """view -> the model spec (train.model's architecture at audit.hidden) its fold tasks build."""
    from mmbatch.train.models import arch_spec
    from mmbatch.train.run import learned_encoders

    t = wf.train
    views = [FUSED] + (mods if len(mods) > 1 else [])
    out = {}
    for v in views:
        vm = F.view_modalities(v, mods)
        arch = arch_spec(t.model if v == FUSED else "early", {m: data.dims[m] for m in vm}, len(data.classes),
                         wf.audit.hidden, t.dropout, encoders=learned_encoders(t, data, vm))
        out[v] = {"name": f"audit-{v}", "arch": arch, "modalities": vm, "classes": data.classes}
    return out


def fit_config(wf: Workflow) -> dict:
    """The training settings of the fold models: ``train``'s, with audit.epochs and audit.seed."""
    cfg = wf.train.model_dump(mode="json")
    cfg.update(epochs=wf.audit.epochs, seed=wf.audit.seed, early_stopping_patience=None)
    return cfg


def issues_table(ids, splits, y, probs, found, names, mods) -> pa.Table:
    """The flagged rows, highest score first, with every view's top class and probability."""
    rows = np.flatnonzero(found["kind"] != None)  # noqa: E711
    rows = rows[np.argsort(-found["score"][rows], kind="stable")]
    name = np.array(names, dtype=object)
    cols = {
        "sample_id": pa.array([ids[i] for i in rows], pa.string()),
        "split": pa.array([splits[i] for i in rows], pa.string()),
        "kind": pa.array(found["kind"][rows].tolist(), pa.string()),
        "score": pa.array(found["score"][rows], pa.float64()),
        "given_label": pa.array(name[y[rows]].tolist(), pa.string()),
        "suggested_label": pa.array([names[s] if s >= 0 else None for s in found["suggested"][rows]], pa.string()),
        "modality": pa.array(found["modality"][rows].tolist(), pa.string()),
    }
    for v in [FUSED] + list(mods):
        p = probs[v][rows]
        ok = ~np.isnan(p).any(axis=1) if len(rows) else np.zeros(0, bool)
        top = np.nan_to_num(p).argmax(axis=1) if len(rows) else np.zeros(0, np.int64)
        cols[f"{v}_top"] = pa.array([names[t] if k else None for t, k in zip(top, ok)], pa.string())
        cols[f"{v}_prob"] = pa.array([float(p[i, t]) if k else None for i, (t, k) in enumerate(zip(top, ok))],
                                     pa.float64())
    return pa.table(cols)


def summarize(issues: pa.Table, splits, probs, y, mods, wf: Workflow, data: FusedData) -> dict:
    """Counts per kind and split, rows audited per split, and each view's out-of-fold accuracy."""
    per: dict = {}
    for k, s in zip(issues.column("kind").to_pylist(), issues.column("split").to_pylist()):
        per.setdefault(k, Counter())[s] += 1
    acc = {}
    for v, p in probs.items():
        ok = ~np.isnan(p).any(axis=1)
        acc[v] = {"rows": int(ok.sum()), "accuracy": float((p[ok].argmax(1) == y[ok]).mean()) if ok.any() else None}
    return {"data": data.uri, "modalities": list(mods), "views": acc,
            "rows": dict(Counter(splits)), "flagged": issues.num_rows,
            "counts": {k: dict(c) for k, c in sorted(per.items())},
            "settings": wf.audit.model_dump(mode="json", exclude={"out"}), "classes": [c["name"] for c in data.classes]}


def write_outputs(out: str, issues: pa.Table, summary: dict, wf: Workflow | None) -> None:
    fs, root = storage.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    storage.atomic_write_table(fs, storage.join(root, ISSUES), issues)
    storage.write_json(fs, storage.join(root, SUMMARY), summary)
    if wf is not None:
        from mmbatch.audit.report import render_report
        storage.atomic_write_bytes(fs, storage.join(root, REPORT), render_report(issues, summary, wf).encode())


def render_summary(summary: dict) -> str:
    views = ", ".join(f"{v} {a['accuracy']:.3f}" for v, a in summary["views"].items() if a["accuracy"] is not None)
    lines = [f"audited {sum(summary['rows'].values())} rows ({', '.join(f'{s} {n}' for s, n in summary['rows'].items())});"
             f" out-of-fold accuracy: {views}"]
    for k, c in summary["counts"].items():
        lines.append(f"  {k:<20} {sum(c.values()):>6}  ({', '.join(f'{s} {n}' for s, n in sorted(c.items()))})")
    if not summary["counts"]:
        lines.append("  no rows flagged")
    return "\n".join(lines)
