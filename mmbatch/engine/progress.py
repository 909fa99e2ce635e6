"""One progress bar per long step, and the count of units this process committed.

For stage code on the driver (ingest, preprocess, training)::

    from mmbatch.engine import progress

    with progress.bar("extract features", total=rows_to_do, unit="rows") as bar:
        ...
        bar.update(rows_done_now)                 # rows (or units, epochs) finished since the last call
        bar.show(val_accuracy=0.93)               # optional: figures shown next to the bar
    progress.unit_committed()                     # once per unit, right after its commit (marker written)

On a terminal (stderr is a TTY) the bar is a tqdm bar. Otherwise (a log file, CI, a pipe) it
prints a plain line at most every ``PLAIN_INTERVAL_S`` seconds and one when the step ends, so
a log stays short. ``progress.committed_units()`` is what ``mmbatch`` reports when a command is
interrupted ("interrupted; N units committed, rerun the same command to resume").
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Optional

PLAIN_INTERVAL_S = 15.0      # seconds between plain progress lines when stderr is not a terminal

_lock = threading.Lock()
_committed = 0


def unit_committed(n: int = 1) -> None:
    """Count ``n`` units committed by this process (call after each unit's marker is written)."""
    global _committed
    with _lock:
        _committed += n


def committed_units() -> int:
    """Units committed by this process since it started."""
    return _committed




class Bar:
    """A progress bar for one step; use :func:`bar` to make one."""

    def __init__(self, desc: str, total: Optional[int], unit: str, stream=None):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = 0
        self.figures: dict[str, object] = {}
        self.started = time.monotonic()
        self._stream = stream or sys.stderr
        self._last_line = self.started
        self._tqdm = None
        self._closed = False
        if _isatty(self._stream):
            from tqdm import tqdm
            self._tqdm = tqdm(total=total, desc=desc, unit=f" {unit}", file=self._stream, leave=True,
                              dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int = 1, **figures) -> None:
        with _lock:
            self.n += n
            self.figures.update(figures)
        if self._tqdm is not None:
            if figures:
                self._tqdm.set_postfix_str(_format_figures(self.figures), refresh=False)
            self._tqdm.update(n)
        elif self.n != self.total and time.monotonic() - self._last_line >= PLAIN_INTERVAL_S:
            # the last step is left to close(): one "done" line, not a 100 % line and then "done"
            self._plain_line()

    def show(self, **figures) -> None:
        """Set the figures shown next to the bar (e.g. the current validation metric)."""
        self.update(0, **figures)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._tqdm is not None:
            self._tqdm.total = total
            self._tqdm.refresh()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            self._plain_line(final=True)

    def _plain_line(self, final: bool = False) -> None:
        self._last_line = time.monotonic()
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        figs = _format_figures(self.figures)
        end = "done, " if final else ""
        print(f"  {self.desc}: {done} {self.unit}{pct}, {end}{self._last_line - self.started:.0f} s"
              + (f", {figs}" if figs else ""), file=self._stream, flush=True)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:          # interrupted or failed: no "done" line
            self._closed = True
            if self._tqdm is not None:
                self._tqdm.close()


def bar(desc: str, total: Optional[int] = None, unit: str = "rows", stream=None) -> Bar:
    """A progress bar for one long step (``total`` None when unknown)."""
    return Bar(desc, total, unit, stream=stream)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _format_figures(figures: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.3f}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                     for k, v in figures.items())


class watch_epochs:
    """A bar of training epochs for a Ray Train run, fed from the driver side.

    The training loop runs in Ray Train's worker actors and reports to its controller actor;
    the driver only waits in ``trainer.fit()``. Each epoch leaves a checkpoint folder
    ``<run_dir>/checkpoint_epoch_NNNN/`` with a small ``meta.json`` (epoch, best score), so a
    thread polls the run folder once a second and moves the bar (epochs shown 1-based, as in the
    report)::

        with progress.watch_epochs(run_dir, "train fusion", epochs=12, metric="accuracy"):
            trainer.fit()
    """

    def __init__(self, run_dir: str, desc: str, epochs: int, metric: str = "score", poll_s: float = 1.0):
        self.run_dir, self.desc, self.epochs, self.metric, self.poll_s = run_dir, desc, epochs, metric, poll_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._bar: Optional[Bar] = None
        self._seen = 0                     # epochs finished (checkpoints seen)

    def _latest(self) -> Optional[dict]:
        import json

        from mmbatch.engine import storage
        try:
            fs, root = storage.url_to_fs(self.run_dir)
            names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
            latest = [n for n in names if n.startswith("checkpoint_epoch_")]
            if not latest:
                return None
            with fs.open(storage.join(root, latest[-1], "meta.json")) as f:
                return json.load(f)
        except (OSError, ValueError):      # not there yet, or being written: next poll
            return None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._refresh()

    def _refresh(self) -> None:
        meta = self._latest()
        if not meta or "epoch" not in meta:
            return
        done = int(meta["epoch"]) + 1
        if done > self._seen:
            figures = {}
            if meta.get("best_score") is not None:
                figures[f"best val {self.metric}"] = float(meta["best_score"])
            self._bar.update(done - self._seen, **figures)
            self._seen = done

    def __enter__(self) -> "watch_epochs":
        self._bar = bar(self.desc, total=self.epochs, unit="epochs")
        self._thread = threading.Thread(target=self._poll, daemon=True, name="mmbatch-epochs")
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if exc_type is None:
            self._refresh()
        self._bar.__exit__(exc_type, exc, tb)
