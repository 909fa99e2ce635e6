"""Accuracy and scale of `mmbatch audit` on AV-shaped corpora with planted noise (benchmarks/audit_corpus.py).

    python -m benchmarks.audit                     # both corpora: precision/recall, test accuracy with/without
    python -m benchmarks.audit --scale 1000        # also the audit's time at 1000 and 4000 rows
    python -m benchmarks.audit --out benchmarks/results/audit

For each corpus: the audit's own code end to end (run_audit: fold tasks on the embedded Ray, cleanlab,
outputs), then precision and recall of the flagged rows against the planted ones (every flagged row of
every split counts against precision), then the fusion model trained by the training loop
(mmbatch.train.loop.fit_in_memory, the loop `mmbatch train` runs in each worker) on the train split with
and without the flagged rows (train.exclude's filter), scored on the clean test split. The ``tuned``
corpus is the one the defaults were chosen on; ``heldout`` (other seed, classes, sizes, noise and
shares) was looked at once, and its weak audio view showed that a confidence threshold let natural
errors through (docs/audit.md), which led to the odds criterion; ``heldout2`` was first run with the
criterion and defaults fixed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.audit_corpus import build_corpus, score

CORPORA = {
    "tuned": dict(n=3000, classes=6, dims={"image": 32, "audio": 24}, noise=2.0, label_noise=0.05, mismatch=0.05,
                  seed=0),
    "heldout": dict(n=3000, classes=10, dims={"image": 48, "audio": 16}, noise=2.2, label_noise=0.08,
                    mismatch=0.04, seed=7),
    "heldout2": dict(n=3000, classes=8, dims={"image": 24, "audio": 40}, noise=2.4, label_noise=0.06,
                     mismatch=0.06, seed=11),
}


def audit_corpus(path: str, out: str, num_cpus: int | None = None):
    from mmbatch.audit.run import run_audit
    from mmbatch.config import workflow_from_dict

    wf = workflow_from_dict({"train": {"data": path}, "ray": {"num_cpus": num_cpus}})
    t0 = time.time()
    res = run_audit(wf, out)
    return wf, res, time.time() - t0


def test_accuracy(wf, exclude: frozenset) -> float:
    """Test accuracy of the fusion model trained on the train split minus ``exclude``."""
    from mmbatch.train.data import FusedData
    from mmbatch.train.evaluate import evaluate_arrays
    from mmbatch.train.loop import fit_in_memory
    from mmbatch.train.models import arch_spec

    data = FusedData.open(wf.train_data(), exclude=exclude)
    mods = list(data.dims)
    t = wf.train
    spec = {"name": "bench", "modalities": mods, "classes": data.classes,
            "arch": arch_spec(t.model, data.dims, len(data.classes), t.hidden, t.dropout)}
    cfg = t.model_dump(mode="json")
    model, _ = fit_in_memory(spec, data.arrays("train", mods), data.arrays("validation", mods), cfg)
    return float(evaluate_arrays(model, data.arrays("test", mods), [c["name"] for c in data.classes])["accuracy"])


def run_corpus(name: str, params: dict, root: str, num_cpus: int | None) -> dict:
    c = build_corpus(os.path.join(root, name), **params)
    wf, res, seconds = audit_corpus(c.path, os.path.join(root, f"{name}-audit"), num_cpus)
    flagged = frozenset(res.issues.column("sample_id").to_pylist())
    acc_all, acc_excl = test_accuracy(wf, frozenset()), test_accuracy(wf, flagged)
    return {"corpus": {k: v for k, v in params.items()}, "seconds": round(seconds, 1), "score": score(c, res.issues),
            "counts": res.summary["counts"], "views": res.summary["views"],
            "test_accuracy": {"all_rows": acc_all, "without_flagged": acc_excl}}


def run_scale(n: int, root: str, num_cpus: int | None, repeat: int = 2) -> dict:
    """The audit's seconds at ``n`` and 4n rows, Ray started before the clock (the first audit would pay
    for it otherwise), each size ``repeat`` times interleaved; the faster run of each counts."""
    from mmbatch.engine.runtime import init_ray

    init_ray(None, num_cpus)
    paths = {rows: build_corpus(os.path.join(root, f"scale{rows}"), **{**CORPORA["tuned"], "n": rows}).path
             for rows in (n, 4 * n)}
    out: dict = {rows: {"seconds": float("inf")} for rows in paths}
    for k in range(repeat):
        for rows, path in paths.items():
            _, res, seconds = audit_corpus(path, os.path.join(root, f"scale{rows}-audit{k}"), num_cpus)
            if seconds < out[rows]["seconds"]:
                out[rows] = {"seconds": round(seconds, 1), "folds_seconds": res.summary["seconds"]["folds"]}
    out["ratio"] = round(out[4 * n]["seconds"] / out[n]["seconds"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/audit")
    ap.add_argument("--corpora", nargs="*", default=list(CORPORA))
    ap.add_argument("--scale", type=int, default=None, help="also time the audit at this many rows and 4x")
    ap.add_argument("--num-cpus", type=int, default=None)
    args = ap.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_before": os.getloadavg()}, "corpora": {}}
    with tempfile.TemporaryDirectory() as root:
        for name in args.corpora:
            results["corpora"][name] = run_corpus(name, CORPORA[name], root, args.num_cpus)
            print(name, json.dumps(results["corpora"][name]["score"]), results["corpora"][name]["test_accuracy"],
                  flush=True)
        if args.scale:
            results["scale"] = run_scale(args.scale, root, args.num_cpus)
            print("scale", results["scale"], flush=True)
    results["machine"]["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=2, default=str))
    Path(args.out + ".md").write_text(render_md(results))
    print(render_md(results))


def render_md(results: dict) -> str:
    lines = ["| corpus | kind | planted | flagged | precision | recall | test acc. all rows | without flagged | "
             "audit s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["corpora"].items():
        for kind in ("label_error", "mismatched"):
            s = r["score"][kind]
            lines.append(f"| {name} | {kind} | {s['planted']} | {s['flagged']} | {s['precision']:.3f} | "
                         f"{s['recall']:.3f} | {r['test_accuracy']['all_rows']:.3f} | "
                         f"{r['test_accuracy']['without_flagged']:.3f} | {r['seconds']} |")
    if "scale" in results:
        sc = results["scale"]
        rows = [k for k in sc if k != "ratio"]
        lines.append(f"\nscale: {rows[0]} rows {sc[rows[0]]['seconds']} s, {rows[1]} rows {sc[rows[1]]['seconds']} s, "
                     f"ratio {sc['ratio']}")
    lines.append(f"\nmachine: {results['machine']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
