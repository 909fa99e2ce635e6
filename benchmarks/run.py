"""Preprocessing benchmark: mmbatch vs the ideal, multiprocessing.Pool and datasets.map.

    python -m benchmarks.run --samples 2000            # the README table
    python -m benchmarks.run --samples 200             # smoke run (about a minute)
    python -m benchmarks.run --memory --samples 500    # peak memory (PSS) at N and 4N samples
    python -m benchmarks.run --overhead --samples 2000 # fixed CPU cost per job vs CPU cost per sample

Corpus: ImageNet-like JPEGs (about 500x375, ~110 KB) and LibriSpeech-like 16 kHz FLAC
utterances of 10-15 s with transcripts, joined per sample by a manifest (image + audio + text).
Every contender runs the same extractors with the same parameters (the workflow's defaults:
hog_color at 64 px, log-mel/MFCC statistics, hashing text) on the same canonical Parquet.
``plainpool`` is the Pool script a user would write without mmbatch: plain OpenCV/librosa calls for
comparable features (HOG + colour histogram, log-mel/MFCC statistics, hashed words).
``warm`` is mmbatch's job on a Ray that has run a Ray Data job before (a running cluster): Ray Data
starts three service actors per cluster (stats, autoscaling coordinator, actor locations), about
1 CPU s each, which a fresh embedded Ray pays in its first job (the ``mmbatch`` contender).
``raychunk`` is a diagnostic: the Pool script with its process pool swapped for mmbatch's Ray
actor pool, which splits mmbatch's distance to the Pool into Ray's hosting cost and its own.

Fairness: each contender runs in a fresh Python process (``--child``), so each pays its own
imports and extractor warm-up inside its timed section (datasets.map warms its parent once and
forks it; Pool and Ray warm each worker). Ray start-up is timed separately. ``--repeat`` runs
the contenders interleaved and reports the median (and the range) of each.
Writes JSON and a Markdown table to --out.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import threading
import time
from pathlib import Path

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


# --- corpus ---------------------------------------------------------------------------------
SHAPES = {
    # ImageNet-like JPEGs (~500x375, ~110 KB) + LibriSpeech-like 10-15 s FLAC + 20-40 word transcripts
    "large": {"image": (500, 375), "seconds": (10.0, 15.0), "words": (20, 40)},
    # the AV-MNIST shape: 28x28 PNG + 1 s FLAC + a short text
    "small": {"image": (28, 28), "seconds": (1.0, 1.0), "words": (3, 6)},
}


def make_corpus(root: Path, n: int, seed: int = 0, shape: str = "large") -> Path:
    """n samples of (image, 16 kHz FLAC, text) of the given ``shape`` (SHAPES) + manifest.csv."""
    import cv2

    from mmbatch.demo.corpus import bits, encode_flac, make_audio, make_sentence

    manifest = root / "manifest.csv"
    if manifest.exists() and sum(1 for _ in manifest.open()) == n + 1:
        return manifest
    spec = SHAPES[shape]
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    lines = ["sample_id,image_path,audio_path,text,label,split"]
    w, h = spec["image"]
    base = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    base = cv2.GaussianBlur(base, (0, 0), 3 if w > 100 else 1)
    ext = "jpg" if shape == "large" else "png"
    for i in range(n):
        c = i % 4
        a, b, t = bits(c)
        img = np.roll(base, int(rng.integers(0, w)), axis=1).copy()
        noise = rng.integers(0, 60, size=img.shape, dtype=np.uint8)
        img = cv2.add(img, noise)
        img[..., 2 if a == 0 else 0] = cv2.add(img[..., 2 if a == 0 else 0], 60)
        params = [cv2.IMWRITE_JPEG_QUALITY, 92] if ext == "jpg" else []
        ok, enc = cv2.imencode(f".{ext}", img, params)
        (root / "img" / f"{i:06d}.{ext}").write_bytes(enc.tobytes())
        clip = make_audio(b, rng, seconds=float(rng.uniform(*spec["seconds"])))
        (root / "wav" / f"{i:06d}.flac").write_bytes(encode_flac(clip))
        text = " ".join(make_sentence(t, rng, n_words=int(rng.integers(*spec["words"]))))
        split = "train" if i % 10 < 8 else ("validation" if i % 10 == 8 else "test")
        lines.append(f"s{i:06d},img/{i:06d}.{ext},wav/{i:06d}.flac,{text},{c},{split}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# --- the shared unit of work -------------------------------------------------------------------
_EX = None


def _extractors():
    global _EX
    if _EX is None:
        from mmbatch.config import FeaturesConfig
        from mmbatch.preprocess.features.registry import build_extractor
        from mmbatch.engine.runtime import pin_threads

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


def _pool_chunk(path_and_row_group):
    path, rg = path_and_row_group
    t = pq.ParquetFile(path).read_row_group(rg, columns=["sample_id", "image", "audio", "text"])
    res = extract_rows([r["bytes"] for r in t.column("image").to_pylist()],
                       [r["bytes"] for r in t.column("audio").to_pylist()], t.column("text").to_pylist())
    return t.column("sample_id").to_pylist(), res


def _plain_features(image: bytes, audio: bytes, text: str) -> np.ndarray:
    """The ``plainpool`` contender's features, written as a user would with OpenCV and librosa calls:
    a 64 px gradient-orientation histogram per 8 px cell (HOG without block normalisation) + colour histogram, log-mel and MFCC means and deviations, hashed words."""
    import io
    import zlib

    import cv2
    import librosa
    import soundfile as sf

    img = cv2.resize(cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR), (64, 64))
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
    mag, ang = cv2.cartToPolar(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    bins = (ang % np.pi / np.pi * 9).astype(np.int64).clip(0, 8)          # 9 unsigned orientations
    cell = (np.arange(64) // 8)[:, None] * 8 + (np.arange(64) // 8)[None, :]   # 8x8 cells of 8x8 px
    hog = np.bincount((cell * 9 + bins).ravel(), weights=mag.ravel(), minlength=64 * 9)
    hog /= np.linalg.norm(hog) + 1e-6
    hist = cv2.calcHist([img], [0, 1, 2], None, [4, 4, 4], [0, 256] * 3).ravel() / (64 * 64)
    y, sr = sf.read(io.BytesIO(audio), dtype="float32")
    mel = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr, n_fft=400, hop_length=160, n_mels=80))
    mfcc = librosa.feature.mfcc(S=mel, n_mfcc=13)
    words = np.zeros(256, np.float32)
    for w in text.lower().split():
        words[zlib.crc32(w.encode()) % 256] += 1.0
    return np.concatenate([hog.ravel(), hist, mel.mean(1), mel.std(1), mfcc.mean(1), mfcc.std(1), words]).astype(np.float32)


def _plain_chunk(path_and_row_group):
    path, rg = path_and_row_group
    t = pq.ParquetFile(path).read_row_group(rg, columns=["sample_id", "image", "audio", "text"])
    feats = [_plain_features(i["bytes"], a["bytes"], x) for i, a, x in
             zip(t.column("image").to_pylist(), t.column("audio").to_pylist(), t.column("text").to_pylist())]
    return t.column("sample_id").to_pylist(), np.stack(feats)


def run_plainpool(files: list[str], cores: int, out: Path) -> None:
    """A Pool script with plain librosa/OpenCV features (not mmbatch's extractors), as a user would write it."""
    ids, feats = [], []
    with mp.get_context("spawn").Pool(cores, initializer=_one_thread) as pool:
        for sid, f in pool.imap(_plain_chunk, row_group_chunks(files)):
            ids += sid
            feats.append(f)
    pq.write_table(pa.table({"sample_id": ids, "features": list(np.concatenate(feats))}), out / "plainpool.parquet")


def _one_thread() -> None:
    import cv2
    cv2.setNumThreads(1)


# --- measuring -----------------------------------------------------------------------------------
def machine_cpu() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine since boot: busy counts user + nice (Ray
    workers run niced) + system + interrupts of every process; stolen is the time the hypervisor
    gave the cores to other guests."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return busy, getattr(t, "steal", 0.0)


class Steal:
    """``pct``: the share (%) of the cores' time stolen by the hypervisor during the block."""

    def __enter__(self):
        self.s0, self.t0 = machine_cpu()[1], time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        self.pct = round(100 * (machine_cpu()[1] - self.s0) / (wall * (os.cpu_count() or 1)), 1)


class Monitor:
    """Peak memory of this process tree, average CPU utilisation, the machine's CPU seconds and
    the CPU stolen by the hypervisor while running.

    Memory is the sum of PSS (proportional set size): pages shared between processes (Ray's
    object store, forked parents) count once, split between their users, instead of once per
    process as a sum of RSS would. CPU seconds are machine-wide (user + system + interrupts of
    every process: Ray's daemons and short-lived workers included), so they measure what a
    contender costs independently of how fast the VM ran at that moment; steal is the share of
    the cores' time the hypervisor gave to other guests (a VM whose speed drifts shows it here).
    ``cpu_by_process`` splits the process tree's CPU seconds by kind of process (the driver, each
    kind of Ray actor or daemon, pool workers), sampled every 0.2 s; a process's last fraction
    of a sampling interval before it exits is missed.

    The monitor's own polling (a thread of the driver process, reading /proc for every process of
    the tree: more for a Ray job's dozen processes than for a Pool's three) is measured with
    ``thread_time`` and taken out of the driver's CPU and the machine's CPU seconds.
    """

    def __init__(self, interval: float = 0.2, memory_every: int = 5):
        self.interval, self.peak, self.samples, self._stop = interval, 0, [], threading.Event()
        # PSS reads /proc/<pid>/smaps_rollup: ~1.5 ms of CPU per Ray process (they map the object
        # store), so memory is sampled every ``memory_every`` ticks (1 s); CPU times every tick
        self.memory_every = memory_every
        self._cpu_seen: dict[int, tuple[str, float, float]] = {}      # pid -> (kind, cpu at start, cpu now)
        self.own_cpu = 0.0                                              # CPU seconds of the polling thread

    @staticmethod
    def _kind(p: psutil.Process, me: int) -> str:
        if p.pid == me:
            return "driver"
        cmd = p.cmdline()
        if not cmd:
            return p.name()
        if cmd[0].startswith("ray::"):
            return cmd[0].split()[0].split(".")[0]      # Ray actors and workers set their title (ray::Actor.method)
        script = next((a for a in cmd[1:] if a.endswith(".py")), None)
        return os.path.basename(script or cmd[0])

    def _poll_tree(self, first: bool = False, memory: bool = True) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                if memory:
                    total += p.memory_full_info().pss
                t = p.cpu_times()
                seen = self._cpu_seen.get(p.pid)
                # a process's kind is read once (a /proc read per process per tick is the monitor's
                # main cost), except while it is an idle Ray worker that may become an actor
                kind = seen[0] if seen and seen[0] != "ray::IDLE" else self._kind(p, me.pid)
                cpu = t.user + t.system
                old_kind, start, _ = seen or (kind, cpu if first else 0.0, 0.0)
                # a prestarted Ray worker is ray::IDLE until it becomes an actor: keep the actor's name
                self._cpu_seen[p.pid] = (old_kind if kind == "ray::IDLE" else kind, start, cpu)
            except psutil.Error:
                pass
        return total

    def cpu_by_process(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, start, now in self._cpu_seen.values():
            out[kind] = out.get(kind, 0.0) + now - start
        out["driver"] = out.get("driver", 0.0) - self.own_cpu
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.05}

    def _run(self):
        c0 = time.thread_time()
        psutil.cpu_percent(None)
        tick = 0
        while not self._stop.wait(self.interval):
            tick += 1
            self.peak = max(self.peak, self._poll_tree(memory=tick % self.memory_every == 0))
            self.samples.append(psutil.cpu_percent(None))
            self.own_cpu = time.thread_time() - c0

    def __enter__(self):
        self._poll_tree(first=True, memory=False)
        self.busy0 = machine_cpu()[0]
        self.steal = Steal().__enter__()
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        busy = machine_cpu()[0] - self.busy0
        self.steal.__exit__()
        self._stop.set()
        self.thread.join()
        self.cpu_seconds = busy - self.own_cpu
        self.peak = max(self.peak, self._poll_tree(memory=True))



def canonical_files(canon: Path) -> list[str]:
    return sorted(str(p) for p in canon.glob("*.parquet"))


def run_ideal(files: list[str], n_probe: int, passes: int = 3) -> dict:
    """Single-process extractor throughput on warm extractors: the median of ``passes`` per
    modality (a median, as for the contenders: on a VM whose speed drifts by +-15 %, a best-of
    picks the fastest moment and no contender runs at that moment throughout)."""
    t = pa.concat_tables([pq.ParquetFile(f).read_row_group(0, columns=["image", "audio", "text"]) for f in files])
    t = t.slice(0, n_probe)
    imgs = [r["bytes"] for r in t.column("image").to_pylist()]
    auds = [r["bytes"] for r in t.column("audio").to_pylist()]
    txts = t.column("text").to_pylist()
    extract_rows(imgs[:2], auds[:2], txts[:2])                       # imports, first calls
    ex = _extractors()
    per = {}
    with Steal() as steal:
        for m, items in (("image", imgs), ("audio", auds), ("text", txts)):
            times = []
            for _ in range(passes):
                t0 = time.perf_counter()
                for i in range(0, len(items), 64):
                    ex[m].extract(items[i:i + 64])
                times.append(time.perf_counter() - t0)
            per[m] = float(np.median(times)) / len(items)
    per_sample = sum(per.values())
    return {"per_sample_ms": {k: round(v * 1e3, 3) for k, v in per.items()},
            "single_process_samples_per_s": round(1 / per_sample, 1), "probe_rows": len(imgs),
            "steal_pct": steal.pct}


def row_group_chunks(files: list[str]) -> list[tuple[str, int]]:
    return [(f, rg) for f in files for rg in range(pq.ParquetFile(f).metadata.num_row_groups)]


def write_chunk_results(results, path: Path) -> None:
    """The Pool script's parent: gather each chunk's (ids, embeddings) and write one file."""
    ids, embs = [], {"image": [], "audio": [], "text": []}
    for sid, res in results:
        ids += sid
        for m in embs:
            embs[m].append(res[m])
    table = pa.table({"sample_id": ids, **{f"{m}_emb": list(np.concatenate(v)) for m, v in embs.items()}})
    pq.write_table(table, path)


def run_pool(files: list[str], cores: int, out: Path) -> None:
    with mp.get_context("spawn").Pool(cores) as pool:
        write_chunk_results(pool.imap(_pool_chunk, row_group_chunks(files)), out / "pool.parquet")


def _chunk_worker(_job) -> object:
    """An actor's worker for the ``raychunk`` contender: the Pool script's own function."""
    _extractors()
    return _pool_chunk


def run_raychunk(files: list[str], cores: int, out: Path) -> None:
    """The Pool script with its pool swapped for mmbatch's Ray Data actor pool (``mmbatch.engine.units``): the
    same function on the same chunks, results back to the driver, which writes them. Against
    ``pool`` it measures what hosting the work on Ray costs; against ``mmbatch`` what mmbatch's
    data path (read, fuse and write in the worker) costs."""
    from mmbatch.engine.units import run_units

    results: list = []
    run_units(_chunk_worker, None, row_group_chunks(files), lambda _chunk, r: results.append(r),
              workers=cores)
    write_chunk_results(results, out / "raychunk.parquet")


def _hf_map(batch):
    res = extract_rows([r["bytes"] for r in batch["image"]], [r["bytes"] for r in batch["audio"]], batch["text"])
    return {f"{m}_emb": list(v) for m, v in res.items()}


def run_datasets(files: list[str], cores: int, out: Path) -> None:
    from datasets import Dataset, disable_caching

    _extractors()            # as a user's script would: build the extractors once, map forks the parent
    disable_caching()
    ds = Dataset.from_parquet(files, columns=["sample_id", "image", "audio", "text"], keep_in_memory=False)
    ds = ds.cast_column("image", ds.features["image"].__class__(decode=False)) if hasattr(ds.features["image"], "decode") else ds
    ds = ds.cast_column("audio", ds.features["audio"].__class__(decode=False)) if hasattr(ds.features["audio"], "decode") else ds
    ds = ds.map(_hf_map, batched=True, batch_size=64, num_proc=cores, remove_columns=["image", "audio", "text"])
    ds.to_parquet(str(out / "datasets.parquet"))


def make_text_partner(root: Path, n: int, seed: int = 7) -> Path:
    """A text-only manifest of n rows with the corpus' labels (0-3) and splits: a pairing partner."""
    from mmbatch.demo.corpus import bits, make_sentence

    manifest = root / "manifest.csv"
    if manifest.exists() and sum(1 for _ in manifest.open()) == n + 1:
        return manifest
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["sample_id,text,label,split"]
    for i in range(n):
        c = i % 4
        split = "train" if i % 10 < 8 else ("validation" if i % 10 == 8 else "test")
        lines.append(f"t{i:07d},{' '.join(make_sentence(bits(c)[2], rng, n_words=8))},{c},{split}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def prepare_partner(n: int, data_root: str, cores: int) -> Path:
    data = Path(data_root) / f"partner-text-n{n}"
    canon = data / "canonical"
    if not (canon / "_manifest.json").exists():
        import ray

        from mmbatch.ingest.run import run_ingest
        from mmbatch.engine.runtime import init_ray

        manifest = make_text_partner(data / "corpus", n)
        init_ray(num_cpus=cores)
        run_ingest("manifest", str(manifest), str(canon))
        ray.shutdown()
    return canon


def run_mmbatch(canon: Path, out: Path, partner: str | None = None) -> dict:
    from mmbatch.config import workflow_from_dict
    from mmbatch.preprocess import run_preprocess

    wf = {"datasets": [{"name": "bench", "path": str(canon)}], "output": {"path": str(out)}}
    if partner:          # pairing by label with a text-only partner dataset
        wf["datasets"] = [{"name": "bench", "path": str(canon), "modalities": ["image", "audio"]},
                          {"name": "partner", "path": partner, "modalities": ["text"]}]
        wf["pairing"] = {"by": "label", "primary": "bench"}
    wf = workflow_from_dict(wf)
    s = run_preprocess(wf, progress=True)
    return {"stages": {k: {"rows": v.rows, "busy_seconds": round(v.seconds, 2)} for k, v in s.stages.items()},
            "rows_out": s.rows_out}


class _RayDataExtract:
    """The plainest Ray Data pipeline a user would write around mmbatch's extractors."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        res = extract_rows([r["bytes"] for r in batch.column("image").to_pylist()],
                           [r["bytes"] for r in batch.column("audio").to_pylist()], batch.column("text").to_pylist())
        from mmbatch.preprocess.fusion import embeddings_to_arrow
        return pa.table({"sample_id": batch.column("sample_id"),
                         **{f"{m}_emb": embeddings_to_arrow(v) for m, v in res.items()}})


def run_raydata(files: list[str], cores: int, out: Path) -> None:
    import ray

    ds = ray.data.read_parquet(files, columns=["sample_id", "image", "audio", "text"])
    # actors at half a CPU: with one whole CPU each, two actors would hold both cores and the read
    # tasks would wait forever
    ds = ds.map_batches(_RayDataExtract, batch_format="pyarrow", batch_size=64, concurrency=cores, num_cpus=0.5)
    ds.write_parquet(str(out / "raydata"))


def run_ingest_job(data: Path, out: Path) -> dict:
    from mmbatch.ingest.run import run_ingest

    s = run_ingest("manifest", str(data / "corpus" / "manifest.csv"), str(out / "canonical"), echo=False)
    return {"rows_out": s.ingested, "quarantined": s.quarantined}


# --- one contender, in a fresh process ------------------------------------------------------------
WARM_LABEL = "mmbatch preprocess, Ray Data's service actors running"
CONTENDERS = ("ideal", "mmbatch", "warm", "pool", "plainpool", "raychunk", "datasets", "raydata", "ingest")


def _noop_worker(_job):
    return lambda unit: unit


def warm_ray_data() -> None:
    """Start Ray Data's per-cluster service actors (stats, autoscaling coordinator, actor locations)
    with a no-op job, as a cluster that has run a Ray Data job has them: the ``warm`` contender is
    mmbatch's job on such a Ray (a scheduled job on a running cluster), ``mmbatch`` on a fresh one."""
    from mmbatch.engine.units import run_units

    run_units(_noop_worker, None, [0, 1], lambda _unit, _result: None, workers=2)
    time.sleep(3)           # the service actors' processes finish starting (about 1 CPU s each)


WARMUP = "warmup"


def warm_up_code(files: list[str], cores: int) -> dict:
    """Load what the contenders run (Ray's binaries and Ray Data, mmbatch, the extractors' libraries)
    once, untimed, before the rounds, as ``read_once`` does for the data: otherwise the first contender
    of the first round pays the cold page cache for everyone (measured: a first mmbatch run with Ray's
    start-up at 4.9 s instead of 3.3 s, and 73 instead of 69 CPU s for its job)."""
    from mmbatch.engine.runtime import init_ray

    init_ray(num_cpus=cores)
    warm_ray_data()
    _pool_chunk((files[0], 0))
    _plain_chunk((files[0], 0))
    return {}


def child(name: str, data: Path, cores: int, probe: int, partner: str | None = None) -> dict:
    import shutil

    canon = data / "canonical"
    files = canonical_files(canon)
    if name == "ideal":
        return run_ideal(files, probe)
    if name == WARMUP:
        return warm_up_code(files, cores)
    target = data / f"out-{name}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    res: dict = {}
    if name in ("mmbatch", "warm", "raychunk", "raydata", "ingest"):
        from mmbatch.engine.runtime import init_ray

        t0 = time.perf_counter()
        init_ray(num_cpus=cores)
        res["ray_startup_s"] = round(time.perf_counter() - t0, 2)
        if name == "warm":
            warm_ray_data()
    io0 = psutil.Process().io_counters().read_chars
    with Monitor() as mon:
        if name in ("mmbatch", "warm"):
            res.update(run_mmbatch(canon, target / "fused", partner))
        elif name == "pool":
            run_pool(files, cores, target)
        elif name == "plainpool":
            run_plainpool(files, cores, target)
        elif name == "datasets":
            run_datasets(files, cores, target)
        elif name == "raychunk":
            run_raychunk(files, cores, target)
        elif name == "raydata":
            run_raydata(files, cores, target)
        elif name == "ingest":
            res.update(run_ingest_job(data, target))
        else:
            raise SystemExit(f"unknown contender {name!r}; choose from {CONTENDERS}")
    return {**res, "seconds": mon.seconds, "cpu_util_pct": round(float(np.mean(mon.samples)) if mon.samples else 0.0, 1),
            "cpu_seconds": round(mon.cpu_seconds, 1), "steal_pct": mon.steal.pct,
            "cpu_by_process": mon.cpu_by_process(),
            "peak_mem_mb": round(mon.peak / 2**20, 1),
            "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "driver_read_mb": round((psutil.Process().io_counters().read_chars - io0) / 2**20, 1)}


def spawn_child(name: str, args, n: int) -> dict:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "benchmarks.run", "--child", name, "--samples", str(n), "--data", args.data,
           "--probe", str(args.probe)] + (["--small"] if args.shape == "small" else []) + \
        (["--partner", args.partner] if getattr(args, "partner", None) else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"contender {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def data_dir(data_root: str, n: int, shape: str) -> Path:
    return Path(data_root) / (f"n{n}" if shape == "large" else f"{shape}-n{n}")


def prepare(n: int, data_root: str, cores: int, shape: str = "large") -> Path:
    """Corpus + canonical Parquet (ingested once, reused by later runs)."""
    data = data_dir(data_root, n, shape)
    t0 = time.perf_counter()
    manifest = make_corpus(data / "corpus", n, shape=shape)
    print(f"corpus: {n} samples ready in {time.perf_counter() - t0:.1f} s")
    canon = data / "canonical"
    if not (canon / "_manifest.json").exists():
        import ray

        from mmbatch.ingest.run import run_ingest
        from mmbatch.engine.runtime import init_ray

        init_ray(num_cpus=cores)
        run_ingest("manifest", str(manifest), str(canon))
        ray.shutdown()
    read_once(data / "corpus", canon)
    return data


def read_once(*folders: Path) -> None:
    """Read every input file once, so that no contender's first round reads from the disk
    (measured: an ingest round after the corpus had left the page cache ran at 84 % CPU, 13 % slower)."""
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file():
                with p.open("rb") as f:
                    while f.read(1 << 22):
                        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--data", default="/tmp/mmbatch-bench")
    ap.add_argument("--probe", type=int, default=256, help="rows for the single-process probe")
    ap.add_argument("--only", default=",".join(CONTENDERS))
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender, interleaved; the table shows medians")
    ap.add_argument("--memory", action="store_true", help="peak memory (PSS) of mmbatch preprocess at N and 4N samples")
    ap.add_argument("--overhead", action="store_true",
                    help="each contender's CPU seconds for a --small job (its fixed cost) and an N-sample job")
    ap.add_argument("--tiny", type=int, default=40, help="samples of the tiny job of --overhead")
    ap.add_argument("--small", action="store_true",
                    help="the small-item corpus (28x28 PNG + 1 s FLAC + short text, the AV-MNIST shape) "
                         "instead of the large-item one (500x375 JPEG + 10-15 s FLAC + transcript)")
    ap.add_argument("--pairing", type=int, default=0, metavar="ROWS",
                    help="--memory: pair by label with a text-only partner dataset of ROWS rows")
    ap.add_argument("--partner", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.shape = "small" if args.small else "large"
    cores = os.cpu_count() or 1
    if args.child:
        res = child(args.child, data_dir(args.data, args.samples, args.shape), cores, args.probe, args.partner)
        print("RESULT " + json.dumps(res))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.memory:
        return memory_main(args, out, cores)
    if args.overhead:
        return overhead_main(args, out, cores)
    data = prepare(args.samples, args.data, cores, args.shape)
    files = canonical_files(data / "canonical")
    tab = pa.concat_tables([pq.read_table(f, columns=["duration"]) for f in files])
    audio_seconds = float(np.nansum(np.array(tab.column("duration").to_pylist(), dtype=float)))
    n = tab.num_rows
    img_bytes = sum(pc.sum(pc.binary_length(pq.read_table(f, columns=["image"]).column("image")
                                            .combine_chunks().field("bytes"))).as_py() for f in files)
    results = {"machine": {"cores": cores, "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                           "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
               "command": f"python -m benchmarks.run --samples {args.samples} --repeat {args.repeat}"
                          + (" --small" if args.shape == "small" else "") + (f" --only {args.only}" if args.only != ",".join(CONTENDERS) else ""),
               "shape": args.shape,
               "samples": n, "audio_seconds": round(audio_seconds, 1), "mean_jpeg_kb": round(img_bytes / n / 1024, 1),
               "repeat": args.repeat, "runs": {}}
    names = [c for c in CONTENDERS if c in args.only.split(",")]
    label = {"mmbatch": "mmbatch preprocess", "warm": WARM_LABEL,
             "pool": f"multiprocessing.Pool({cores})",
             "plainpool": f"multiprocessing.Pool({cores}), plain librosa/OpenCV features",
             "datasets": f"datasets.map(num_proc={cores})", "ideal": "ideal",
             "raychunk": "Pool script on mmbatch's Ray actor pool",
             "raydata": "plain Ray Data map_batches", "ingest": "mmbatch ingest (manifest)"}
    spawn_child(WARMUP, args, args.samples)
    for r in range(args.repeat):
        # the order flips every round (A B, B A, ...): on a VM whose speed drifts within minutes,
        # a fixed order would hand one contender the same phase of every drift
        for name in (names if r % 2 == 0 else names[::-1]):
            res = spawn_child(name, args, args.samples)
            if name != "ideal":
                res.update(samples_per_s=round(n / res["seconds"], 1),
                           samples_per_s_with_startup=round(n / (res["seconds"] + res.get("ray_startup_s", 0.0)), 1),
                           audio_x_realtime=round(audio_seconds / res["seconds"], 1))
            results["runs"].setdefault(label[name], []).append(res)
            print(f"[{r + 1}/{args.repeat}] {label[name]}: " +
                  json.dumps({k: v for k, v in res.items() if k != "stages"}))
    write_results(results, out)


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def paired_ratios(mine: list[dict], theirs: list[dict]) -> list[float]:
    """Per round, mmbatch's samples/s over the other contender's (rounds where both ran)."""
    return [round(a["samples_per_s"] / b["samples_per_s"], 3) for a, b in zip(mine, theirs)]


def write_results(results: dict, out: Path) -> None:
    runs = results["runs"]
    ideal = None
    if "ideal" in runs:
        ideal = round(_median(runs["ideal"], "single_process_samples_per_s") * results["machine"]["cores"], 1)
        results["ideal_samples_per_s"] = ideal
    startup = [r["ray_startup_s"] for r in runs.get("mmbatch", [])]
    lines = [f"Machine: {results['machine']['cores']} cores, {results['machine']['ram_gb']} GiB RAM, "
             f"Python {results['machine']['python']}. {results['samples']} samples "
             f"(image ~{results['mean_jpeg_kb']} KB + {results['audio_seconds'] / results['samples']:.1f} s FLAC + text). "
             f"Command: `{results['command']}`; each contender in a fresh process, medians of {results['repeat']} "
             f"interleaved run(s)" + (f"; Ray start-up {np.median(startup):.1f} s, not included in samples/s "
                                      "(the last column includes it)." if startup else "."),
             "", "| contender | samples/s (range) | mmbatch vs this, paired (range) | audio s / wall s | CPU util % "
                 "| CPU s / 1k samples | driver CPU s / 1k samples | driver read MB | CPU steal % | peak memory (PSS) MB "
                 "| % of ideal | samples/s incl. start-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if ideal:
        ranked = sorted(runs["ideal"], key=lambda r: r["single_process_samples_per_s"])
        per = ranked[len(ranked) // 2]["per_sample_ms"]                   # the median run's
        lines.append(f"| ideal ({results['machine']['cores']} x single process; ms/sample: " +
                     ", ".join(f"{k} {v}" for k, v in per.items()) + f") | {ideal} | | | | "
                     f"{sum(per.values()):.1f} | | | {_median(runs['ideal'], 'steal_pct'):.0f} | | 100 | |")
    mine = runs.get("mmbatch preprocess")
    warm = runs.get(WARM_LABEL)
    results["paired_ratio"], results["paired_ratio_warm"] = {}, {}
    for name, rs in runs.items():
        if name == "ideal":
            continue
        sps = _median(rs, "samples_per_s")
        rng = f" ({min(r['samples_per_s'] for r in rs)}-{max(r['samples_per_s'] for r in rs)})" if len(rs) > 1 else ""
        pct = f"{100 * sps / ideal:.0f}" if ideal else ""
        driver = float(np.median([r["cpu_by_process"].get("driver", 0.0) for r in rs]))
        paired = ""
        if mine and not name.startswith("mmbatch"):          # not against itself or ingest
            # mmbatch's speed over this contender's within each round (the two ran back to back):
            # less exposed to the VM's drift between rounds than a ratio of medians
            ratios = paired_ratios(mine, rs)
            results["paired_ratio"][name] = ratios
            paired = f"{np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            if warm:
                ratios = paired_ratios(warm, rs)
                results["paired_ratio_warm"][name] = ratios
                paired += f"; warm {np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        lines.append(f"| {name} | {sps:.1f}{rng} | {paired} | {_median(rs, 'audio_x_realtime'):.0f} | "
                     f"{_median(rs, 'cpu_util_pct'):.0f} | {1000 * _median(rs, 'cpu_seconds') / results['samples']:.1f} | "
                     f"{1000 * driver / results['samples']:.2f} | {_median(rs, 'driver_read_mb'):.0f} | "
                     f"{_median(rs, 'steal_pct'):.0f} | {_median(rs, 'peak_mem_mb'):.0f} | {pct} | "
                     f"{_median(rs, 'samples_per_s_with_startup'):.1f} |")
    stem = "preprocess" + ("-small" if results.get("shape") == "small" else "") + \
        ("" if results["samples"] in (2000,) else f"-{results['samples']}")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


def memory_main(args, out: Path, cores: int) -> None:
    """Peak memory (PSS) of mmbatch preprocess (driver + Ray workers) at N and 4N samples."""
    rows = []
    if args.pairing:
        args.partner = str(prepare_partner(args.pairing, args.data, cores))
    for n in (args.samples, 4 * args.samples):
        prepare(n, args.data, cores, args.shape)
        res = spawn_child("mmbatch", args, n)
        rows.append({"samples": n, "peak_mem_mb": res["peak_mem_mb"], "seconds": round(res["seconds"], 1),
                     "samples_per_s": round(n / res["seconds"], 1),
                     "driver_peak_mb": res.get("driver_peak_mb")})
        print(rows[-1])
    ratio = rows[1]["peak_mem_mb"] / rows[0]["peak_mem_mb"]
    cmd = f"python -m benchmarks.run --memory --samples {args.samples}" + (" --small" if args.shape == "small" else "") \
        + (f" --pairing {args.pairing}" if args.pairing else "")
    res = {"command": cmd, "runs": rows, "ratio_4x": round(ratio, 3), "pairing_partner_rows": args.pairing or None}
    name = "memory" + ("-small" if args.shape == "small" else "") + ("-paired" if args.pairing else "")
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    print(f"4x data -> {ratio:.2f}x peak memory")


def overhead_main(args, out: Path, cores: int) -> None:
    """What each contender's CPU time is made of: its machine-wide CPU seconds for a tiny job
    (``--small`` samples: start-up, imports, service processes; the feature work is a rounding
    error) and for an N-sample job; the difference per extra sample is its marginal cost, next to
    the ideal's (warm single-process extractors). CPU seconds barely depend on how fast the VM runs
    at that moment (wall time does, by up to 2x on the development VM), so this separates a
    contender's fixed cost per job from its cost per sample."""
    sizes = (args.tiny, args.samples)
    for n in sizes:
        prepare(n, args.data, cores, args.shape)
    names = [c for c in ("mmbatch", "pool", "datasets") if c in args.only.split(",")]
    runs: dict = {name: {n: [] for n in sizes} for name in names}
    ideal = []
    for r in range(args.repeat):
        ideal.append(spawn_child("ideal", args, sizes[1]))
        for n in sizes:
            for name in names:
                res = spawn_child(name, args, n)
                runs[name][n].append(res)
                print(f"[{r + 1}/{args.repeat}] {name} n={n}: cpu {res['cpu_seconds']} s, wall {res['seconds']:.1f} s, "
                      f"steal {res['steal_pct']} %")
    ideal_ms = float(np.median([1e3 / r["single_process_samples_per_s"] for r in ideal]))
    rows = {}
    for name in names:
        cpu = {n: _median(runs[name][n], "cpu_seconds") for n in sizes}
        marginal_ms = 1e3 * (cpu[sizes[1]] - cpu[sizes[0]]) / (sizes[1] - sizes[0])
        rows[name] = {"cpu_seconds": cpu, "fixed_cpu_s": cpu[sizes[0]], "marginal_cpu_ms_per_sample": round(marginal_ms, 2),
                      "steal_pct": _median([x for n in sizes for x in runs[name][n]], "steal_pct")}
    res = {"command": f"python -m benchmarks.run --overhead --samples {args.samples} --tiny {args.tiny} "
                      f"--repeat {args.repeat}",
           "machine": {"cores": cores, "python": platform.python_version()}, "sizes": list(sizes),
           "ideal_cpu_ms_per_sample": round(ideal_ms, 2), "contenders": rows, "runs": runs}
    (out / "overhead.json").write_text(json.dumps(res, indent=2))
    label = {"mmbatch": "mmbatch", "pool": f"multiprocessing.Pool({cores})", "datasets": f"datasets.map(num_proc={cores})"}
    lines = [f"Machine: {cores} cores, Python {platform.python_version()}. Command: `{res['command']}`. "
             f"Machine-wide CPU seconds during the timed run (Ray start-up excluded), medians of {args.repeat} "
             f"interleaved runs. Ideal: {ideal_ms:.1f} CPU ms per sample (warm single-process extractors).", "",
             f"| contender | CPU s, {sizes[0]} samples (fixed cost per job) | CPU s, {sizes[1]} samples "
             f"| marginal CPU ms per sample | marginal / ideal | CPU steal % |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        c = r["cpu_seconds"]
        lines.append(f"| {label[name]} | {c[sizes[0]]:.1f} | {c[sizes[1]]:.1f} | {r['marginal_cpu_ms_per_sample']} | "
                     f"{r['marginal_cpu_ms_per_sample'] / ideal_ms:.2f} | {r['steal_pct']:.0f} |")
    (out / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
