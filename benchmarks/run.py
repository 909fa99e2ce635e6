"""Preprocessing benchmark: mmbatch vs the ideal, multiprocessing.Pool and datasets.map.

    python -m benchmarks.run --samples 2000            # the README table
    python -m benchmarks.run --samples 200 --quick     # smoke run
    python -m benchmarks.run --memory --samples 500    # peak RSS at N and 4N samples

Corpus: ImageNet-like JPEGs (about 500x375, ~110 KB) and LibriSpeech-like 16 kHz FLAC
utterances of 10-15 s with transcripts, joined per sample by a manifest (image + audio + text).
Every contender runs the same extractors with the same parameters (the workflow's defaults:
hog_color at 64 px, log-mel/MFCC statistics, hashing text) on the same canonical Parquet.
Writes JSON and a Markdown table to --out.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import threading
import time
from pathlib import Path

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


# --- corpus ---------------------------------------------------------------------------------
def make_corpus(root: Path, n: int, seed: int = 0) -> Path:
    """n samples of (500x375 JPEG, 10-15 s FLAC, transcript) + manifest.csv."""
    import cv2

    from mmbatch.demo.corpus import bits, encode_flac, make_audio, make_sentence

    manifest = root / "manifest.csv"
    if manifest.exists() and sum(1 for _ in manifest.open()) == n + 1:
        return manifest
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    lines = ["sample_id,image_path,audio_path,text,label,split"]
    base = rng.integers(0, 255, size=(375, 500, 3), dtype=np.uint8)
    base = cv2.GaussianBlur(base, (0, 0), 3)
    for i in range(n):
        c = i % 4
        a, b, t = bits(c)
        img = np.roll(base, int(rng.integers(0, 500)), axis=1).copy()
        noise = rng.integers(0, 60, size=img.shape, dtype=np.uint8)
        img = cv2.add(img, noise)
        img[..., 2 if a == 0 else 0] = cv2.add(img[..., 2 if a == 0 else 0], 60)
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        (root / "img" / f"{i:06d}.jpg").write_bytes(jpg.tobytes())
        clip = make_audio(b, rng, seconds=float(rng.uniform(10, 15)))
        (root / "wav" / f"{i:06d}.flac").write_bytes(encode_flac(clip))
        text = " ".join(make_sentence(t, rng, n_words=int(rng.integers(20, 40))))
        split = "train" if i % 10 < 8 else ("validation" if i % 10 == 8 else "test")
        lines.append(f"s{i:06d},img/{i:06d}.jpg,wav/{i:06d}.flac,{text},{c},{split}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# --- the shared unit of work -------------------------------------------------------------------
_EX = None


def _extractors():
    global _EX
    if _EX is None:
        from mmbatch.config import FeaturesConfig
        from mmbatch.features.registry import build_extractor
        from mmbatch.runtime import pin_threads

        pin_threads()
        cfg = FeaturesConfig()
        _EX = {m: build_extractor(m, getattr(cfg, m)) for m in ("image", "audio", "text")}
    return _EX


def extract_rows(images: list, audios: list, texts: list) -> dict:
    ex = _extractors()
    out = {}
    for m, items in (("image", images), ("audio", audios), ("text", texts)):
        emb, _ = ex[m].extract(items)
        out[m] = emb
    return out


def _pool_chunk(path_and_rows):
    path, start, stop = path_and_rows
    t = pq.read_table(path).slice(start, stop - start)
    res = extract_rows([r["bytes"] for r in t.column("image").to_pylist()],
                       [r["bytes"] for r in t.column("audio").to_pylist()], t.column("text").to_pylist())
    return t.column("sample_id").to_pylist(), res


# --- measuring -----------------------------------------------------------------------------------
class Monitor:
    """Peak RSS of this process tree and average CPU utilisation while running."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self.samples, self._stop = interval, 0, [], threading.Event()

    def _tree_rss(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        psutil.cpu_percent(None)
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._tree_rss())
            self.samples.append(psutil.cpu_percent(None))

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.seconds = time.perf_counter() - self.t0

    def result(self, n: int, audio_seconds: float, n_images: int) -> dict:
        return {"seconds": round(self.seconds, 2), "samples_per_s": round(n / self.seconds, 1),
                "images_per_s": round(n_images / self.seconds, 1),
                "audio_x_realtime": round(audio_seconds / self.seconds, 1),
                "cpu_util_pct": round(float(np.mean(self.samples)) if self.samples else 0.0, 1),
                "peak_rss_mb": round(self.peak / 2**20, 1)}


def canonical_files(canon: Path) -> list[str]:
    return sorted(str(p) for p in canon.glob("*.parquet"))


def run_ideal(files: list[str], n_probe: int) -> dict:
    t = pq.read_table(files[0]).slice(0, n_probe)
    _extractors()
    extract_rows([r["bytes"] for r in t.column("image").slice(0, 2).to_pylist()],
                 [r["bytes"] for r in t.column("audio").slice(0, 2).to_pylist()], t.column("text").slice(0, 2).to_pylist())
    imgs = [r["bytes"] for r in t.column("image").to_pylist()]
    auds = [r["bytes"] for r in t.column("audio").to_pylist()]
    txts = t.column("text").to_pylist()
    per = {}
    ex = _extractors()
    for m, items in (("image", imgs), ("audio", auds), ("text", txts)):
        t0 = time.perf_counter()
        for i in range(0, len(items), 64):
            ex[m].extract(items[i:i + 64])
        per[m] = (time.perf_counter() - t0) / len(items)
    per_sample = sum(per.values())
    return {"per_sample_ms": {k: round(v * 1e3, 3) for k, v in per.items()},
            "single_process_samples_per_s": round(1 / per_sample, 1), "probe_rows": len(items)}


def run_pool(files: list[str], cores: int, out: Path) -> None:
    chunks = []
    for f in files:
        n = pq.ParquetFile(f).metadata.num_rows
        chunks += [(f, s, min(n, s + 64)) for s in range(0, n, 64)]
    ids, embs = [], {"image": [], "audio": [], "text": []}
    with mp.get_context("spawn").Pool(cores) as pool:
        for sid, res in pool.imap(_pool_chunk, chunks):
            ids += sid
            for m in embs:
                embs[m].append(res[m])
    table = pa.table({"sample_id": ids, **{f"{m}_emb": list(np.concatenate(v)) for m, v in embs.items()}})
    pq.write_table(table, out / "pool.parquet")


def _hf_map(batch):
    res = extract_rows([r["bytes"] for r in batch["image"]], [r["bytes"] for r in batch["audio"]], batch["text"])
    return {f"{m}_emb": list(v) for m, v in res.items()}


def run_datasets(files: list[str], cores: int, out: Path) -> None:
    from datasets import Dataset, disable_caching

    disable_caching()
    ds = Dataset.from_parquet(files, columns=["sample_id", "image", "audio", "text"], keep_in_memory=False)
    ds = ds.cast_column("image", ds.features["image"].__class__(decode=False)) if hasattr(ds.features["image"], "decode") else ds
    ds = ds.cast_column("audio", ds.features["audio"].__class__(decode=False)) if hasattr(ds.features["audio"], "decode") else ds
    ds = ds.map(_hf_map, batched=True, batch_size=64, num_proc=cores, remove_columns=["image", "audio", "text"])
    ds.to_parquet(str(out / "datasets.parquet"))


def run_mmbatch(canon: Path, out: Path) -> dict:
    from mmbatch.config import workflow_from_dict
    from mmbatch.preprocess import run_preprocess

    wf = workflow_from_dict({"datasets": [{"name": "bench", "path": str(canon)}], "output": {"path": str(out)}})
    s = run_preprocess(wf, progress=True)
    return {"stages": {k: {"rows": v.rows, "busy_seconds": round(v.seconds, 2)} for k, v in s.stages.items()},
            "rows_out": s.rows_out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--data", default="/tmp/mmbatch-bench")
    ap.add_argument("--probe", type=int, default=100, help="rows for the single-process probe")
    ap.add_argument("--only", default="ideal,mmbatch,pool,datasets")
    ap.add_argument("--memory", action="store_true", help="peak RSS of mmbatch preprocess at N and 4N samples")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.memory:
        return memory_main(args, out)
    data = Path(args.data) / f"n{args.samples}"
    t0 = time.perf_counter()
    manifest = make_corpus(data / "corpus", args.samples)
    print(f"corpus: {args.samples} samples in {time.perf_counter() - t0:.1f} s")

    import ray

    from mmbatch.ingest import run_ingest
    from mmbatch.runtime import init_ray

    t0 = time.perf_counter()
    init_ray(num_cpus=cores)
    ray_startup = time.perf_counter() - t0
    canon = data / "canonical"
    if not (canon / "_manifest.json").exists():
        run_ingest("manifest", str(manifest), str(canon))
    files = canonical_files(canon)
    tab = pq.read_table(files, columns=["duration"]) if len(files) == 1 else \
        pa.concat_tables([pq.read_table(f, columns=["duration"]) for f in files])
    audio_seconds = float(np.nansum(np.array(tab.column("duration").to_pylist(), dtype=float)))
    n = tab.num_rows
    img_bytes = sum(len(r["bytes"]) for f in files for r in pq.read_table(f, columns=["image"]).column("image").to_pylist())
    results = {"machine": {"cores": cores, "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                           "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
               "samples": n, "audio_seconds": round(audio_seconds, 1), "mean_jpeg_kb": round(img_bytes / n / 1024, 1),
               "ray_startup_s": round(ray_startup, 2), "runs": {}}
    only = set(args.only.split(","))
    if "ideal" in only:
        ideal = run_ideal(files, args.probe)
        ideal["ideal_samples_per_s"] = round(ideal["single_process_samples_per_s"] * cores, 1)
        results["ideal"] = ideal
        print("ideal:", ideal)
    if "mmbatch" in only:
        target = data / "out-mmbatch"
        if target.exists():
            import shutil
            shutil.rmtree(target)
        with Monitor() as mon:
            detail = run_mmbatch(canon, target)
        results["runs"]["mmbatch"] = {**mon.result(n, audio_seconds, n), **detail}
        print("mmbatch:", results["runs"]["mmbatch"])
    ray.shutdown()
    for name, fn in (("pool", run_pool), ("datasets", run_datasets)):
        if name not in only:
            continue
        target = data / f"out-{name}"
        target.mkdir(parents=True, exist_ok=True)
        with Monitor() as mon:
            fn(files, cores, target)
        results["runs"][f"multiprocessing.Pool({cores})" if name == "pool" else f"datasets.map(num_proc={cores})"] = \
            mon.result(n, audio_seconds, n)
        print(name, mon.result(n, audio_seconds, n))
    write_results(results, out)


def write_results(results: dict, out: Path) -> None:
    (out / "preprocess.json").write_text(json.dumps(results, indent=2))
    lines = [f"Machine: {results['machine']['cores']} cores, {results['machine']['ram_gb']} GiB RAM, "
             f"Python {results['machine']['python']}. {results['samples']} samples "
             f"(JPEG ~{results['mean_jpeg_kb']} KB + {results['audio_seconds'] / results['samples']:.1f} s FLAC + text). "
             f"Ray start-up {results['ray_startup_s']} s (not included below).", "",
             "| contender | samples/s | images/s | audio s / wall s | CPU util % | peak RSS MB | % of ideal |",
             "|---|---|---|---|---|---|---|"]
    ideal = results.get("ideal", {}).get("ideal_samples_per_s")
    if ideal:
        lines.append(f"| ideal ({results['machine']['cores']} x single process) | {ideal} | | | | | 100 |")
    for name, r in results["runs"].items():
        pct = f"{100 * r['samples_per_s'] / ideal:.0f}" if ideal else ""
        lines.append(f"| {name} | {r['samples_per_s']} | {r['images_per_s']} | {r['audio_x_realtime']} | "
                     f"{r['cpu_util_pct']} | {r['peak_rss_mb']} | {pct} |")
    (out / "preprocess.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def memory_main(args, out: Path) -> None:
    """Peak RSS of `mmbatch preprocess` (driver + Ray workers) at N and 4N samples."""
    import shutil
    import subprocess
    import sys

    rows = []
    for n in (args.samples, 4 * args.samples):
        data = Path(args.data) / f"n{n}"
        manifest = make_corpus(data / "corpus", n)
        target = data / "out-mem"
        shutil.rmtree(target, ignore_errors=True)
        code = (
            "import sys, json; from benchmarks.run import *; from mmbatch.runtime import init_ray; init_ray();"
            "from mmbatch.ingest import run_ingest; from pathlib import Path; c=Path(sys.argv[1]);"
            "(c/'_manifest.json').exists() or run_ingest('manifest', sys.argv[2], str(c));"
            "m=Monitor(0.1)\nwith m: run_mmbatch(c, Path(sys.argv[3]))\nprint('PEAK', m.peak)"
        )
        proc = subprocess.run([sys.executable, "-c", code, str(data / "canonical"), str(manifest), str(target)],
                              capture_output=True, text=True)
        peak = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK")]
        if not peak:
            raise SystemExit(proc.stderr[-3000:])
        rows.append({"samples": n, "peak_rss_mb": round(int(peak[-1].split()[1]) / 2**20, 1)})
        print(rows[-1])
    ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    res = {"runs": rows, "ratio_4x": round(ratio, 3)}
    (out / "memory.json").write_text(json.dumps(res, indent=2))
    print(f"4x data -> {ratio:.2f}x peak RSS")


if __name__ == "__main__":
    main()
