"""Labels are data, never markup (issue #31, item 7): a class or file name with ``$...$`` or HTML in it is
drawn and written as it is, in every plot (matplotlib would read ``$\\x$`` as mathtext and fail) and every
HTML report (escaped)."""
from __future__ import annotations

import html
import os

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

import fused_data
from fused_data import write_fused

MATH = r"price $\x$ now"          # mathtext: "Unknown symbol: \x" when parsed
MARKUP = "<b>x</b>"
NAMES = [MATH, MARKUP, "plain", "100% & more"]


def test_mmbatch_train_draws_and_escapes_class_names(ray_session, tmp_path, monkeypatch, capsys):
    """A real `mmbatch train` on a tiny fused set whose classes are named with mathtext and HTML."""
    from mmbatch.cli import main

    monkeypatch.setattr(fused_data, "CLASS_NAMES", NAMES)
    data = write_fused(str(tmp_path / "fused"), n=160, seed=5)
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({"train": {"data": data, "out": str(tmp_path / "train"), "name": "labels",
                                            "epochs": 2, "hidden": 16, "num_workers": 1, "schedule": "none"}}))
    assert main(["train", str(wf)]) == 0, capsys.readouterr().err[-3000:]
    run = tmp_path / "train" / "labels"
    with Image.open(run / "confusion.png") as im:                  # the tick labels are the class names
        assert im.format == "PNG" and im.size[0] > 200
    page = (run / "report.html").read_text()
    assert MARKUP not in page and html.escape(MARKUP) in page       # escaped, never a tag
    assert html.escape(MATH) in page and "100% &amp; more" in page  # shown as it is


def test_report_plots_and_html_directly():
    from mmbatch.train import report

    metrics = {"confusion": [[3, 1, 0, 0], [0, 4, 0, 0], [0, 0, 2, 0], [1, 0, 0, 5]], "classes": NAMES,
               "accuracy": 0.875, "per_class": {n: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
                                               for n in NAMES}}
    images = {**report.plot_confusion(metrics), **report.plot_bars(MATH, {MATH: 0.5, MARKUP: 0.25}, "b.png", MATH)}
    assert set(images) == {"confusion.png", "b.png"} and all(len(b) > 1000 for b in images.values())
    page = report.render_html({"title": MARKUP, "metrics": metrics}, images)
    assert MARKUP not in page and page.count(html.escape(MARKUP)) >= 2      # title, per-class table


def test_usetex_in_a_users_matplotlibrc_changes_nothing(monkeypatch):
    import matplotlib

    from mmbatch.train import report

    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)   # would run LaTeX on every label
    assert len(report.plot_confusion({"confusion": [[1, 0], [0, 1]], "classes": [MATH, "50% & _x_"]})) == 1
    assert matplotlib.rcParams["text.usetex"] is True                # the user's setting is kept


def test_spectrogram_title_is_a_file_name(tmp_path):
    from mmbatch.convert.image_to_speech import save_spectrogram_png

    out = tmp_path / "s.png"
    save_spectrogram_png(np.sin(np.linspace(0, 400, 16000)).astype(np.float32), out, title=f"{MATH}.png")
    assert Image.open(out).format == "PNG"


def test_duplicates_report_escapes_names():
    from mmbatch.dedup.report import render_report
    from mmbatch.dedup.run import PAIR_SCHEMA

    pairs = pa.Table.from_pylist([{"a_dataset": MARKUP, "a_sample_id": MATH, "a_split": "train",
                                   "b_dataset": "d", "b_sample_id": "<i>y</i>", "b_split": "test",
                                   "modality": "text", "kind": "near", "similarity": 0.9}], schema=PAIR_SCHEMA)
    page = render_report(pairs, {"modalities": {}}, shards=[])
    assert MARKUP not in page and "<i>y</i>" not in page
    assert html.escape(MARKUP) in page and html.escape("<i>y</i>") in page and MATH in page


@pytest.mark.parametrize("folder", [False, True])
def test_convert_refuses_an_output_that_is_or_holds_its_input(tmp_path, capsys, folder):
    """`mmbatch convert image-to-text photo.png --out photo.png` would replace the photo: one line, exit 2."""
    from mmbatch.cli import main

    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    photo = src / "photo.png"
    Image.new("RGB", (32, 32), "white").save(photo)
    before = photo.read_bytes()
    if folder:
        cases = [(src, src), (src, src / "sub"), (src / "sub", src), (src, tmp_path / "photos" / ".." / "photos")]
    else:
        link = tmp_path / "link.png"
        os.symlink(photo, link)
        cases = [(photo, photo), (photo, link), (link, photo)]
    for inp, out in cases:
        assert main(["convert", "image-to-text", str(inp), "--out", str(out)]) == 2, (inp, out)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "input" in err, err
    assert photo.read_bytes() == before and sorted(p.name for p in src.rglob("*")) == ["photo.png", "sub"]
