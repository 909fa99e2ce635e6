"""mmbatch.engine.progress: plain lines when the output is not a terminal, and the committed-shard counter."""
from __future__ import annotations

import io
import json

from mmbatch.engine import progress


def test_plain_lines_are_periodic_and_end_with_done(monkeypatch):
    out = io.StringIO()                       # not a TTY: no tqdm bar, plain lines
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 3600.0)
    with progress.bar("extract features", total=200, unit="rows", stream=out) as b:
        for _ in range(20):
            b.update(10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("  extract features: 200/200 rows (100%), done")
    out = io.StringIO()
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    with progress.bar("train fusion", total=3, unit="epochs", stream=out) as b:
        b.update(1, val_accuracy=0.5)
    assert "train fusion: 1/3 epochs (33%), 0 s, val accuracy 0.500" in out.getvalue()


def test_an_interrupted_step_prints_no_done_line():
    out = io.StringIO()
    try:
        with progress.bar("preprocess", total=10, stream=out) as b:
            b.update(3)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert "done" not in out.getvalue()


def test_committed_unit_counter():
    before = progress.committed_units()
    progress.unit_committed()
    progress.unit_committed(2)
    assert progress.committed_units() == before + 3


def test_epoch_watcher_reads_checkpoint_meta(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    run = tmp_path / "fusion"
    with progress.watch_epochs(str(run), "train fusion", epochs=4, metric="accuracy", poll_s=0.05):
        for epoch, best in ((0, 0.5), (1, 0.75)):
            d = run / f"checkpoint_epoch_{epoch:04d}"
            d.mkdir(parents=True)
            (d / "meta.json").write_text(json.dumps({"epoch": epoch, "best_score": best}))
    text = out.getvalue()
    assert "train fusion: 2/4 epochs (50%), done" in text and "best val accuracy 0.750" in text


def test_the_last_step_is_reported_once_by_the_done_line(monkeypatch):
    """The demo printed the training line twice: at 100 %, then again with "done"."""
    out = io.StringIO()
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    with progress.bar("train fusion", total=3, unit="epochs", stream=out) as b:
        for _ in range(3):
            b.update(1)
    lines = out.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["  train fusion: 1/3 epochs (33%)", "  train fusion: 2/3 epochs (67%)",
                                                  "  train fusion: 3/3 epochs (100%)"]
    assert "done" in lines[-1] and sum("3/3" in ln for ln in lines) == 1
