"""Scoring: metrics from predictions, and a saved model scored on fused Parquet.

:func:`evaluate_model` refuses fused data whose feature extractors differ from
the ones the model was trained on (name, version, params or dim of any
modality): embeddings from another extractor are a different input space and
would be scored silently wrong.

Scoring runs in this process (no Ray needed), streamed over the split's Parquet row groups
(read with PyArrow through fsspec): memory is bounded by :data:`HOLD_BYTES`, not by the split.
"""
from __future__ import annotations

import json
import logging
import posixpath
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mmbatch import schema
from mmbatch.engine import storage
from mmbatch.errors import UsageError
from mmbatch.engine.manifest import Manifest

log = logging.getLogger("mmbatch.train")

FEATURE_FIELDS = ("name", "version", "dim", "params")


# --- metrics (pure) --------------------------------------------------------------------------
def compute_metrics(y: np.ndarray, logits: np.ndarray, class_names: Sequence[str]) -> dict:
    """accuracy, macro_f1, loss (mean cross-entropy), per-class precision/recall/f1/support, confusion."""
    k = len(class_names)
    y = np.asarray(y, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float32).reshape(len(y), k)
    n = len(y)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.tensor(y)).item()) if n else float("nan")
    return metrics_of(confusion(y, logits, k), loss, class_names)


def confusion(y: np.ndarray, logits: np.ndarray, k: int) -> np.ndarray:
    """[k, k] counts of (true class, predicted class)."""
    pred = logits.argmax(1) if len(y) else np.zeros(0, np.int64)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (np.asarray(y, np.int64), pred), 1)
    return conf


def metrics_of(conf: np.ndarray, loss: float, class_names: Sequence[str]) -> dict:
    """The metrics of :func:`compute_metrics` from a confusion matrix and the mean loss."""
    k = len(class_names)
    n = int(conf.sum())
    tp = np.diag(conf).astype(np.float64)
    support = conf.sum(1).astype(np.float64)
    predicted = conf.sum(0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = support > 0                      # macro-F1 over classes that occur in y
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "loss": loss,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(class_names)},
        "confusion": conf.tolist(),
        "classes": list(class_names),
    }


@torch.no_grad()
def predict(model, arrays: Mapping[str, np.ndarray], batch_size: int = 4096,
            device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], modality weights [N, M]) of ``model`` (in eval mode) over model-ready arrays."""
    was_training = model.training
    model.eval()
    n = len(arrays["y"])
    logits, weights = [], []
    for s in range(0, n, batch_size):
        # torch.tensor copies: arrays from Ray's object store are read-only, and torch warns
        # about wrapping those (the copy of one validation batch is cheap next to the model)
        batch = {k: torch.tensor(v[s:s + batch_size]).to(device) for k, v in arrays.items() if k != "y"}
        logits.append(model(batch).float().cpu())
        weights.append(model.modality_weights(batch).float().cpu())
    model.train(was_training)
    if not logits:
        c = model.head[-1].out_features if hasattr(model, "head") else 0
        return np.zeros((0, c), np.float32), np.zeros((0, len(model.modalities)), np.float32)
    return torch.cat(logits).numpy(), torch.cat(weights).numpy()


def evaluate_arrays(model, arrays: Mapping[str, np.ndarray], class_names: Sequence[str],
                    device: str | torch.device = "cpu") -> dict:
    logits, w = predict(model, arrays, device=device)
    out = compute_metrics(arrays["y"], logits, class_names)
    gw = model.global_weights() if hasattr(model, "global_weights") else None
    if model.fusion in ("weighted", "gated") and len(w):
        mean_w = gw if gw is not None else {m: float(w[:, i].mean()) for i, m in enumerate(model.modalities)}
        out["modality_weights"] = mean_w
    out["missing_rate"] = {m: float(1.0 - np.mean(arrays[schema.has_column(m)])) if len(arrays["y"]) else 0.0
                           for m in model.modalities}
    return out


class NoRows(ValueError):
    """:func:`evaluate_batches` got no rows to score."""


HOLD_BYTES = 64 * 2 ** 20       # evaluate_batches: a split whose arrays stay under this is scored whole


def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(np.asarray(v).nbytes for v in arrays.values())


def evaluate_batches(model, batches, class_names: Sequence[str], device: str | torch.device = "cpu",
                     hold_bytes: Optional[int] = None) -> dict:
    """:func:`evaluate_arrays` over an iterable of model-ready array dicts (row groups, Ray Data batches),
    with memory bounded by ``hold_bytes`` (default :data:`HOLD_BYTES`): the batches are held until they pass it, and a split that ends
    before is scored whole, exactly as :func:`evaluate_arrays` would; past it, every batch is scored as it
    comes and only the sums the metrics need are kept (confusion matrix, loss, modality weights, presence),
    so the loss may differ from the whole-split figure in its last float32 digits."""
    hold_bytes = HOLD_BYTES if hold_bytes is None else hold_bytes
    held, size, it = [], 0, iter(batches)
    for part in it:
        held.append(part)
        size += _nbytes(part)
        if size > hold_bytes:
            break
    else:
        from mmbatch.train.data import concat_arrays
        if not held:
            raise NoRows("evaluate_batches: no batches")
        return evaluate_arrays(model, concat_arrays(held), class_names, device=device)
    sums = _Sums(model, len(class_names))
    for part in held:
        sums.add(part, device)
    held.clear()
    for part in it:
        sums.add(part, device)
    return sums.metrics(class_names)


class _Sums:
    """What the metrics of :func:`evaluate_arrays` need, summed over batches."""

    def __init__(self, model, k: int):
        self.model, self.k, self.n, self.loss = model, k, 0, 0.0
        self.conf = np.zeros((k, k), np.int64)
        self.w = np.zeros(len(model.modalities))
        self.has = {m: 0 for m in model.modalities}

    def add(self, part: Mapping[str, np.ndarray], device) -> None:
        y = np.asarray(part["y"], np.int64)
        if not len(y):
            return
        logits, w = predict(self.model, part, device=device)
        self.conf += confusion(y, logits, self.k)
        self.loss += float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y), reduction="sum"
                                           ).double().item())
        if len(w):
            self.w += w.astype(np.float64).sum(0)
        for m in self.has:
            self.has[m] += int(np.asarray(part[schema.has_column(m)], bool).sum())
        self.n += len(y)

    def metrics(self, class_names: Sequence[str]) -> dict:
        model, n = self.model, self.n
        out = metrics_of(self.conf, self.loss / n if n else float("nan"), class_names)
        gw = model.global_weights() if hasattr(model, "global_weights") else None
        if model.fusion in ("weighted", "gated") and n:
            out["modality_weights"] = gw if gw is not None else {m: float(self.w[i] / n)
                                                                 for i, m in enumerate(model.modalities)}
        out["missing_rate"] = {m: 1.0 - self.has[m] / n if n else 0.0 for m in model.modalities}
        return out


# --- feature compatibility ----------------------------------------------------------------------
def check_features(model_features: Mapping[str, Mapping], data_meta: Mapping, data_dims: Mapping[str, int],
                   data_name: str = "data") -> None:
    """Raise UsageError unless every modality of the model has the same extractor in the data."""
    data_features = (data_meta or {}).get("features") or {}
    for m, want in model_features.items():
        if m not in data_dims:
            raise UsageError(f"modality '{m}': the model needs column {schema.emb_column(m)}, "
                             f"which {data_name} does not have (it has {sorted(data_dims)})")
        if int(want.get("dim", data_dims[m])) != int(data_dims[m]):
            raise UsageError(f"modality '{m}': field 'dim' differs: model was trained on {want.get('dim')}, "
                             f"{data_name} has {data_dims[m]}")
        got = data_features.get(m)
        recorded = [f for f in FEATURE_FIELDS if f in want and f != "dim"]
        if not recorded:
            continue                      # model trained on data without extractor metadata
        if got is None:
            raise UsageError(f"modality '{m}': {data_name} carries no extractor metadata, the model was "
                             f"trained on extractor {want.get('name')!r} v{want.get('version')}: "
                             "cannot check that the features match")
        for f in FEATURE_FIELDS:
            a, b = want.get(f), got.get(f)
            if f == "dim" and b is None:
                continue
            if f == "params" and isinstance(a, Mapping) and isinstance(b, Mapping) and _canon(a) != _canon(b):
                raise UsageError(f"modality '{m}': extractor field 'params' differs, {data_name} was built with "
                                 "other feature settings: "
                                 + "; ".join(_setting_diff(m, k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                                             if _canon(a.get(k)) != _canon(b.get(k)))
                                 + ". Re-extract the features with the model's settings or retrain.")
            if _canon(a) != _canon(b):
                raise UsageError(f"modality '{m}': extractor field '{f}' differs: model was trained with "
                                 f"{a!r}, {data_name} has {b!r}. Re-extract the features with the model's "
                                 "extractor settings or retrain.")


def _setting_diff(m: str, key: str, model_value, data_value) -> str:
    """``features.<m>.<key>``: model vs data, long lists (a vocabulary) summarised."""
    def show(v):
        if isinstance(v, list) and len(v) > 8:
            return f"{len(v)} entries"
        return repr(v)
    extra = ""
    if isinstance(model_value, list) and isinstance(data_value, list):
        diff = sorted(set(map(str, data_value)) ^ set(map(str, model_value)))
        extra = f" (differing entries, e.g. {diff[:5]})" if diff else " (same entries, another order)"
    return f"features.{m}.{key}: model was trained with {show(model_value)}, data has {show(data_value)}{extra}"


def _canon(v):
    return json.dumps(v, sort_keys=True, default=str)


# --- a saved model on fused data -----------------------------------------------------------------
def evaluate_model(model_dir: str, data_path: str, split: str = "test", allow_incomplete: bool = False,
                   check: bool = True) -> dict:
    """Metrics of an exported model (or training checkpoint) on ``split`` of fused Parquet data.

    ``split`` is train/validation/test (assigned exactly as in training: same
    normalisation, same seeded carving) or ``all``. The data must be one complete preprocess output
    (mmbatch.engine.provenance.check_fused) unless ``allow_incomplete``; ``check=False``: the caller checked it.
    """
    from mmbatch.train.data import (SPLITS, class_balance, data_modalities, data_split_plan, read_schema,
                                       distinct_splits, iter_split_arrays, unscorable_reason)
    from mmbatch.engine.provenance import check_fused_uri
    from mmbatch.train.models import load_model

    if check:
        check_fused_uri(data_path, allow_incomplete=allow_incomplete)
    model, spec = load_model(model_dir)
    sch = read_schema(data_path)
    dims = data_modalities(sch)
    check_features(spec["features"], schema.read_mmbatch_meta(sch), dims, data_name=f"data at {data_path}")
    if split not in ("all",) + tuple(SPLITS):
        raise UsageError(f"split must be train, validation, test or all, got {split!r}")
    mods = list(spec["arch"]["dims"])
    sp = spec.get("split", {})
    # final splits are read as they are; otherwise the plan depends on which split values the
    # data has: same rule, same seed as training
    raw_splits = distinct_splits(data_path)
    manifest = Manifest.read(data_path) if not data_path.endswith(".parquet") else None
    plan = data_split_plan(schema.read_mmbatch_meta(sch), manifest, raw_splits,
                           sp.get("val_fraction", 0.15), sp.get("test_fraction", 0.15))
    class_ids = [c["id"] for c in spec["classes"]]
    names = [c["name"] for c in spec["classes"]]
    batches = (b for b in iter_split_arrays(data_path, split, mods, dims, class_ids, plan, int(sp.get("seed", 0)))
               if len(b["y"]))
    try:
        out = evaluate_batches(model, batches, names)        # memory bounded by HOLD_BYTES, not the split
    except NoRows:
        raise UsageError(f"no labelled rows of split '{split}' in {data_path} "
                         f"with the model's classes {names}") from None
    why = unscorable_reason({n: int(v["support"]) for n, v in out["per_class"].items()}) if split != "train" else None
    if why:
        out["unscorable"] = f"the {split} split has {why}: its accuracy means nothing"
        log.warning("%s: %s", data_path, out["unscorable"])
    out["split"] = split
    out["data"] = data_path
    out["class_balance"] = class_balance({n: int(s["support"]) for n, s in out["per_class"].items()})
    return out


def default_eval_out(checkpoint: str) -> str:
    """``mmbatch evaluate``'s report folder when ``--out`` is not given: ``eval`` beside the model folder
    (never inside it: an output never lies inside an input)."""
    parent = posixpath.dirname(checkpoint.rstrip("/")) or "."
    return storage.join(parent, "eval")


def evaluate_cli(checkpoint: str, data: str, split: str = "test", out: Optional[str] = None,
                 allow_incomplete: bool = False) -> dict:
    """`mmbatch evaluate`: score, write metrics.json + PNGs + report.html under ``out``, print a summary."""
    from mmbatch.train import report
    from mmbatch.train.models import load_model

    from mmbatch.engine import ownership

    out = out or default_eval_out(checkpoint)
    ownership.check_disjoint({"--out": out}, {"CHECKPOINT": checkpoint, "--data": data})
    metrics = evaluate_model(checkpoint, data, split, allow_incomplete=allow_incomplete)
    _, spec = load_model(checkpoint)
    ownership.claim(out, "evaluation")
    summary = {
        "title": f"mmbatch evaluation: {spec.get('name', checkpoint)} on {split}",
        "name": spec.get("name", ""),
        "model": {k: spec.get(k) for k in ("arch", "classes", "features")},
        "checkpoint": checkpoint,
        "metrics": metrics,
        "history": (spec.get("training") or {}).get("history", []),
        "baselines": {},
    }
    path = report.write_report(out, summary)
    print(report.summary_table(summary))
    print(f"report: {path}")
    return metrics
