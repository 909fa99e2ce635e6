"""Scoring rows from out-of-fold probabilities (pure NumPy + cleanlab; no Ray, no files).

Views: ``fused`` (every audited modality) and each modality alone. ``probs[view]`` is [n, K]; a row the
view could not score (the modality is missing) is all NaN there.

- **Label error** (``label_error``): cleanlab's confident learning flags the row on the fused view
  (:func:`cleanlab.filter.find_label_issues`), and no modality alone predicts the given label. Score:
  1 - cleanlab's self-confidence label-quality score on the fused view; suggested label: the fused top class.
- **Mismatched pair** (``mismatched_<m>``): on the view of modality ``m`` alone, confident learning puts
  the row off the diagonal (:func:`find_label_issues` with ``filter_by="confident_learning"``: the view's
  top class passes that class's per-class threshold), the view finds its top class at least ``min_odds``
  times likelier than the given label (p_m(top) / p_m(given): the likelihood ratio of "this modality
  belongs to a sample of the other class" against "a hard example of the given class"; with a prior
  share pi of mismatched rows the posterior odds are that ratio times pi / (1 - pi), so 30 flags at
  even odds for pi of about 3 %), while every other modality that scored the row predicts the given
  label. That is an image, clip or text attached to a sample of another class.
  Score: p_m(top) - p_m(given label).

A row is at most one issue: a label error is not also a mismatch (all modalities disagree with the
label there, so no other modality can agree with it).
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

FUSED = "fused"
LABEL_ERROR = "label_error"


def mismatch_kind(modality: str) -> str:
    return f"mismatched_{modality}"


def _scored(p: np.ndarray) -> np.ndarray:
    return ~np.isnan(p).any(axis=1)


def _cleanlab_issues(y: np.ndarray, p: np.ndarray, rows: np.ndarray, filter_by: str) -> np.ndarray:
    """Boolean mask over all rows: cleanlab's label issues among ``rows`` (the others False)."""
    from cleanlab.filter import find_label_issues

    out = np.zeros(len(y), bool)
    idx = np.flatnonzero(rows)
    if len(idx) < 2 or len(np.unique(y[idx])) < 2:
        return out
    q = np.clip(p[idx], 1e-6, None)
    q = q / q.sum(axis=1, keepdims=True)
    with warnings.catch_warnings():          # cleanlab warns about classes with few rows; the folds decide
        warnings.simplefilter("ignore")
        out[idx] = find_label_issues(y[idx], q, filter_by=filter_by, multi_label=False, n_jobs=1)
    return out


def label_quality(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """cleanlab's self-confidence label-quality score of each row (NaN where ``p`` has no prediction)."""
    from cleanlab.rank import get_label_quality_scores

    out = np.full(len(y), np.nan)
    rows = _scored(p)
    if rows.any():
        out[rows] = get_label_quality_scores(y[rows], p[rows], method="self_confidence")
    return out


def find_issues(y: np.ndarray, probs: Mapping[str, np.ndarray], modalities: Sequence[str],
                min_odds: float = 30.0) -> dict[str, np.ndarray]:
    """Per row: ``kind`` (object array; None when the row is fine), ``score``, ``suggested`` (class index,
    -1 where none), ``modality`` (the mismatched one, else None)."""
    y = np.asarray(y, np.int64)
    n = len(y)
    fused = probs[FUSED]
    kind = np.full(n, None, dtype=object)
    score = np.zeros(n)
    suggested = np.full(n, -1, np.int64)
    modality = np.full(n, None, dtype=object)
    top = {v: np.where(_scored(p), np.nan_to_num(p).argmax(axis=1), -1) for v, p in probs.items()}

    # label errors: confident learning on the fused view, and no modality alone backs the given label
    le = _cleanlab_issues(y, fused, _scored(fused), "prune_by_noise_rate")
    for m in modalities:
        le &= top[m] != y
    kind[le] = LABEL_ERROR
    score[le] = 1.0 - label_quality(y, fused)[le]
    suggested[le] = top[FUSED][le]

    # mismatched pairs: one modality confidently says another class, every other modality backs the label
    if len(modalities) > 1:
        for m in modalities:
            p = probs[m]
            rows = _scored(p)
            off = _cleanlab_issues(y, p, rows, "confident_learning")
            conf = np.where(rows, np.nan_to_num(p).max(axis=1), 0.0)
            others = [o for o in modalities if o != m]
            backed = np.ones(n, bool)
            for o in others:
                backed &= (top[o] == y) | (top[o] == -1)          # a missing modality neither backs nor refutes
            backed &= np.any([top[o] != -1 for o in others], axis=0)
            given = np.nan_to_num(p)[np.arange(n), y]
            mm = off & (conf >= min_odds * given) & (top[m] != y) & backed & (kind == None)  # noqa: E711
            kind[mm] = mismatch_kind(m)
            score[mm] = (conf - given)[mm]
            modality[mm] = m
    return {"kind": kind, "score": score, "suggested": suggested, "modality": modality}


def precision_recall(flagged: set, planted: set) -> dict:
    """Precision and recall of ``flagged`` ids against the ``planted`` ones (benchmarks, tests)."""
    hit = len(flagged & planted)
    return {"flagged": len(flagged), "planted": len(planted), "hit": hit,
            "precision": hit / len(flagged) if flagged else (1.0 if not planted else 0.0),
            "recall": hit / len(planted) if planted else 1.0}
