"""The held-out corpus's precision/recall curves: shipped in the package (heldout_curve.json,
written by benchmarks/duplicates.py --accuracy) and drawn in every report.html of
`mmbatch duplicates`, the default threshold and the run's own marked (Ray-free)."""
from __future__ import annotations

import base64
import re
import tomllib
from pathlib import Path

import numpy as np

from mmbatch.dedup import run as drun
from mmbatch.dedup.report import CURVE_CAPTION, CURVE_FILE, curve_at, heldout_curves, render_report

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_curve_has_one_curve_per_modality_at_the_default_threshold():
    curves = heldout_curves()
    assert set(curves) == set(drun.THRESHOLDS)
    for m, c in curves.items():
        t, p, r = (np.asarray(c[k], float) for k in ("thresholds", "precision", "recall"))
        assert len(t) == len(p) == len(r) > 10, m
        assert t[0] == 1.0 and np.all(np.diff(t) < 0), m                 # descending from 1
        assert np.all((p >= 0) & (p <= 1)) and np.all((r >= 0) & (r <= 1)), m
        assert np.all(np.diff(r) >= 0) and r[-1] == 1.0, m               # recall grows as the threshold falls
        assert c["threshold"] == drun.THRESHOLDS[m], m                   # the curve marks today's default
        assert 0 < c["true_pairs"] <= c["candidates"] and "held-out" in c["corpus"], m
        assert curve_at(c, c["threshold"])[0] == c["threshold"]          # the default is a point of the curve
    # declared as package data, so a (non-editable) install carries it
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert CURVE_FILE in cfg["tool"]["setuptools"]["package-data"]["mmbatch.dedup"]
    assert (ROOT / "mmbatch" / "dedup" / CURVE_FILE).is_file()


def test_report_draws_each_modality_with_default_and_run_thresholds():
    used = {**drun.THRESHOLDS, "image": 0.95}
    page = render_report(drun.PAIR_SCHEMA.empty_table(), {"modalities": {}, "thresholds": used}, [])
    assert CURVE_CAPTION in page
    curves = heldout_curves()
    for m in drun.THRESHOLDS:
        png = re.search(rf"alt='{m} precision and recall against the threshold' src='data:image/png;base64,([^']+)'",
                        page)
        assert png and base64.b64decode(png.group(1)).startswith(b"\x89PNG"), m
        _, p, r = curve_at(curves[m], drun.THRESHOLDS[m])
        assert (f"<td>{m}</td><td>default</td><td>{drun.THRESHOLDS[m]:.3f}</td>"
                f"<td>precision {p:.3f}, recall {r:.3f}</td>") in page, m
    # the run's own threshold is marked only where it differs from the default
    _, p, r = curve_at(curves["image"], 0.95)
    assert f"<td>image</td><td>this run</td><td>0.950</td><td>precision {p:.3f}, recall {r:.3f}</td>" in page
    assert page.count("<td>this run</td>") == 1
    assert r < curve_at(curves["image"], drun.THRESHOLDS["image"])[2]     # a higher threshold, lower recall


def test_curve_table_is_exact_on_its_grid():
    from benchmarks import duplicates as bd

    score = np.array([1.0, 0.97, 0.955, 0.95, 0.9, 0.3, -0.42])
    positive = np.array([1, 1, 1, 0, 1, 0, 0], bool)
    c = bd.pr_curve(score, positive, 0.95, "test")
    assert c["thresholds"][:3] == [1.0, 0.999, 0.998] and c["thresholds"][-1] <= -0.42
    assert 0.49 in c["thresholds"] and 0.499 not in c["thresholds"]       # every 0.01 under 0.5
    assert curve_at(c, 0.95) == (0.95, 0.75, 0.75)                       # 3 true of 4 in, 3 of 4 true pairs
    assert curve_at(c, 0.951) == (0.951, 1.0, 0.75)
    assert curve_at(c, 0.9)[1:] == (0.8, 1.0) and c["precision"][-1] == round(4 / 7, 4)
    assert curve_at(c, 1.01) is None and (c["candidates"], c["true_pairs"]) == (7, 4)
