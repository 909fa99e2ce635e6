"""Fusion-quality benchmark: does every fusion model beat the best single modality?

    python -m benchmarks.fusion                       # the README table: 3 tasks x 3 seeds
    python -m benchmarks.fusion --tasks xor --seeds 0 --train 200 --val 60 --test 100 --epochs 3   # smoke

For every task (``benchmarks.fusion_tasks``: a strong audio modality next to a weaker
image and a weak text; a useless text modality; the demo's XOR task) and seed, it
generates the media, embeds them with mmbatch's default extractors (the workflow defaults
of ``features.image/audio/text``, in this process), and trains with
``mmbatch.train.loop.fit_in_memory`` -- the same model classes, optimizer, schedule,
modality dropout, epoch pass and validation-based model selection as `mmbatch train`,
without Ray -- using the default ``train`` settings:

- one unimodal model per modality (the baselines of ``mmbatch train --baselines``),
- one model per fusion (early, weighted, late, gated) on all modalities.

It prints each model's test accuracy and each fusion's gain over the best unimodal
model, writes fusion.json and fusion.md to --out, and exits with status 1, naming every
failure, when a fusion model does not beat the best single modality by ``--min-gain``
(or match it within ``--tie`` where that modality is already at ``--ceiling``), or when
the gated model puts less than ``--min-weight`` on a modality that alone scores above
``--strong``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.fusion_tasks import TASKS, TaskData  # noqa: E402
from mmbatch import schema  # noqa: E402
from mmbatch.config import TrainConfig, Workflow  # noqa: E402
from mmbatch.preprocess.features.registry import build_extractor  # noqa: E402
from mmbatch.train.evaluate import evaluate_arrays  # noqa: E402
from mmbatch.train.loop import fit_in_memory  # noqa: E402
from mmbatch.train.models import FUSIONS, arch_spec  # noqa: E402

MODALITIES = ("image", "audio", "text")


def embed(task: TaskData) -> dict[str, np.ndarray]:
    """Every modality's embeddings with the workflow's default extractor settings."""
    feats = Workflow().features
    out = {}
    for m in MODALITIES:
        x, errors = build_extractor(m, getattr(feats, m)).extract(task.items[m])
        bad = [e for e in errors if e is not None]
        if bad:
            raise RuntimeError(f"{task.name}: {len(bad)} {m} items failed to decode, e.g. {bad[0]}")
        out[m] = x
    return out


def split_arrays(task: TaskData, emb: dict[str, np.ndarray], split: str, mods) -> dict[str, np.ndarray]:
    """Model-ready arrays (as ``training.data.to_arrays`` gives them) of one split."""
    sel = task.splits == split
    arrays = {"y": task.labels[sel]}
    for m in mods:
        arrays[schema.emb_column(m)] = emb[m][sel]
        arrays[schema.has_column(m)] = np.ones(int(sel.sum()), bool)
    return arrays


def train_and_score(task: TaskData, emb, mods, fusion: str, cfg: dict) -> dict:
    classes = [{"id": i, "name": n} for i, n in enumerate(task.class_names)]
    spec = {"arch": arch_spec(fusion, {m: emb[m].shape[1] for m in mods}, len(classes), cfg["hidden"], cfg["dropout"]),
            "classes": classes}
    t0 = time.process_time()
    model, history = fit_in_memory(spec, split_arrays(task, emb, "train", mods),
                                   split_arrays(task, emb, "validation", mods), cfg)
    test = evaluate_arrays(model, split_arrays(task, emb, "test", mods), task.class_names)
    return {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "epochs": len(history),
            "modality_weights": test.get("modality_weights"), "cpu_s": time.process_time() - t0}


def run_task(name: str, seed: int, sizes, cfg: dict, fusions) -> dict:
    t0 = time.process_time()
    task = TASKS[name](sizes, seed)
    emb = embed(task)
    prep_s = time.process_time() - t0
    cfg = {**cfg, "seed": seed}
    uni = {m: train_and_score(task, emb, [m], "early", cfg) for m in MODALITIES}
    best_m = max(uni, key=lambda m: uni[m]["accuracy"])
    fused = {f: train_and_score(task, emb, list(MODALITIES), f, cfg) for f in fusions}
    for r in fused.values():
        r["gain"] = r["accuracy"] - uni[best_m]["accuracy"]
    return {"task": name, "seed": seed, "unimodal": uni, "best_unimodal": best_m, "fused": fused,
            "prep_cpu_s": prep_s}


def failures(res: dict, min_gain: float, ceiling: float, tie: float, strong: float, min_weight: float) -> list[str]:
    """Why this task/seed does not pass (empty when it does)."""
    out = []
    best = res["unimodal"][res["best_unimodal"]]["accuracy"]
    for f, r in res["fused"].items():
        ok = r["gain"] >= min_gain or (best >= ceiling and r["gain"] >= -tie)
        if not ok:
            out.append(f"{res['task']} seed {res['seed']}: {f} {r['accuracy']:.3f} vs best unimodal "
                       f"({res['best_unimodal']}) {best:.3f}: gain {100 * r['gain']:+.1f} points")
        if f == "gated" and r.get("modality_weights"):
            for m, u in res["unimodal"].items():
                if u["accuracy"] > strong and r["modality_weights"][m] < min_weight:
                    out.append(f"{res['task']} seed {res['seed']}: gated puts {r['modality_weights'][m]:.3f} weight "
                               f"on {m}, which alone scores {u['accuracy']:.3f}")
    return out


def table(results: list[dict], fusions) -> str:
    """Markdown: per task, mean (min..max over seeds) test accuracy of every model, and each
    fusion's mean and worst gain over the best unimodal model of the same seed."""
    lines = ["| task | model | test accuracy, mean (min-max) | gain over best unimodal, mean (worst) | gated weights |",
             "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["task"] for r in results):
        rs = [r for r in results if r["task"] == name]
        rows = [(f"{m} only", [r["unimodal"][m]["accuracy"] for r in rs], None, None) for m in MODALITIES]
        for f in fusions:
            w = None
            if f == "gated":
                w = ", ".join(f"{m} {np.mean([r['fused'][f]['modality_weights'][m] for r in rs]):.2f}"
                              for m in MODALITIES)
            rows.append((f, [r["fused"][f]["accuracy"] for r in rs], [r["fused"][f]["gain"] for r in rs], w))
        for model, acc, gain, w in rows:
            g = "" if gain is None else f"{100 * np.mean(gain):+.1f} ({100 * min(gain):+.1f})"
            lines.append(f"| {name} | {model} | {np.mean(acc):.3f} ({min(acc):.3f}-{max(acc):.3f}) | {g} | {w or ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=list(FUSIONS))
    ap.add_argument("--train", type=int, default=1500, help="train rows per task")
    ap.add_argument("--val", type=int, default=300, help="validation rows per task")
    ap.add_argument("--test", type=int, default=500, help="test rows per task")
    ap.add_argument("--epochs", type=int, default=None, help="default: train.epochs of the config")
    ap.add_argument("--min-gain", type=float, default=0.01, help="a fusion must beat the best unimodal by this")
    ap.add_argument("--ceiling", type=float, default=0.995, help="best unimodal at/above this: a tie passes")
    ap.add_argument("--tie", type=float, default=0.004, help="how far below a best unimodal at the ceiling is a tie")
    ap.add_argument("--strong", type=float, default=0.8, help="a modality above this alone is strong")
    ap.add_argument("--min-weight", type=float, default=0.05, help="least gated weight on a strong modality")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    cfg = TrainConfig().model_dump()            # the defaults `mmbatch train` uses
    if args.epochs:
        cfg["epochs"] = args.epochs
    sizes = (args.train, args.val, args.test)
    t0 = time.time()
    results, failed = [], []
    for name in args.tasks:
        for seed in args.seeds:
            r = run_task(name, seed, sizes, cfg, args.fusions)
            results.append(r)
            best = r["best_unimodal"]
            print(f"{name} seed {seed}: " + ", ".join(f"{m} {u['accuracy']:.3f}" for m, u in r["unimodal"].items())
                  + " | " + ", ".join(f"{f} {x['accuracy']:.3f} ({100 * x['gain']:+.1f})" for f, x in r["fused"].items())
                  + f" | best unimodal: {best}", flush=True)
            failed += failures(r, args.min_gain, args.ceiling, args.tie, args.strong, args.min_weight)
    md = table(results, args.fusions)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}"
    head = (f"Fusion benchmark: sizes train/val/test {sizes}, seeds {args.seeds}, train config defaults "
            f"(model hidden {cfg['hidden']}, {cfg['epochs']} epochs, batch {cfg['batch_size']}, lr {cfg['lr']}, "
            f"modality dropout {cfg['modality_dropout']}); {machine}; {time.time() - t0:.0f} s wall")
    print("\n" + head + "\n\n" + md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion.json").write_text(json.dumps({"sizes": sizes, "seeds": args.seeds, "config": cfg,
                                                  "machine": machine, "wall_s": time.time() - t0,
                                                  "results": results, "failures": failed}, indent=1))
    (out / "fusion.md").write_text(head + "\n\n" + md + "\n")
    if failed:
        print("\nFUSION BENCHMARK FAILED: a fusion model does not beat the best single modality\n  "
              + "\n  ".join(failed), file=sys.stderr)
        return 1
    print("\nall fusion models beat the best single modality on every task and seed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
