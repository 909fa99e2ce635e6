"""The GPU shape: decode + embed in one actor (fused) against CPU decode -> an embed actor (split).

    python -m benchmarks.gpu_shape                 # the CPU stand-in (about 1.5 min on 2 cores)
    python -m benchmarks.gpu_shape --tiny          # seconds (the test)
    python -m benchmarks.gpu --only shape          # both shapes with ResNet-50 on a lent GPU

Both shapes run on the real local Ray (Ray Data) over generated ImageNet-like JPEGs (500x375, the
generator of benchmarks.gpu) and mmbatch's ``cnn`` extractor (:class:`ResNetExtractor`, seeded
random weights):

- **fused** (today's shape): one actor pool; each actor decodes + resizes and embeds its batch
  (``ResNetExtractor.extract``). Decoded tensors never leave the actor.
- **split** (Ray Data's usual batch-inference shape): decode + resize in CPU ``map_batches`` tasks
  (``decode_image``), then ``ResNetExtractor.encode`` in one embed actor (the GPU's, or on the CPU a
  CPU actor standing in for the GPU) with a large batch. The decoded uint8 tensors, N x H x W x 3,
  go through the object store between the two.

Measured per shape: samples/s over the whole job, and from the first model actor ready (model
built, one warm-up call) to the last result ("steady"); the bytes the embed actor received as
decoded tensors (the sum of its batches' ``nbytes``) against N*H*W*3; the object store's bytes
created during the run and its peak bytes in live objects above the start (the raylet's store
stats, read every 0.05 s: what ``ray memory --stats-only`` prints); the embed actor's utilisation
(its embed seconds / steady seconds, per actor); and whether Ray Data kept decode and embed as
separate operators (``ds.stats()``).

Then a model of a GPU, from costs measured here on one CPU core: decode + resize to 224 px per
image, and ResNet-50 at 224 px per image on the CPU; a GPU taken as 50x and 100x one CPU core at
the embedding. For each: the decode CPUs one GPU needs, and the object-store traffic per second of
each shape. Writes ``gpu_shape.{md,json}`` (``gpu_shape-tiny.*`` with ``--tiny``) to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks.gpu import Periodic, make_jpegs

LOADED = "measured on a shared, loaded 2-core VM"
EMBED_MEMORY = 256 * 2**20        # the split shape's embed actor: a logical reservation, bytes


@dataclass
class Setup:
    images: int                   # distinct generated JPEGs (500x375), each embedded once per shape
    arch: str                     # ResNetExtractor arch
    size: int                     # decode + crop side, px
    batches: tuple[int, ...]      # embed batch sizes (rows per model call), each shape at each
    decode_batch: int             # rows per decode task in the split shape
    fused_actors: int             # actors of the fused pool
    decode_cpus: float            # CPUs per decode task (split)
    device: str = "cpu"           # where the embed runs ("cuda": the embed actor holds a GPU)
    precision: str = "fp32"       # ResNetExtractor precision (bf16 on a GPU)
    model_images: int = 16        # images timed for the per-image costs of the GPU model


CPU = Setup(images=1024, arch="resnet18", size=64, batches=(16, 64, 256), decode_batch=16,
            fused_actors=2, decode_cpus=1.0)
TINY = Setup(images=24, arch="resnet18", size=32, batches=(4, 12), decode_batch=4,
             fused_actors=2, decode_cpus=1.0, model_images=2)


# --- the two shapes ---------------------------------------------------------------------------------
class _ModelActor:
    """Builds the extractor on its device and runs it once; ``ready``: the wall-clock time after."""

    def __init__(self, arch: str, size: int, batch: int, device: str, precision: str):
        from mmbatch.preprocess.features.image import ResNetExtractor

        self.ex = ResNetExtractor(arch=arch, size=size, batch_size=batch, precision=precision).to(_device(device))
        self.ex.encode(np.zeros((1, size, size, 3), np.uint8))      # a first call pays lazy set-up
        if self.ex.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
        self.ready = time.time()


class FusedEmbed(_ModelActor):
    """Today's shape: decode + embed in one actor (``ResNetExtractor.extract``)."""

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        dec = self.ex.decode(list(batch["image"]))
        t1 = time.perf_counter()
        emb = self.ex.encode(dec.values)
        t2 = time.perf_counter()
        return {"id": batch["id"], "embedding": emb, "ready_t": np.full(len(emb), self.ready),
                **_busy(len(emb), decode_s=t1 - t0, embed_s=t2 - t1)}


def decode_batch(batch: dict, size: int) -> dict:
    """The split shape's CPU step: JPEG bytes -> uint8 [n, size, size, 3] (the tensor the object
    store carries to the embed actor)."""
    from mmbatch.preprocess.features.image import decode_image
    from mmbatch.engine.runtime import pin_threads

    pin_threads()
    t0 = time.perf_counter()
    imgs = np.stack([decode_image(b, size) for b in batch["image"]])
    return {"id": batch["id"], "image": imgs, **_busy(len(imgs), decode_s=time.perf_counter() - t0)}


class SplitEmbed(_ModelActor):
    """The split shape's embed actor: decoded uint8 batches -> embeddings (``ResNetExtractor.encode``)."""

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        emb = self.ex.encode(batch["image"])
        out = _busy(len(emb), embed_s=time.perf_counter() - t0)
        out["decode_s"] = batch["decode_s"]
        out["received_bytes"] = np.zeros(len(emb), np.int64)
        out["received_bytes"][0] = batch["image"].nbytes     # what came through the object store
        return {"id": batch["id"], "embedding": emb, "ready_t": np.full(len(emb), self.ready), **out}


def _device(device: str) -> str:
    if device == "cuda":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _busy(n: int, **seconds: float) -> dict:
    """Per-row columns carrying a batch's busy seconds on its first row (summed on the driver),
    and the actor's pid (utilisation per actor)."""
    out = {}
    for k, s in seconds.items():
        col = np.zeros(n, np.float64)
        if n:
            col[0] = s
        out[k] = col
    out["pid"] = np.full(n, os.getpid(), np.int64)
    return out


class StoreSampler(Periodic):
    """The object store during a run, from the raylet's store stats (what ``ray memory --stats-only``
    prints), read every ``interval`` s: ``peak_bytes``, the most bytes held in live primary copies
    (objects still referenced) above what was held at the start; ``created_bytes``, the bytes of
    the objects created during the run (Ray's cumulative counter). Both None where the stats cannot
    be read."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.samples = interval, []
        self.base = self.peak_bytes = self.created_bytes = None

    def _stats(self):
        from ray._private.internal_api import get_memory_info_reply

        return get_memory_info_reply(self._state, timeout_seconds=5).store_stats

    def _sample(self) -> None:
        self.samples.append(int(self._stats().object_store_bytes_primary_copy))

    def __enter__(self) -> "StoreSampler":
        import ray
        from ray._private.internal_api import get_state_from_address

        try:
            self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
            self.base = self._stats()
        except Exception:  # noqa: BLE001 - no stats: the figures stay None
            return self
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        if self.base is None:
            return
        self._halt()
        with contextlib.suppress(Exception):
            end = self._stats()
            self.created_bytes = int(end.cumulative_created_bytes - self.base.cumulative_created_bytes)
        if self.samples:
            self.peak_bytes = max(0, max(self.samples) - int(self.base.object_store_bytes_primary_copy))


def _input(jpegs: list[bytes], blocks: int):
    import ray

    # from_items: no read task (on 2 CPUs a read task waits behind actors holding every CPU)
    return ray.data.from_items([{"id": i, "image": b} for i, b in enumerate(jpegs)],
                               override_num_blocks=max(1, blocks))


def run_shape(jpegs: list[bytes], s: Setup, shape: str, batch: int) -> dict:
    """Run one shape over ``jpegs`` on the current Ray; the figures and the embeddings (by id)."""
    import ray

    gpu = 1.0 if s.device == "cuda" else None
    args = (s.arch, s.size, batch, s.device, s.precision)
    if shape == "fused":
        actors = s.fused_actors
        ds = _input(jpegs, math.ceil(len(jpegs) / batch)).map_batches(
            FusedEmbed, batch_size=batch, fn_constructor_args=args, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1, num_gpus=gpu / actors if gpu else None, batch_format="numpy")
    else:
        actors = 1
        ds = (_input(jpegs, math.ceil(len(jpegs) / s.decode_batch))
              .map_batches(decode_batch, batch_size=s.decode_batch, fn_kwargs={"size": s.size},
                           num_cpus=s.decode_cpus, batch_format="numpy")
              # memory= (a logical reservation for the model) also makes the two operators' remote
              # args differ: with equal ones (the CPU stand-in, no num_gpus) Ray Data fuses the decode
              # into the embed actor, the tensors never reach the object store: the fused shape again
              .map_batches(SplitEmbed, batch_size=batch, fn_constructor_args=args,
                           compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, num_gpus=gpu,
                           memory=EMBED_MEMORY, batch_format="numpy"))
    ds.set_name(f"gpu-shape-{shape}-{batch}")
    ids, embs, decode_s, embed_s, received, busy, ready = [], [], 0.0, 0.0, 0, {}, []
    with StoreSampler() as store:
        t0 = time.perf_counter()
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ids.append(b["id"])
            ready.append(float(b["ready_t"].min()))
            embs.append(b["embedding"])
            decode_s += float(b["decode_s"].sum())
            embed_s += float(b["embed_s"].sum())
            received += int(b.get("received_bytes", np.zeros(1, np.int64)).sum())
            for pid, sec in zip(b["pid"], b["embed_s"] + (b["decode_s"] if shape == "fused" else 0)):
                busy[int(pid)] = busy.get(int(pid), 0.0) + float(sec)
        wall = time.perf_counter() - t0
        # from the first model actor ready (built, one warm-up call) to the last result
        steady = time.time() - min(ready)
    stats = ds.stats()
    order = np.argsort(np.concatenate(ids))
    emb = np.concatenate(embs)[order]
    n = len(order)
    tensor_bytes = n * s.size * s.size * 3
    return {
        "shape": shape, "batch": batch, "actors": actors, "images": n, "seconds": round(wall, 3),
        "samples_per_s": round(n / wall, 1), "steady_seconds": round(steady, 3),
        "steady_samples_per_s": round(n / steady, 1),
        "decode_ms_per_image": round(1000 * decode_s / n, 3), "embed_ms_per_image": round(1000 * embed_s / n, 3),
        # the object store carries the decoded tensors only in the split shape
        "decoded_bytes_through_store": received if shape == "split" else 0,
        "decoded_bytes_expected": tensor_bytes if shape == "split" else 0,
        "bytes_per_embed_batch": batch * s.size * s.size * 3 if shape == "split" else 0,
        "store_peak_bytes": store.peak_bytes, "store_created_bytes": store.created_bytes,
        # the "GPU" actor's utilisation: its embed seconds / wall (fused: every actor holds a GPU share)
        "embed_actor_util": round(embed_s / (steady * actors), 3),
        "actor_busy_util": round(sum(busy.values()) / (steady * max(1, len(busy))), 3),
        "operators_separate": "MapBatches(decode_batch)" in stats and "MapBatches(SplitEmbed)" in stats
        and "MapBatches(decode_batch)->MapBatches(SplitEmbed)" not in stats,
        "ids": np.sort(np.concatenate(ids)).tolist() == list(range(n)),
        "_embeddings": emb,
    }


# --- per-image costs on one core, and the GPU model ------------------------------------------------------
def unit_costs(jpegs: list[bytes], s: Setup) -> dict:
    """Decode + resize to 224 px, and ResNet-50 at 224 px, per image on one CPU core (this process,
    one thread: ``pin_threads``)."""
    import torch

    from mmbatch.preprocess.features.image import ResNetExtractor, decode_image
    from mmbatch.engine.runtime import pin_threads

    pin_threads()
    k = max(2, s.model_images)
    sample = [jpegs[i % len(jpegs)] for i in range(4 * k)]
    decode_image(sample[0], 224)
    t0 = time.perf_counter()
    imgs = [decode_image(b, 224) for b in sample]
    decode224 = (time.perf_counter() - t0) / len(sample)
    t0 = time.perf_counter()
    for b in sample:
        decode_image(b, s.size)
    decode_small = (time.perf_counter() - t0) / len(sample)
    ex = ResNetExtractor(arch="resnet50", size=224, batch_size=8)
    ex.encode(imgs[:2])
    t0 = time.perf_counter()
    ex.encode(imgs[:k])
    embed50 = (time.perf_counter() - t0) / k
    return {"threads": torch.get_num_threads(), "decode_224_ms": round(1000 * decode224, 3),
            f"decode_{s.size}_ms": round(1000 * decode_small, 3), "resnet50_224_cpu_ms": round(1000 * embed50, 2),
            "resnet50_images_timed": k}


def gpu_model(costs: dict, factors=(50, 100), cpus_per_gpu=(2, 4, 8)) -> list[dict]:
    """What one GPU changes, for a GPU ``factor`` x one CPU core at ResNet-50 embedding."""
    d = costs["decode_224_ms"] / 1000
    e = costs["resnet50_224_cpu_ms"] / 1000
    tensor = 224 * 224 * 3
    rows = []
    for f in factors:
        g = f / e                                     # images/s one GPU embeds
        need = g * d                                  # decode CPUs to keep it busy
        rows.append({
            "gpu_x_cpu_core": f, "gpu_img_per_s": round(g), "decode_cpus_per_gpu": round(need, 2),
            "split_store_mb_per_s": round(g * tensor / 1e6, 1), "fused_store_mb_per_s": 0.0,
            "split_batch_256_mb": round(256 * tensor / 1e6, 1),
            # fused on a node with c CPUs per GPU: c actors each decode then embed on a GPU share;
            # the GPU runs at most c / (d * g) of the time (decode-bound) or 1
            "fused_gpu_util_by_cpus_per_gpu": {c: round(min(1.0, c / need), 2) for c in cpus_per_gpu},
        })
    return rows


# --- the whole run -------------------------------------------------------------------------------------
def measure(s: Setup, jpegs: Optional[list[bytes]] = None, around=contextlib.nullcontext) -> dict:
    """Both shapes on the current Ray, each at each of ``s.batches``. ``around()``: a context
    manager entered around each run (benchmarks.gpu's GPU sampler); its ``result`` is the run's "gpu"."""
    jpegs = jpegs or make_jpegs(min(s.images, 256))
    jpegs = [jpegs[i % len(jpegs)] for i in range(s.images)]
    runs = []
    for shape in ("fused", "split"):
        for b in s.batches:
            with around() as ctx:
                r = run_shape(jpegs, s, shape, b)
            runs.append({**r, "gpu": getattr(ctx, "result", None)})
    ref = runs[0]["_embeddings"]
    for r in runs:
        e = r.pop("_embeddings")
        r["max_abs_diff_vs_fused"] = float(np.max(np.abs(e - ref))) if len(e) == len(ref) else None
    return {"setup": asdict(s), "jpeg_kb_mean": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1), "runs": runs}


def render(res: dict) -> str:
    s = res["setup"]
    lines = [f"# The GPU shape: fused against split ({res['label']})", "",
             f"Command: `{res['command']}`. Ray {res['ray']}, torch {res['torch']}, {res['cores']} cores. "
             f"{s['images']} generated JPEGs (500x375, ~{res['jpeg_kb_mean']} KB) -> {s['size']} px -> "
             f"{s['arch']} (seeded random weights) on **{s['device']}**"
             + (": the embed actor is a CPU actor standing in for the GPU." if s["device"] == "cpu" else "."), "",
             "| shape | embed batch | actors holding the model | samples/s (job / steady) | decoded bytes "
             "through the object store (expected N*H*W*3) | bytes per embed batch | object store: created during "
             "the run / peak live | embed actor utilisation (embed s / steady s) | decode ms/img | embed ms/img | "
             "max abs diff vs fused |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        peak = " / ".join(f"{r[k] / 1e6:.1f} MB" if r[k] is not None else "n/a"
                          for k in ("store_created_bytes", "store_peak_bytes"))
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['actors']} | {r['samples_per_s']:,.1f} / "
            f"{r['steady_samples_per_s']:,.1f} | "
            f"{r['decoded_bytes_through_store'] / 1e6:.2f} MB ({r['decoded_bytes_expected'] / 1e6:.2f} MB) | "
            f"{r['bytes_per_embed_batch'] / 1e6:.2f} MB | {peak} | {r['embed_actor_util']:.2f} | "
            f"{r['decode_ms_per_image']:.2f} | {r['embed_ms_per_image']:.2f} | {r['max_abs_diff_vs_fused']:.2g} |")
    c = res["costs"]
    lines += ["", f"Per image on one CPU core (one thread): decode + resize to 224 px {c['decode_224_ms']:.2f} ms; "
              f"to {s['size']} px {c['decode_%d_ms' % s['size']]:.2f} ms; ResNet-50 at 224 px (fp32, batch 8) "
              f"{c['resnet50_224_cpu_ms']:.1f} ms.", "",
              "What a GPU changes (ResNet-50, 224 px; the GPU taken as N x one CPU core at embedding):", "",
              "| GPU = N x a CPU core | GPU img/s | decode CPUs one GPU needs | object store, split | object store, "
              "fused | one 256-image batch | fused: GPU busy at most, with 2 / 4 / 8 CPUs per GPU |",
              "|---|---|---|---|---|---|---|"]
    for m in res["gpu_model"]:
        util = " / ".join(f"{u:.0%}" for u in m["fused_gpu_util_by_cpus_per_gpu"].values())
        lines.append(f"| {m['gpu_x_cpu_core']}x | {m['gpu_img_per_s']:,} | {m['decode_cpus_per_gpu']:.1f} | "
                     f"{m['split_store_mb_per_s']:,.0f} MB/s | 0 | {m['split_batch_256_mb']:.1f} MB | {util} |")
    return "\n".join(lines) + "\n"


def run_all(s: Setup, label: str, command: str) -> dict:
    import ray
    import torch

    jpegs = make_jpegs(min(s.images, 256))
    res = measure(s, jpegs)
    res["costs"] = unit_costs(jpegs, s)
    res["gpu_model"] = gpu_model(res["costs"])
    res.update(label=label, command=command, ray=ray.__version__, torch=torch.__version__, cores=os.cpu_count())
    return res


def main(argv: Optional[list[str]] = None) -> int:
    import warnings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a few images at 32 px: seconds (the test)")
    ap.add_argument("--images", type=int, default=None, help=f"JPEGs per shape (default {CPU.images})")
    ap.add_argument("--label", default=LOADED, help="where the figures were taken (in the table's title)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    s = TINY if args.tiny else CPU
    if args.images:
        s = Setup(**{**asdict(s), "images": args.images})
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")     # speed does not depend on the weights
    from mmbatch.engine.runtime import init_ray

    init_ray(num_cpus=os.cpu_count())        # a no-op where Ray is already up
    command = "python -m benchmarks.gpu_shape " + " ".join(argv if argv is not None else sys.argv[1:])
    res = run_all(s, args.label, command.strip())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_shape-tiny" if args.tiny else "gpu_shape"
    (out / f"{stem}.md").write_text(render(res))
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    print(render(res))
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
