"""Cross-validated models: out-of-fold class probabilities of every row, per view, from Ray tasks.

One Ray task per (fold, view) trains the training code's own model and loop
(:func:`mmbatch.train.loop.fit_in_memory`: the same FusionModel, optimizer, schedule, modality
dropout and model selection) on the other folds' rows and predicts the fold's rows. The arrays go to
the object store once; each task gets them by reference with its row indices. Each task asks for
``audit.cpus_per_task`` CPUs (fractional: several tasks share a core on a small machine) and runs
torch on one thread.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from mmbatch import schema
from mmbatch.audit.score import FUSED

INNER_VAL = 0.1          # share of a fold's training rows held out to pick its best epoch


def fold_of(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index of each row, stratified by class (a class with fewer rows than folds is spread as
    far as it goes)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(y), np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        out[idx] = (np.arange(len(idx)) + rng.integers(folds)) % folds
    return out


def view_rows(arrays: Mapping[str, np.ndarray], view: str, modalities: Sequence[str]) -> np.ndarray:
    """Rows a view can learn from and score: every row for ``fused``; rows with the modality otherwise."""
    if view == FUSED:
        return np.ones(len(arrays["y"]), bool)
    return np.asarray(arrays[schema.has_column(view)], bool)


def view_modalities(view: str, modalities: Sequence[str]) -> list[str]:
    return list(modalities) if view == FUSED else [view]


def select(arrays: Mapping[str, np.ndarray], idx: np.ndarray, mods: Sequence[str]) -> dict[str, np.ndarray]:
    keep = ["y"] + [k for m in mods for k in (schema.emb_column(m), schema.has_column(m), f"{m}_len")]
    return {k: np.asarray(arrays[k])[idx] for k in keep if k in arrays}


def fit_predict(arrays: Mapping[str, np.ndarray], train_idx: np.ndarray, score_idx: np.ndarray,
                spec: Mapping, cfg: Mapping) -> np.ndarray:
    """Softmax probabilities [len(score_idx), K] of a model trained (fit_in_memory) on ``train_idx``,
    with INNER_VAL of those rows held out to pick the best epoch. Runs in a Ray task (or in-process)."""
    import torch

    from mmbatch.train.evaluate import predict
    from mmbatch.train.loop import fit_in_memory

    torch.set_num_threads(1)
    mods = spec["modalities"]
    rng = np.random.default_rng(cfg["seed"])
    perm = rng.permutation(train_idx)
    n_val = max(1, int(len(perm) * INNER_VAL))
    model, _ = fit_in_memory(spec, select(arrays, perm[n_val:], mods), select(arrays, perm[:n_val], mods), cfg)
    logits, _ = predict(model, select(arrays, score_idx, mods))
    return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()


def out_of_fold(arrays: Mapping[str, np.ndarray], folds: np.ndarray, views: Mapping[str, dict], cfg: Mapping,
                num_classes: int, modalities: Sequence[str], cpus_per_task: float) -> dict[str, np.ndarray]:
    """view -> [n, K] out-of-fold probabilities (NaN rows: not scored by that view), one Ray task per
    (fold, view); ``views``: view -> its model spec."""
    import ray

    n = len(arrays["y"])
    ref = ray.put(dict(arrays))
    task = ray.remote(num_cpus=cpus_per_task)(fit_predict)
    pending = []
    for view, spec in views.items():
        rows = view_rows(arrays, view, modalities)
        for k in np.unique(folds):
            tr = np.flatnonzero(rows & (folds != k))
            sc = np.flatnonzero(rows & (folds == k))
            if len(sc) and len(np.unique(arrays["y"][tr])) > 1:
                pending.append((view, sc, task.remote(ref, tr, sc, spec, {**cfg, "seed": cfg["seed"] + int(k)})))
    out = {v: np.full((n, num_classes), np.nan) for v in views}
    results = ray.get([r for _, _, r in pending])
    for (view, sc, _), p in zip(pending, results):
        out[view][sc] = p
    return out
