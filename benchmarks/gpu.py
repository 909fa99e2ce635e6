"""GPU benchmark: ResNet-50 embeddings, torch log-mel and a full `mmbatch preprocess` on one machine.

    python -m benchmarks.gpu                           # on a GPU machine (the README figures)
    python -m benchmarks.gpu --samples 2000            # the preprocess part on 2,000 samples
    python -m benchmarks.gpu --tiny --device cpu       # under a minute on a 2-core CPU (the test)
    benchmarks/gpu_run.sh                              # the one prepared script for a lent GPU machine

Sections (each runs on its own; a section that fails is recorded with its error and the others run):

1. ``resnet50``: ResNet-50 global-pooled embeddings in images/s at fp32 and bf16, three ways:
   the model alone on synthetic 224x224 batches already on the device (the GPU ceiling);
   mmbatch's ``ResNetExtractor.encode`` on uint8 host batches (what a worker's model step gets);
   and from generated ImageNet-like JPEGs (~500x375): decode + resize on the CPU, one process and
   one process per core, and decode + embed in one process (``ResNetExtractor.extract``).
2. ``logmel``: the torch log-mel front end (``TorchFrontend``, fp32) on batches of 1 s and 10 s
   16 kHz clips, in audio seconds per wall second (x real time): on device tensors, and from host
   clips to statistics back on the host (the ``logmel_stats`` extractor's path).
3. ``shape``: the GPU shape (benchmarks.gpu_shape) with ResNet-50 at 224 px: fused (one actor pool,
   each actor decodes + embeds on a GPU share; today's shape) against split (decode in CPU
   ``map_batches`` tasks -> one embed actor holding the whole GPU), at embed batches 64 and 256;
   samples/s, decoded bytes through the object store, the embed actor's utilisation, GPU use.
4. ``preprocess``: a generated corpus (benchmarks.run's large shape: JPEG + 10-15 s FLAC + text),
   ingested, then ``run_preprocess`` with image ``cnn`` (resnet50, bf16 on CUDA) and the torch
   audio backend; samples/s, where each modality ran (the summary's placement) and the GPU's
   utilisation meanwhile.
5. ``preprocess_split``: the same preprocess of the same canonical data with ``features.gpu_shape:
   split`` (decode in CPU workers, one embed actor per GPU; docs/data-path.md), and whether its
   output is identical to the fused run's. Without a GPU it runs fused (and says so).
6. ``hf``: the ``hf`` extractors (benchmarks.hf_encoders): ViT-B/16, wav2vec2-base and BERT-base
   built from their configs (random weights, no network), ``encode`` and ``extract`` at fp32 and bf16.

GPU utilisation and memory are sampled every 0.2 s (pynvml, else ``nvidia-smi``) while each
measurement runs; on the CPU they are null. Writes ``gpu.md`` and ``gpu.json`` (``gpu-tiny.*``
with ``--tiny``) to --out with the GPU model, the torch and CUDA versions and the command.
Exit status 1 when a section failed.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np


# --- sizes ----------------------------------------------------------------------------------------
@dataclass
class Sizes:
    resnet_batch: int          # images per forward pass
    seconds: float             # minimum timed seconds per measurement (after warm-up)
    warmup: int                # untimed steps first (cuDNN algorithm choice, autocast caches)
    jpegs: int                 # distinct generated JPEGs
    decode_images: int         # images decoded by the one-process-per-core pool
    clips_1s: int              # clips per log-mel batch
    clips_10s: int
    samples: int               # preprocess corpus


FULL = Sizes(resnet_batch=256, seconds=5.0, warmup=3, jpegs=512, decode_images=8192,
             clips_1s=256, clips_10s=64, samples=2000)
TINY = Sizes(resnet_batch=2, seconds=0.0, warmup=1, jpegs=4, decode_images=8,
             clips_1s=4, clips_10s=2, samples=8)


# --- environment ------------------------------------------------------------------------------------
def nvidia_smi(query: str) -> Optional[list[list[str]]]:
    """Rows of ``nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits``; None without the tool."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]


def package_versions() -> dict:
    """Versions of the packages the benchmark leans on (None: not importable)."""
    import importlib

    out = {}
    for name in ("numpy", "cv2", "pyarrow", "ray", "pydantic", "soundfile", "pynvml"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # noqa: BLE001 - missing or broken: reported, the sections say what failed
            out[name] = None
    return out


def environment(asked: str) -> dict:
    """What torch and the machine offer, and the device the benchmark will use (``asked``: auto|cpu|cuda).

    Never fails for want of a GPU: a CPU-only torch, a missing driver or ``--device cuda`` without
    CUDA fall back to the CPU with a warning that says why."""
    import torch

    cuda_ok = torch.cuda.is_available()
    smi = nvidia_smi("name,driver_version,memory.total")
    env = {
        "python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda_build": torch.version.cuda, "cuda_available": cuda_ok,
        "cudnn": torch.backends.cudnn.version() if cuda_ok else None,
        "gpu": None, "gpu_count": torch.cuda.device_count() if cuda_ok else 0,
        "driver": smi[0][1] if smi else None, "nvidia_smi_gpus": [r[0] for r in smi] if smi else [],
        "warnings": [],
    }
    env["packages"] = package_versions()
    if asked == "cpu":
        device = "cpu"
    elif cuda_ok:
        device = "cuda"
    else:
        device = "cpu"
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU-only build"
        else:
            why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"
        if smi:
            why += f", but nvidia-smi shows {', '.join(env['nvidia_smi_gpus'])} (driver {env['driver']})"
        if asked == "cuda" or smi:
            env["warnings"].append(f"--device {asked}: {why}; running on the CPU. Install a CUDA build of torch "
                                   "(README: 'On a GPU cluster') to measure the GPU.")
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["tf32"] = {"cudnn_conv": torch.backends.cudnn.allow_tf32,
                       "matmul": torch.backends.cuda.matmul.allow_tf32}
    env["device"] = device
    return env


def print_environment(env: dict) -> None:
    print(f"python {env['python']}, {env['cores']} cores; torch {env['torch']} "
          f"(CUDA build: {env['torch_cuda_build'] or 'none, CPU-only'}; cuDNN {env['cudnn']}); "
          f"torch.cuda.is_available(): {env['cuda_available']}", flush=True)
    print(f"nvidia-smi: {', '.join(env['nvidia_smi_gpus']) or 'not found / no GPU'}"
          + (f" (driver {env['driver']})" if env["driver"] else ""), flush=True)
    print("packages: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in env["packages"].items()), flush=True)
    for w in env["warnings"]:
        print(f"WARNING: {w}", file=sys.stderr, flush=True)
    print(f"benchmark device: {env['device']}" + (f" ({env['gpu']})" if env["gpu"] else ""), flush=True)


# --- GPU utilisation -------------------------------------------------------------------------------
class Periodic:
    """Calls ``self._sample()`` every ``self.interval`` s in a daemon thread, from ``_start()`` to
    ``_halt()``; a sample that raises is a missing sample, not a failed benchmark."""

    interval: float

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a failed read is a missing sample
                pass
            if self._stop.wait(self.interval):
                return

    def _start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        self._stop.set()
        self._thread.join()


class GpuSampler(Periodic):
    """Samples the GPU's utilisation (%) and used memory (MiB) every ``interval`` s in a thread.

    ``result`` is None on the CPU, or when neither pynvml nor nvidia-smi can read the GPU."""

    def __init__(self, device: str, interval: float = 0.2):
        self.enabled, self.interval = device == "cuda", interval
        self.util: list[float] = []
        self.mem: list[float] = []
        self._read: Optional[Callable[[], tuple[float, float]]] = None
        self.result: Optional[dict] = None

    def _reader(self) -> Optional[Callable[[], tuple[float, float]]]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        index = int(visible) if visible.isdigit() else 0
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)

            def read_nvml() -> tuple[float, float]:
                return (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
            read_nvml()
            return read_nvml
        except Exception:  # noqa: BLE001 - no pynvml or no NVML: try the command-line tool
            pass
        if nvidia_smi("utilization.gpu,memory.used") is None:
            return None

        def read_smi() -> tuple[float, float]:
            rows = nvidia_smi("utilization.gpu,memory.used")
            row = rows[min(index, len(rows) - 1)]
            return float(row[0]), float(row[1])
        return read_smi

    def _sample(self) -> None:
        u, m = self._read()
        self.util.append(u)
        self.mem.append(m)

    def __enter__(self) -> "GpuSampler":
        if self.enabled:
            self._read = self._reader()
            if self._read is not None:
                self._start()
        return self

    def __exit__(self, *exc) -> None:
        if self._read is None:
            return
        self._halt()
        if self.util:
            self.result = {"util_mean_pct": round(float(np.mean(self.util)), 1),
                           "util_max_pct": round(float(np.max(self.util)), 1),
                           "mem_max_mib": round(float(np.max(self.mem)), 0), "samples": len(self.util)}


# --- timing -------------------------------------------------------------------------------------------
def timed(step: Callable[[], None], sync: Callable[[], None], sizes: Sizes, device: str) -> dict:
    """Run ``step`` ``sizes.warmup`` times untimed, then at least once and for ``sizes.seconds``;
    ``sync`` waits for the device. Returns steps, seconds and the GPU sampler's result."""
    for _ in range(sizes.warmup):
        step()
    sync()
    with GpuSampler(device) as gpu:
        steps, t0 = 0, time.perf_counter()
        while True:
            step()
            steps += 1
            if time.perf_counter() - t0 >= sizes.seconds:
                sync()
                if time.perf_counter() - t0 >= sizes.seconds:
                    break
        seconds = time.perf_counter() - t0
    return {"steps": steps, "seconds": round(seconds, 4), "gpu": gpu.result}


def device_sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


# --- 1. ResNet-50 --------------------------------------------------------------------------------------
def make_jpegs(n: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> list[bytes]:
    """ImageNet-like JPEGs (quality 92, ~110 KB at 500x375), as benchmarks.run's large corpus makes them."""
    import cv2

    rng = np.random.default_rng(seed)
    w, h = size
    base = cv2.GaussianBlur(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8), (0, 0), 3)
    out = []
    for _ in range(n):
        img = cv2.add(np.roll(base, int(rng.integers(0, w)), axis=1),
                      rng.integers(0, 60, size=base.shape, dtype=np.uint8))
        _, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        out.append(enc.tobytes())
    return out


_POOL_JPEGS: list[bytes] = []


def _pool_init(jpegs: list[bytes]) -> None:
    from mmbatch.preprocess.features.image import decode_image
    from mmbatch.engine.runtime import pin_threads

    pin_threads()
    _POOL_JPEGS[:] = jpegs
    decode_image(jpegs[0], 224)                  # imports and first call, before the timed part


def _decode_range(start_count: tuple[int, int]) -> int:
    from mmbatch.preprocess.features.image import decode_image

    start, count = start_count
    for i in range(start, start + count):
        decode_image(_POOL_JPEGS[i % len(_POOL_JPEGS)], 224)
    return count


def decode_pool(jpegs: list[bytes], total: int, processes: int) -> dict:
    """Decode + resize + crop ``total`` images with one process per core. Each process holds the
    JPEGs from its start (sent once), so the timed part is decoding, not shipping bytes."""
    per = max(1, total // (processes * 4))
    chunks = [(i, min(per, total - i)) for i in range(0, total, per)]
    with mp.get_context("spawn").Pool(processes, initializer=_pool_init, initargs=(jpegs[:64],)) as pool:
        pool.map(time.sleep, [0.25] * (2 * processes), chunksize=1)    # let every process start up first
        t0 = time.perf_counter()
        done = sum(pool.map(_decode_range, chunks, chunksize=1))
        seconds = time.perf_counter() - t0
    return {"images": done, "seconds": round(seconds, 4), "processes": processes}


def bench_resnet(env: dict, sizes: Sizes) -> dict:
    import torch

    from mmbatch.preprocess.features.image import ResNetExtractor, decode_image
    from mmbatch.preprocess.features.resnet import build_resnet

    device = env["device"]
    sync = device_sync(device)
    B = sizes.resnet_batch
    # seeded random weights: the speed does not depend on them
    ex = ResNetExtractor(arch="resnet50", size=224, batch_size=B, precision="fp32").to(device)
    # the model alone, placed as the extractor places it (channels-last on CUDA)
    torch.manual_seed(0)
    model = build_resnet("resnet50").eval().to(device)
    x = torch.randn(B, 3, 224, 224, device=device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    host = np.random.default_rng(0).integers(0, 256, size=(B, 224, 224, 3), dtype=np.uint8)
    runs = []
    for precision in ("fp32", "bf16"):
        ex.precision = precision                  # the extractor reads it at each call (autocast)

        def forward(bf16: bool = precision == "bf16") -> None:
            with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                model.features(x)
        r = timed(forward, sync, sizes, device)
        runs.append({"name": "model only, synthetic batch on the device", "precision": precision, "batch": B,
                     "images": r["steps"] * B, "seconds": r["seconds"],
                     "img_per_s": round(r["steps"] * B / r["seconds"], 1), "gpu": r["gpu"]})
        r = timed(lambda: ex.encode(host), sync, sizes, device)
        runs.append({"name": "ResNetExtractor.encode, uint8 host batch", "precision": precision, "batch": B,
                     "images": r["steps"] * B, "seconds": r["seconds"],
                     "img_per_s": round(r["steps"] * B / r["seconds"], 1), "gpu": r["gpu"]})
        print(f"  resnet50 {precision}: model {runs[-2]['img_per_s']} img/s, "
              f"encode {runs[-1]['img_per_s']} img/s", flush=True)

    jpegs = make_jpegs(sizes.jpegs)
    mean_kb = round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1)
    decode_image(jpegs[0], 224)
    t0 = time.perf_counter()
    for b in jpegs:
        decode_image(b, 224)
    seconds = time.perf_counter() - t0
    runs.append({"name": f"JPEG decode + resize + crop (CPU, 1 process; 500x375, ~{mean_kb} KB)",
                 "precision": None, "batch": None, "images": len(jpegs), "seconds": round(seconds, 4),
                 "img_per_s": round(len(jpegs) / seconds, 1), "gpu": None})
    cores = os.cpu_count() or 1
    p = decode_pool(jpegs, sizes.decode_images, cores)
    runs.append({"name": f"JPEG decode + resize + crop (CPU, {cores} processes)", "precision": None, "batch": None,
                 "images": p["images"], "seconds": p["seconds"], "img_per_s": round(p["images"] / p["seconds"], 1),
                 "gpu": None})
    precision = "bf16" if device == "cuda" else "fp32"
    ex.precision = precision
    ex.extract(jpegs[:B])
    sync()
    with GpuSampler(device) as gpu:
        t0 = time.perf_counter()
        for i in range(0, len(jpegs), B):
            ex.extract(jpegs[i:i + B])
        sync()
        seconds = time.perf_counter() - t0
    runs.append({"name": "JPEG -> embedding, ResNetExtractor.extract (1 process)", "precision": precision,
                 "batch": B, "images": len(jpegs), "seconds": round(seconds, 4),
                 "img_per_s": round(len(jpegs) / seconds, 1), "gpu": gpu.result})
    print(f"  JPEG decode: {runs[-3]['img_per_s']} img/s (1 process), {runs[-2]['img_per_s']} img/s ({cores}); "
          f"decode + embed: {runs[-1]['img_per_s']} img/s", flush=True)
    return {"arch": "resnet50", "weights": "random (seeded)", "runs": runs}


# --- 2. log-mel -----------------------------------------------------------------------------------------
def bench_logmel(env: dict, sizes: Sizes) -> dict:
    import torch

    from mmbatch.preprocess.features.audio import DEFAULT_FRAMES, TorchFrontend

    device = env["device"]
    sync = device_sync(device)
    front = TorchFrontend(DEFAULT_FRAMES, device)
    sr = DEFAULT_FRAMES.sample_rate
    rng = np.random.default_rng(0)
    runs = []
    for clip_s, batch in ((1.0, sizes.clips_1s), (10.0, sizes.clips_10s)):
        n = int(clip_s * sr)
        t = np.arange(n, dtype=np.float32) / sr
        clips = [(0.1 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t)
                  + 0.01 * rng.standard_normal(n)).astype(np.float32) for _ in range(batch)]
        X, _ = front.pad_batch(clips)
        audio_s = clip_s * batch

        def on_device(X=X) -> None:
            with torch.inference_mode():
                front.logmel_tm(X)
        for name, step in (("log-mel, clips already on the device", on_device),
                           ("log-mel + MFCC statistics from host clips (logmel_stats path)",
                            lambda clips=clips: front.stats(clips))):
            r = timed(step, sync, sizes, device)
            runs.append({"name": name, "clip_seconds": clip_s, "batch": batch, "precision": "fp32",
                         "audio_seconds": audio_s * r["steps"], "seconds": r["seconds"],
                         "x_realtime": round(audio_s * r["steps"] / r["seconds"], 1), "gpu": r["gpu"]})
        print(f"  log-mel {clip_s:.0f} s clips x{batch}: {runs[-2]['x_realtime']}x real time on device, "
              f"{runs[-1]['x_realtime']}x from host clips", flush=True)
    return {"frames": DEFAULT_FRAMES.as_dict(), "runs": runs}


# --- 3. the GPU shape -------------------------------------------------------------------------------
def bench_shape(env: dict, sizes: Sizes) -> dict:
    import ray

    from benchmarks.gpu_shape import Setup, gpu_model, measure, unit_costs
    from mmbatch.engine.runtime import init_ray

    device = env["device"]
    cores = os.cpu_count() or 2
    gpus = env["gpu_count"] if device == "cuda" else 0
    tiny = sizes is TINY
    # fused: one model actor per CPU but the driver's; split: decode tasks on those CPUs, minus the
    # embed actor's one
    s = Setup(images=8 if tiny else 8192, arch="resnet50", size=224, batches=(4,) if tiny else (64, 256),
              decode_batch=4 if tiny else 32, fused_actors=max(1, cores - 1), decode_cpus=1.0, device=device,
              precision="bf16" if device == "cuda" else "fp32", model_images=2 if tiny else 16)
    jpegs = make_jpegs(min(s.images, sizes.jpegs))
    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=cores, num_gpus=gpus)
    try:
        res = measure(s, jpegs, around=lambda: GpuSampler(device))
    finally:
        ray.shutdown()
    res["costs"] = unit_costs(jpegs, s)
    res["gpu_model"] = gpu_model(res["costs"])
    split = [r for r in res["runs"] if r["shape"] == "split"]
    best = max(split, key=lambda r: r["steady_samples_per_s"])
    # with the measured embed rate: decode CPUs one GPU needs, and the split shape's store traffic
    res["measured"] = {"embed_img_per_s": round(1000 / best["embed_ms_per_image"], 1),
                       "decode_cpus_per_gpu": round(res["costs"]["decode_224_ms"] / best["embed_ms_per_image"], 2),
                       "split_store_mb_per_s": round(best["steady_samples_per_s"] * 224 * 224 * 3 / 1e6, 1)}
    for r in res["runs"]:
        print(f"  {r['shape']} batch {r['batch']}: {r['steady_samples_per_s']} img/s steady, embed actor "
              f"{r['embed_actor_util']:.0%} busy, {r['decoded_bytes_through_store'] / 1e6:.1f} MB decoded "
              "through the object store", flush=True)
    return res


# --- 4. preprocess ------------------------------------------------------------------------------------
def bench_preprocess(env: dict, sizes: Sizes, samples: int, data_root: Path, shape: str = "fused") -> dict:
    import ray

    from benchmarks.run import make_corpus
    from mmbatch.config import workflow_from_dict
    from mmbatch.ingest.run import run_ingest
    from mmbatch.preprocess import run_preprocess
    from mmbatch.engine.runtime import init_ray

    device = env["device"]
    gpus = env["gpu_count"] if device == "cuda" else 0
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()          # this process's cached blocks from the other sections
    data = data_root / f"large-n{samples}"
    canon, out = data / "canonical", data / ("fused" if shape == "fused" else f"fused-{shape}")
    reuse = shape != "fused" and (canon / "_manifest.json").exists()     # the fused section's canonical data
    corpus_s = 0.0
    if not reuse:
        t0 = time.perf_counter()
        manifest = make_corpus(data / "corpus", samples, shape="large")
        corpus_s = time.perf_counter() - t0
        print(f"  corpus: {samples} samples in {corpus_s:.1f} s", flush=True)
    for d in (out,) if reuse else (canon, out):
        shutil.rmtree(d, ignore_errors=True)

    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    init_ray(num_cpus=os.cpu_count(), num_gpus=gpus)       # explicit: --device cpu keeps the GPUs out
    ray_startup_s = time.perf_counter() - t0
    try:
        ing, ingest_s = None, 0.0
        if not reuse:
            t0 = time.perf_counter()
            ing = run_ingest("manifest", str(manifest), str(canon), echo=False)
            ingest_s = time.perf_counter() - t0
        precision = "bf16" if device == "cuda" else "fp32"
        wf = workflow_from_dict({
            "datasets": [{"name": "gpu-bench", "path": str(canon)}],
            "output": {"path": str(out)},
            "ray": {"num_gpus": gpus},
            "features": {"image": {"extractor": "cnn", "arch": "resnet50", "size": 224, "precision": precision,
                                   "batch_size": max(sizes.resnet_batch, 64)},
                         "audio": {"backend": "torch"}, "gpu_shape": shape},
        })
        with GpuSampler(device) as gpu:
            t0 = time.perf_counter()
            s = run_preprocess(wf, progress=True)
            seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    fused = data / "fused"
    return {
        "samples": samples, "corpus_seconds": round(corpus_s, 1), "ray_startup_s": round(ray_startup_s, 2),
        "shape": s.placement.get("image", {}).get("shape", "fused"),
        **({"same_output_as_fused": _same_parquet(out, fused)} if shape != "fused" and fused.exists() else {}),
        "ingest": None if ing is None else {
            "rows": ing.ingested, "quarantined": ing.quarantined, "seconds": round(ingest_s, 2),
            "samples_per_s": round(ing.ingested / ingest_s, 1)},
        "features": {"image": f"cnn resnet50 224 px {precision}", "audio": "logmel_stats, torch backend",
                     "text": "hashing"},
        "rows_in": s.rows_in, "rows_out": s.rows_out, "quarantined": s.quarantined,
        "units_processed": s.shards_processed, "units_skipped": s.shards_skipped,
        "seconds": round(seconds, 2), "samples_per_s": round(s.rows_out / seconds, 1),
        "driver_cpu_s": round(s.driver_cpu_s, 2),
        "placement": json.loads(json.dumps(s.placement, default=sorted)),
        "stages_busy_seconds": {k: round(v.seconds, 2) for k, v in s.stages.items()},
        "gpu": gpu.result,
    }


def _same_parquet(a: Path, b: Path) -> bool:
    """The two folders hold the same data files with equal tables."""
    import pyarrow.parquet as pq

    names = sorted(p.name for p in a.glob("*.parquet"))
    return names == sorted(p.name for p in b.glob("*.parquet")) and all(
        pq.read_table(a / n).equals(pq.read_table(b / n)) for n in names)


# --- output ----------------------------------------------------------------------------------------
def _gpu_cells(g: Optional[dict]) -> str:
    if not g:
        return "n/a | n/a"
    return f"{g['util_mean_pct']:.0f} / {g['util_max_pct']:.0f} | {g['mem_max_mib']:.0f}"


def render(res: dict) -> str:
    env = res["environment"]
    where = (f"{env['gpu']} ({env.get('gpu_memory_gib')} GiB, driver {env['driver']}, cuDNN {env['cudnn']})"
             if env["device"] == "cuda" else "CPU only (no GPU used)")
    lines = [f"Device: {where}; {env['cores']} CPU cores; torch {env['torch']} (CUDA {env['torch_cuda_build']}); "
             f"Python {env['python']}. Command: `{res['command']}`."]
    lines += [f"Warning: {w}" for w in env["warnings"]]
    lines += ["", "| measurement | precision | batch | throughput | GPU util % mean / max | GPU mem MiB max |",
              "|---|---|---|---|---|---|"]
    sec = res["sections"]
    if sec["resnet50"]["ok"]:
        for r in sec["resnet50"]["runs"]:
            lines.append(f"| ResNet-50: {r['name']} | {r['precision'] or ''} | {r['batch'] or ''} | "
                         f"{r['img_per_s']:,.0f} img/s | {_gpu_cells(r['gpu'])} |")
    if sec["logmel"]["ok"]:
        for r in sec["logmel"]["runs"]:
            lines.append(f"| {r['name']}, {r['clip_seconds']:.0f} s clips | {r['precision']} | {r['batch']} | "
                         f"{r['x_realtime']:,.0f}x real time | {_gpu_cells(r['gpu'])} |")
    if sec["shape"]["ok"]:
        for r in sec["shape"]["runs"]:
            lines.append(f"| ResNet-50 {r['shape']} shape: {r['actors']} model actor(s), decoded bytes through the "
                         f"object store {r['decoded_bytes_through_store'] / 1e6:,.1f} MB, embed actor busy "
                         f"{r['embed_actor_util']:.0%} | {sec['shape']['setup']['precision']} | {r['batch']} | "
                         f"{r['steady_samples_per_s']:,.0f} img/s | {_gpu_cells(r['gpu'])} |")
    for p in (sec["preprocess"], sec.get("preprocess_split", {"ok": False, "skipped": True})):
        if not p["ok"] or p.get("skipped"):
            continue
        img = p["placement"].get("image", {})
        place = ", ".join(f"{m} on {'/'.join(v.get('devices', [])) or v.get('device')}"
                          for m, v in p["placement"].items())
        workers = f"{img.get('workers')} workers x (1 CPU" + \
            (f" + {img['num_gpus']:.3g} GPU)" if img.get("num_gpus") and "gpu_workers" not in img else ")") + \
            (f" + {img['gpu_workers']} embed worker(s) x {img['num_gpus']:.3g} GPU" if "gpu_workers" in img else "")
        same = {True: ", output identical to fused", False: ", output DIFFERS from fused"}.get(
            p.get("same_output_as_fused"), "")
        lines.append(f"| mmbatch preprocess, {p['shape']} shape, {p['samples']} samples ({p['features']['image']}, "
                     f"{p['features']['audio']}); {workers}: {place}{same} | {p['features']['image'].split()[-1]} | | "
                     f"{p['samples_per_s']:,.1f} samples/s | {_gpu_cells(p['gpu'])} |")
        if p["ingest"]:
            lines.append(f"| mmbatch ingest (manifest of JPEG + FLAC + text), {p['samples']} samples | | | "
                         f"{p['ingest']['samples_per_s']:,.1f} samples/s | n/a | n/a |")
    if sec.get("hf", {}).get("ok") and not sec["hf"].get("skipped"):
        from benchmarks.hf_encoders import render_rows
        lines += render_rows(sec["hf"], _gpu_cells)
    for name, s in sec.items():
        if not s["ok"]:
            lines.append(f"| {name}: FAILED: {s['error']} | | | | | |")
    return "\n".join(lines) + "\n"


def _bench_hf(env: dict, sizes: Sizes, tiny: bool) -> dict:
    from benchmarks.hf_encoders import bench_hf

    return bench_hf(env, sizes, tiny, timed, device_sync)


SECTIONS = ("resnet50", "shape", "logmel", "preprocess", "preprocess_split", "hf")


def run_section(name: str, fn: Callable[[], dict]) -> dict:
    print(f"[{name}]", flush=True)
    t0 = time.perf_counter()
    try:
        res = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
        traceback.print_exc()
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    res["section_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CUDA when torch can use a GPU, else the CPU (cuda without CUDA: CPU with a warning)")
    ap.add_argument("--tiny", action="store_true", help="small sizes: the whole run in under a minute on 2 CPU cores")
    ap.add_argument("--samples", type=int, default=None, help="samples of the preprocess part (default 2000; tiny 8)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--data", default="/tmp/mmbatch-bench-gpu", help="corpus and outputs of the preprocess part")
    args = ap.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    samples = args.samples or sizes.samples
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"--only: unknown section(s) {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")

    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")     # speed does not depend on the weights
    env = environment(args.device)
    print_environment(env)
    res = {"command": "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
           "environment": env, "tiny": args.tiny, "sizes": sizes.__dict__, "sections": {}}
    sections = {"resnet50": lambda: bench_resnet(env, sizes), "shape": lambda: bench_shape(env, sizes),
                "logmel": lambda: bench_logmel(env, sizes),
                "preprocess": lambda: bench_preprocess(env, sizes, samples, Path(args.data)),
                "preprocess_split": lambda: bench_preprocess(env, sizes, samples, Path(args.data), "split"),
                "hf": lambda: _bench_hf(env, sizes, args.tiny)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-tiny" if args.tiny else "gpu"
    for name, fn in sections.items():
        res["sections"][name] = run_section(name, fn) if name in only else {"ok": True, "skipped": True, "runs": []}
        pending = {n: {"ok": False, "error": "not run yet (the run stopped before it)"}
                   for n in sections if n not in res["sections"]}
        partial = {**res, "sections": {**res["sections"], **pending}}
        # written after every section: a run stopped by a time limit keeps what it measured
        (out / f"{stem}.md").write_text(render(partial))
        (out / f"{stem}.json").write_text(json.dumps(partial, indent=2, default=str))
    table = render(res)
    print(table)
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}")
    failed = [n for n, s in res["sections"].items() if not s["ok"]]
    if failed:
        print(f"FAILED sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
