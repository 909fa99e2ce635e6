"""Which split (train / validation / test) each row belongs to: pure functions, decided once.

`mmbatch preprocess` calls :func:`split_plan` + :func:`assign_splits` on the fused rows,
writes the result into their ``split`` column and sets the fused metadata key
``"splits_final": true``. Training and evaluation then read the ``split`` column as it
is (:func:`splits_are_final`); on older data without that key they decide the splits
here with the same functions, so both paths give the same rows.

The rules: split names are normalised (``schema.normalize_split``: ``dev-clean`` ->
validation, ``train-clean-100`` -> train, ...) and the dataset's own splits are kept; a
missing test split is carved from validation, a missing validation split (and test)
from train, and rows without a usable split value are spread over all three by
``val_fraction`` / ``test_fraction``. Carving hashes ``seed:sample_id`` to a number in
[0, 1): the same rows land in the same split on every run, on every machine, in any
file order.

No Ray, no torch, nothing from training/ or preprocess: both import this module.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from mmbatch import schema

SPLITS = schema.SPLITS
FINAL_KEY = "splits_final"        # fused metadata key: the split column is final, read it as is


def split_plan(present: Iterable[Optional[str]], val_fraction: float, test_fraction: float) -> dict:
    """How to turn the normalised split values found in the data into train/validation/test.

    ``present`` holds the normalised split values of the data (``None`` for rows
    without one; see :func:`normalized_splits`). Returns a JSON-able plan used by
    :func:`assign_splits`.
    """
    present = set(present)
    has = {s: s in present for s in SPLITS}
    if not has["train"] and not has["validation"] and not has["test"]:
        mode = "unsplit"          # no usable split values: spread every row
    else:
        mode = "column"
    vf, tf = float(val_fraction), float(test_fraction)
    return {
        "mode": mode,
        "seed_based": True,
        "val_fraction": vf,
        "test_fraction": tf,
        # train rows give validation (and test) rows when those splits are missing
        "carve_val_from_train": mode == "column" and not has["validation"],
        "carve_test_from_train": mode == "column" and not has["validation"] and not has["test"],
        # validation rows give test rows when test is missing
        "carve_test_from_val": mode == "column" and has["validation"] and not has["test"],
        "present": sorted(s for s in present if s is not None),
    }


def final_plan() -> dict:
    """The plan of data whose ``split`` column is final (``"splits_final": true``)."""
    return {"mode": "final", "seed_based": False, "present": list(SPLITS)}


def row_uniform(sample_ids: Sequence[str], seed: int) -> np.ndarray:
    """A reproducible number in [0, 1) per sample id (blake2b of ``seed:sample_id``)."""
    out = np.empty(len(sample_ids), dtype=np.float64)
    prefix = f"{seed}:".encode()
    for i, sid in enumerate(sample_ids):
        h = hashlib.blake2b(prefix + str(sid).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "big") / 2.0 ** 64
    return out


def assign_splits(sample_ids: Sequence[str], raw_splits: Sequence[Optional[str]],
                  plan: Mapping, seed: int = 0) -> np.ndarray:
    """The final split (``train``/``validation``/``test``) of each row, as an object array.

    With a ``final`` plan (:func:`final_plan`) the normalised split values are returned as
    they are (None for a row without a usable one)."""
    n = len(sample_ids)
    norm = np.array([_norm(s) for s in raw_splits], dtype=object)
    if plan["mode"] == "final":
        return np.array([s if s in SPLITS else None for s in norm], dtype=object)
    u = row_uniform(sample_ids, seed)
    vf, tf = plan["val_fraction"], plan["test_fraction"]
    out = norm.copy()

    # rows without a usable split value (or the whole data set when it has none)
    loose = np.array([s not in SPLITS for s in norm], dtype=bool) if n else np.zeros(0, bool)
    out[loose] = _spread(u[loose], vf, tf)

    if plan["carve_val_from_train"]:
        tr = norm == "train"
        test_share = tf if plan["carve_test_from_train"] else 0.0
        out[tr] = _spread(u[tr], vf, test_share)
    if plan["carve_test_from_val"]:
        va = norm == "validation"
        share = tf / (vf + tf) if (vf + tf) > 0 else 0.5
        out[va] = np.where(u[va] < share, "test", "validation")
    return out


def normalized_splits(raw: Iterable[Optional[str]]) -> set:
    """The set of normalised split values (None for rows without a usable one)."""
    out = set()
    for s in set(raw):
        n = _norm(s)
        out.add(n if n in SPLITS else None)
    return out


def splits_are_final(meta: Optional[Mapping]) -> bool:
    """True when fused metadata (Parquet ``mmbatch`` metadata or the manifest's ``metadata``)
    says the ``split`` column was decided at preprocess time."""
    return bool((meta or {}).get(FINAL_KEY))


def _norm(s: Optional[str]) -> Optional[str]:
    if s is None or (isinstance(s, float) and np.isnan(s)) or s == "":
        return None
    return schema.normalize_split(str(s))


def _spread(u: np.ndarray, vf: float, tf: float) -> np.ndarray:
    return np.where(u < vf, "validation", np.where(u < vf + tf, "test", "train")).astype(object)


__all__ = ["SPLITS", "FINAL_KEY", "split_plan", "final_plan", "assign_splits", "normalized_splits",
           "splits_are_final", "row_uniform"]
