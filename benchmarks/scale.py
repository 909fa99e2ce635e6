"""Scale benchmark: ingest, preprocess, train, inspect and duplicates at growing row counts.

    python -m benchmarks.scale --rows 2000,100000                  # the docs/scaling.md table
    python -m benchmarks.scale --rows 2000,100000,1000000          # add a million rows (hours on 2 cores)
    python -m benchmarks.scale --rows 500,2000 --stages ingest,train    # smoke

Corpus: AV-shaped rows (a 28x28 PNG, a 1 s 16 kHz FLAC, a short sentence), a few hundred distinct media
files repeated to size by a CSV manifest (every row its own sample_id, label and split), so a million
rows need megabytes on disk, not gigabytes. Each stage runs as the ``mmbatch`` command a user would
type, in a fresh process (``python -m mmbatch.cli``) with its own embedded Ray, while this process samples:

- ``driver``: the command's own peak RSS;
- ``worker``: the largest peak RSS of any one Ray worker process under it (ingest/preprocess actors, the
  Ray Train ranks; Ray's own daemons -- raylet, GCS, dashboard -- are not workers);
- ``ranks``: for train, the largest peak RSS of a Ray Train rank (``RayTrainWorker``);
- ``tree``: the peak of the whole process tree's PSS (shared pages, the object store among them, counted once);
- ``machine``: the peak of the machine's used memory (total - available) above what it was when the stage
  started. On a machine shared with other work this includes theirs: read it next to ``tree``.

Ray's "N PYTHON worker processes have been started" warnings are counted per stage (``worker_warnings``).
The fixed cost per job is the intercept of a least-squares line of seconds against rows over the sizes
run, the per-row cost its slope (seconds per 1,000 rows). Writes scale.json and scale.md to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

STAGES = ("ingest", "preprocess", "train", "train_stream", "inspect", "duplicates")
# train_stream: `mmbatch train` with the train and validation splits streamed by Ray Data whatever their size
# (run.MATERIALIZE_BYTES = run.VALIDATION_BYTES = 0), to compare its epoch with the in-memory path on the same rows
STREAM_CODE = ("import sys, mmbatch.train.run as r; r.MATERIALIZE_BYTES = r.VALIDATION_BYTES = 0; "
               "from mmbatch.cli import main; raise SystemExit(main(sys.argv[1:]))")
DISTINCT = 256                      # distinct media files the manifest repeats
WORKER_WARNING = re.compile(r"PYTHON worker processes have been started")
RAY_DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "DashboardAgent")


# --- corpus ------------------------------------------------------------------------------------
def make_media(root: Path, seed: int = 0) -> None:
    """DISTINCT AV-shaped (PNG, FLAC) pairs under ``root`` (img/, wav/), one per (class, variant)."""
    import cv2

    from mmbatch.demo.corpus import bits, encode_flac, make_audio

    if (root / "wav" / f"{DISTINCT - 1:04d}.flac").exists():
        return
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, size=(28, 28, 3), dtype=np.uint8)
    for i in range(DISTINCT):
        a, b, _ = bits(i % 4)
        img = cv2.add(np.roll(base, int(rng.integers(0, 28)), axis=1), rng.integers(0, 60, (28, 28, 3), np.uint8))
        img[..., 2 if a == 0 else 0] = cv2.add(img[..., 2 if a == 0 else 0], 60)
        (root / "img" / f"{i:04d}.png").write_bytes(cv2.imencode(".png", img)[1].tobytes())
        (root / "wav" / f"{i:04d}.flac").write_bytes(encode_flac(make_audio(b, rng, seconds=1.0)))


def make_corpus(root: Path, rows: int, seed: int = 0) -> Path:
    """``root/manifest.csv`` of ``rows`` AV rows over the repeated media (classes i % 4, 80/10/10 splits)."""
    from mmbatch.demo.corpus import bits, make_sentence

    manifest = root / "manifest.csv"
    if manifest.exists():
        return manifest
    make_media(root, seed)                # a copy per corpus: ingest refuses paths outside INPUT's folder
    rng = np.random.default_rng(seed + 1)
    sentences = [[" ".join(make_sentence(bits(c)[2], rng, n_words=int(rng.integers(3, 6)))) for _ in range(64)]
                 for c in range(4)]
    tmp = manifest.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write("sample_id,image_path,audio_path,text,label,split\n")
        for i in range(rows):
            c, k = i % 4, (i // 4) % (DISTINCT // 4) * 4 + i % 4
            split = "train" if i % 10 < 8 else ("validation" if i % 10 == 8 else "test")
            f.write(f"s{i:08d},img/{k:04d}.png,wav/{k:04d}.flac,{sentences[c][(i // 4) % 64]},{c},{split}\n")
    tmp.rename(manifest)
    return manifest


def write_workflow(folder: Path, canonical: Path) -> Path:
    wf = folder / "workflow.yaml"
    wf.write_text(f"name: scale\ndatasets:\n  - name: av\n    path: {canonical}\noutput:\n  path: {folder / 'features'}\n"
                  f"train:\n  out: {folder / 'train'}\n  epochs: 1\n")
    return wf


# --- measuring one command -----------------------------------------------------------------------
class Sampler:
    """Peak memory of a command's process tree and of the machine while it runs (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen, interval: float = 0.5, pss_every: int = 4):
        self.root = psutil.Process(proc.pid)
        self.interval, self.pss_every = interval, pss_every
        self.driver = self.worker = self.rank = self.tree = self.machine = 0
        self.base = self._used()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _used() -> int:
        vm = psutil.virtual_memory()
        return vm.total - vm.available

    def _poll(self, pss: bool) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        tree = 0
        for p in procs:
            try:
                if pss:
                    tree += p.memory_full_info().pss
                rss = p.memory_info().rss
                if p.pid == self.root.pid:
                    self.driver = max(self.driver, rss)
                    continue
                cmd = " ".join(p.cmdline()[:2])
                if any(d in cmd for d in RAY_DAEMONS):
                    continue
                self.worker = max(self.worker, rss)
                if "RayTrainWorker" in cmd:
                    self.rank = max(self.rank, rss)
            except psutil.Error:
                continue
        self.tree = max(self.tree, tree)
        self.machine = max(self.machine, self._used() - self.base)

    def _run(self) -> None:
        tick = 0
        while not self.stop.wait(self.interval):
            self._poll(pss=tick % self.pss_every == 0)
            tick += 1

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        mb = 2 ** 20
        return {"driver_mb": round(self.driver / mb), "worker_mb": round(self.worker / mb),
                "rank_mb": round(self.rank / mb) or None, "tree_mb": round(self.tree / mb),
                "machine_mb": round(self.machine / mb)}


def run_command(args: list[str], log: Path) -> dict:
    """Run ``python -m mmbatch.cli ARGS`` (exit 0 or 3 is success), sampled; its figures."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    with log.open("w") as out:
        head = ["-c", STREAM_CODE] if args[0] == "train_stream" else ["-m", "mmbatch.cli"]
        args = ["train", *args[1:]] if args[0] == "train_stream" else args
        proc = subprocess.Popen([sys.executable, *head, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = Sampler(proc)
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    mem = sampler.finish()
    text = log.read_text(errors="replace")
    if rc not in (0, 3):
        raise SystemExit(f"mmbatch {' '.join(args)} failed (exit {rc}); see {log}:\n{text[-3000:]}")
    return {"seconds": round(seconds, 2), **mem, "worker_warnings": len(WORKER_WARNING.findall(text))}


def stage_args(stage: str, folder: Path, manifest: Path) -> list[str]:
    canonical, wf = folder / "canonical", folder / "workflow.yaml"
    return {"ingest": ["ingest", "manifest", str(manifest), "--out", str(canonical)],
            "preprocess": ["preprocess", str(wf)],
            "train": ["train", str(wf)],
            "train_stream": ["train_stream", str(wf), "--set", "train.name=streamed"],
            "inspect": ["inspect", str(folder / "features" if (folder / "features").exists() else canonical)],
            "duplicates": ["duplicates", str(canonical), "--out", str(folder / "duplicates")]}[stage]


def run_size(rows: int, data_root: Path, stages: list[str]) -> dict:
    folder = data_root / f"rows-{rows}"
    outputs = {"ingest": "canonical", "preprocess": "features", "train": "train/fusion", "train_stream": "train/streamed",
               "duplicates": "duplicates"}
    for stage in stages:                     # every stage run does its whole job (a later stage reuses earlier outputs)
        if stage in outputs:
            subprocess.run(["rm", "-rf", str(folder / outputs[stage])], check=True)
    manifest = make_corpus(folder / "corpus", rows)
    write_workflow(folder, folder / "canonical")
    out = {}
    for stage in stages:
        out[stage] = run_command(stage_args(stage, folder, manifest), folder / f"{stage}.log")
        out[stage]["s_per_1k"] = round(1000 * out[stage]["seconds"] / rows, 3)
        if stage.startswith("train"):
            out[stage].update(epoch_figures(folder / "train" / ("streamed" if stage == "train_stream" else "fusion")))
        print(f"{rows:>9} {stage:<11} {json.dumps(out[stage])}", flush=True)
    return out


def epoch_figures(run_dir: Path) -> dict:
    """Rows per second of the first epoch's training pass, from the run's exported model.json."""
    h = json.loads((run_dir / "model" / "model.json").read_text())["training"]["history"][0]
    return {"epoch_rows": h["train_rows"], "epoch_train_s": round(h["train_time_s"], 2),
            "epoch_rows_per_s": round(h["train_rows"] / max(h["train_time_s"], 1e-9))}


# --- the table -------------------------------------------------------------------------------------
def fixed_cost(results: dict, stage: str) -> tuple[float, float] | None:
    """(intercept s, slope s per 1,000 rows) of seconds against rows (None below two sizes)."""
    pts = [(int(n), r[stage]["seconds"]) for n, r in results.items() if stage in r]
    if len(pts) < 2:
        return None
    x, y = np.array(pts, float).T
    slope, icpt = np.polyfit(x, y, 1)
    return round(float(icpt), 2), round(float(slope) * 1000, 3)


def table(results: dict, stages: list[str]) -> str:
    lines = ["| stage | rows | s | s / 1k rows | driver peak RSS MB | largest worker RSS MB | train rank RSS MB "
             "| tree PSS MB | machine peak MB | worker warnings |", "|---|" + "---:|" * 9]
    for stage in stages:
        for n, r in results.items():
            if stage in r:
                s = r[stage]
                lines.append(f"| {stage} | {int(n):,} | {s['seconds']} | {s['s_per_1k']} | {s['driver_mb']} | "
                             f"{s['worker_mb']} | {s['rank_mb'] or ''} | {s['tree_mb']} | {s['machine_mb']} | "
                             f"{s['worker_warnings']} |")
    epochs = [(int(n), st, r[st]) for n, r in results.items() for st in ("train", "train_stream") if st in r]
    if epochs:
        lines += ["", "| train path | rows | epoch rows | training pass s | rows/s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {'streamed' if st == 'train_stream' else 'default'} | {n:,} | {e['epoch_rows']:,} | "
                  f"{e['epoch_train_s']} | {e['epoch_rows_per_s']:,} |" for n, st, e in epochs]
    lines += ["", "| stage | fixed cost per job (s, intercept) | s / 1k rows (slope) |", "|---|---:|---:|"]
    for stage in stages:
        fc = fixed_cost(results, stage)
        if fc:
            lines.append(f"| {stage} | {fc[0]} | {fc[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="2000,100000", help="comma-separated row counts")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--data", default="/tmp/mmbatch-scale", help="corpora and outputs (kept for reruns)")
    ap.add_argument("--out", default="benchmarks/results/scale")
    a = ap.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"--stages: unknown {bad}; choose from {', '.join(STAGES)}")
    rows = [int(r) for r in a.rows.split(",") if r]
    results = {}
    for n in rows:
        results[str(n)] = run_size(n, Path(a.data), stages)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
            "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "python": platform.python_version(), "load_avg_at_end": os.getloadavg()}
    (Path(a.out) / "scale.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = table(results, stages)
    (Path(a.out) / "scale.md").write_text(f"`{meta['command']}`\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
