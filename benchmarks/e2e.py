"""End-to-end encoders vs frozen features on an AV-shaped task.

    python -m benchmarks.e2e                                   # the docs/e2e-model.md table
    python -m benchmarks.e2e --train 300 --val 100 --test 200 --epochs 2   # smoke

The task (:mod:`benchmarks.e2e_task`): 10 classes; a 28x28 occluded, noisy digit image; a
1 s spoken digit word (espeak-ng, 16 voices x 2 rates x 2 pitches, random speed and onset) in
white/pink noise at -14..-6 dB SNR; a short sentence that names the class 35 % of the time.
Each modality is turned into features with mmbatch's extractors in this process -- the
sequence extractors (pixels, logmel_frames, tokens with a train-split vocabulary) and the
frozen defaults (HOG+colour, log-mel statistics, hashing) -- and read back through
``mmbatch.train.data.to_arrays``, the arrays ``mmbatch train`` feeds its workers. Every
model is trained by ``mmbatch.train.loop.fit_in_memory`` (the epoch pass, optimizer,
schedule, modality dropout and validation-based selection of `mmbatch train`, one process):

- end to end: early fusion of ImageCNN + AudioLSTM + TextLSTM, and each encoder alone;
- frozen: early fusion of the frozen features, and each frozen feature alone.

Reported per model: test accuracy, test errors, train seconds per epoch (one process, one
thread), parameters and size of the state dict. Writes e2e.json and e2e.md to --out and exits
1 when end-to-end fusion does not make >= --min-error-cut fewer test errors than the best
end-to-end single modality.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from benchmarks.e2e_task import generate, sequence_features  # noqa: E402
from mmbatch import schema  # noqa: E402
from mmbatch.config import AudioFeatures, ImageFeatures, TextFeatures, TrainConfig, Workflow  # noqa: E402
from mmbatch.preprocess.features.registry import build_extractor  # noqa: E402
from mmbatch.preprocess.features.sequence import build_vocabulary  # noqa: E402
from mmbatch.train.data import to_arrays  # noqa: E402
from mmbatch.train.encoders import ENCODERS, encoder_spec  # noqa: E402
from mmbatch.train.evaluate import evaluate_arrays  # noqa: E402
from mmbatch.train.loop import fit_in_memory  # noqa: E402
from mmbatch.train.models import arch_spec, n_params  # noqa: E402

MODALITIES = ("image", "audio", "text")
CLASSES = [{"id": i, "name": str(i)} for i in range(10)]


def extract(items: dict, cfgs: dict) -> tuple[pa.Table, dict, dict]:
    """(fused-like table of the task, dims, feature descriptions) for the feature configs ``cfgs``."""
    cols = {"sample_id": pa.array([f"s{i:05d}" for i in range(len(items["labels"]))]),
            "split": pa.array(list(items["splits"]), pa.string()), "label": pa.array(items["labels"], pa.int64())}
    dims, feats = {}, {}
    for m in MODALITIES:
        ex = build_extractor(m, cfgs[m])
        values, errors = ex.extract(items[m])
        bad = [e for e in errors if e is not None]
        if bad:
            raise RuntimeError(f"{len(bad)} {m} items failed, e.g. {bad[0]}")
        present = np.ones(len(values), bool)
        if ex.sequence:
            cols.update(ex.to_arrow(values, present))
        else:
            cols[schema.emb_column(m)] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), ex.dim)
        cols[schema.has_column(m)] = pa.array(present)
        dims[m], feats[m] = ex.dim, ex.describe()
    return pa.table(cols), dims, feats


def split_arrays(table: pa.Table, dims: dict, split: str) -> dict:
    t = table.filter(pa.compute.equal(table.column("split"), split))
    return to_arrays(t, MODALITIES, dims, [c["id"] for c in CLASSES])


def pick(arrays: dict, mods) -> dict:
    keep = {"y"} | {k for m in mods for k in (schema.emb_column(m), schema.has_column(m), f"{m}_len")}
    return {k: v for k, v in arrays.items() if k in keep}


def train_and_score(data: dict, dims: dict, feats: dict, mods, cfg: dict, end_to_end: bool) -> dict:
    encoders = {m: encoder_spec(m, ENCODERS[m], cfg["encoder_hidden"], feats[m]) for m in mods} if end_to_end else None
    spec = {"arch": arch_spec("early", {m: dims[m] for m in mods}, len(CLASSES), cfg["hidden"], cfg["dropout"],
                              encoders=encoders), "classes": CLASSES}
    t0 = time.perf_counter()
    model, history = fit_in_memory(spec, pick(data["train"], mods), pick(data["validation"], mods), cfg)
    train_s = time.perf_counter() - t0
    test = evaluate_arrays(model, pick(data["test"], mods), [c["name"] for c in CLASSES])
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    n = len(data["test"]["y"])
    return {"modalities": list(mods), "end_to_end": end_to_end, "accuracy": test["accuracy"],
            "errors": int(round((1 - test["accuracy"]) * n)), "epochs": len(history),
            "epoch_s": train_s / max(len(history), 1), "params": n_params(model), "bytes": len(buf.getvalue())}


def run(sizes, seed: int, cfg: dict, max_frames: int, n_mels: int) -> dict:
    t0 = time.perf_counter()
    items = generate(sizes, seed)
    gen_s = time.perf_counter() - t0
    seq = sequence_features(n_mels=n_mels, max_frames=max_frames)
    seq["text"]["vocabulary"] = build_vocabulary([t for t, s in zip(items["text"], items["splits"]) if s == "train"])
    seq_cfgs = {"image": ImageFeatures(**seq["image"]), "audio": AudioFeatures(**seq["audio"]),
                "text": TextFeatures(**seq["text"])}
    frozen_cfgs = {m: getattr(Workflow().features, m) for m in MODALITIES}
    out = {"sizes": list(sizes), "seed": seed, "generate_s": gen_s, "models": {}}
    for kind, cfgs in (("end_to_end", seq_cfgs), ("frozen", frozen_cfgs)):
        t0 = time.perf_counter()
        table, dims, feats = extract(items, cfgs)
        out[f"extract_{kind}_s"] = time.perf_counter() - t0
        data = {s: split_arrays(table, dims, s) for s in ("train", "validation", "test")}
        e2e = kind == "end_to_end"
        for mods in ([m] for m in MODALITIES):
            out["models"][f"{kind}:{mods[0]}"] = train_and_score(data, dims, feats, mods, cfg, e2e)
            print(f"{kind}:{mods[0]}", json.dumps(out["models"][f"{kind}:{mods[0]}"]), flush=True)
        out["models"][f"{kind}:fusion"] = train_and_score(data, dims, feats, MODALITIES, cfg, e2e)
        print(f"{kind}:fusion", json.dumps(out["models"][f"{kind}:fusion"]), flush=True)
    return out


def verdict(res: dict, min_cut: float) -> dict:
    ms = res["models"]
    best = min((m for m in MODALITIES), key=lambda m: ms[f"end_to_end:{m}"]["errors"])
    best_err = ms[f"end_to_end:{best}"]["errors"]
    fused = ms["end_to_end:fusion"]["errors"]
    cut = 1 - fused / best_err if best_err else 0.0
    return {"best_single": best, "best_single_errors": best_err, "fusion_errors": fused, "error_cut": cut,
            "passes": cut >= min_cut, "beats_frozen_fusion": fused < ms["frozen:fusion"]["errors"]}


def table(res: dict) -> str:
    ms = res["models"]
    n = res["sizes"][2]
    lines = ["| model | encoders | test accuracy | test errors (of %d) | s / epoch | parameters | size |" % n,
             "|---|---|---|---|---|---|---|"]
    for kind, label in (("end_to_end", "learned (CNN / LSTM / LSTM)"), ("frozen", "frozen (HOG / log-mel stats / hashing)")):
        for name in ("fusion",) + MODALITIES:
            r = ms[f"{kind}:{name}"]
            what = "early fusion, all three" if name == "fusion" else f"{name} alone"
            lines.append(f"| {what} | {label} | {r['accuracy']:.3f} | {r['errors']} | {r['epoch_s']:.2f} | "
                         f"{r['params']:,} | {r['bytes'] / 1e6:.2f} MB |")
    v = res["verdict"]
    lines += ["", f"End-to-end fusion: {v['fusion_errors']} test errors against {v['best_single_errors']} for the best "
              f"end-to-end single modality ({v['best_single']}): {100 * v['error_cut']:.0f} % fewer "
              f"({'meets' if v['passes'] else 'misses'} the >= {100 * res['min_error_cut']:.0f} % bar). "
              f"Frozen-feature early fusion: {ms['frozen:fusion']['errors']} errors "
              f"({'end to end is better' if v['beats_frozen_fusion'] else 'frozen is as good or better'})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--max-frames", type=int, default=100)
    ap.add_argument("--n-mels", type=int, default=40)
    ap.add_argument("--min-error-cut", type=float, default=0.25)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = {**TrainConfig(epochs=a.epochs, seed=a.seed).model_dump(), "encoder_hidden": 64}
    res = run((a.train, a.val, a.test), a.seed, cfg, a.max_frames, a.n_mels)
    res["min_error_cut"] = a.min_error_cut
    res["verdict"] = verdict(res, a.min_error_cut)
    res["settings"] = {k: cfg[k] for k in ("epochs", "batch_size", "lr", "hidden", "dropout", "modality_dropout",
                                           "optimizer", "schedule", "encoder_hidden")}
    res["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                      "note": "one process, one torch thread; measured on a shared, loaded 2-core VM"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(res, indent=2))
    md = table(res)
    (out / "e2e.md").write_text(md + "\n")
    print(md)
    return 0 if res["verdict"]["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())
