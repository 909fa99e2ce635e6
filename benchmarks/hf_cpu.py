"""CPU speed of ``extractor: hf`` against the multiprocessing.Pool script a user would write with plain
transformers calls, on the same rows and the same model (issue 36, "Speed on CPU").

    python -m benchmarks.hf_cpu --images 512             # the docs/performance.md figure
    python -m benchmarks.hf_cpu --images 32 --tiny       # smoke run

Corpus: ``--images`` ImageNet-like JPEGs (500x375) in canonical Parquet, row groups of 32 (one unit
each). Model: a ViT-Ti/16-sized ``ViTModel`` at 224 px (hidden 192, 12 layers; ``--tiny``: 2 layers) with
random weights, saved with ``save_pretrained`` (the speed does not depend on the weights).

Contenders, each in a fresh Python process (its imports and model loads inside its timed section):

- ``pool``: ``multiprocessing.Pool(cores)`` (spawn), each worker one torch thread, loads
  ``AutoImageProcessor`` (PIL backend) + ``AutoModel``; per row group: read it, PIL decode, processor,
  model forward, pooled output; the parent writes one Parquet file.
- ``mmbatch``: ``run_preprocess`` with ``features.image: {extractor: hf, batch_size: 32}`` on an embedded
  Ray of ``cores`` CPUs started before the timed section (its start-up is reported apart).

Both give the same embeddings (max abs difference reported). Writes hf_cpu.json / hf_cpu.md to --out.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROWS_PER_UNIT = 32


def make_data(root: Path, n: int, tiny: bool) -> tuple[Path, Path]:
    """(canonical folder of n JPEGs, model folder)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import transformers as T
    from PIL import Image

    from mmbatch.schema import CANONICAL, with_metadata

    canon, model = root / "canon", root / "vit"
    if not (canon / "part-00000.parquet").exists():
        rng = np.random.default_rng(0)
        rows = []
        for i in range(n):
            base = cv_blobs(rng)
            buf = io.BytesIO()
            Image.fromarray(base).save(buf, "JPEG", quality=90)
            rows.append({"sample_id": f"s{i:05d}", "source": "manifest", "split": "train", "label": i % 10,
                         "image": {"bytes": buf.getvalue(), "path": f"img/{i}.jpg"}})
        canon.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=with_metadata(CANONICAL)), canon / "part-00000.parquet",
                       row_group_size=ROWS_PER_UNIT)
        (canon / "_manifest.json").write_text("{}")
    if not (model / "config.json").exists():
        torch.manual_seed(0)
        cfg = T.ViTConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768,
                          num_hidden_layers=2 if tiny else 12)
        T.ViTModel(cfg).save_pretrained(str(model))
        T.ViTImageProcessor().save_pretrained(str(model))
    return canon, model


def cv_blobs(rng) -> np.ndarray:
    """A 375x500 RGB picture of smooth colour blobs (JPEG-compressible like a photo)."""
    small = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
    import cv2
    return cv2.resize(small, (500, 375), interpolation=cv2.INTER_CUBIC)


# --- pool ------------------------------------------------------------------------------------------------
_STATE: dict = {}


def _pool_init(model_path: str) -> None:
    import torch
    from transformers import AutoImageProcessor, AutoModel

    torch.set_num_threads(1)
    _STATE["proc"] = AutoImageProcessor.from_pretrained(model_path, local_files_only=True, backend="pil")
    _STATE["model"] = AutoModel.from_pretrained(model_path, local_files_only=True).eval()


def _pool_chunk(job: tuple[str, int]):
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    path, rg = job
    t = pq.ParquetFile(path).read_row_group(rg, columns=["sample_id", "image"])
    images = [Image.open(io.BytesIO(v["bytes"])).convert("RGB") for v in t.column("image").to_pylist()]
    x = _STATE["proc"](images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        emb = _STATE["model"](pixel_values=x).pooler_output.numpy()
    return t.column("sample_id").to_pylist(), emb


def run_pool(canon: Path, model: Path, cores: int, out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = str(canon / "part-00000.parquet")
    jobs = [(f, k) for k in range(pq.ParquetFile(f).num_row_groups)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(cores, initializer=_pool_init, initargs=(str(model),)) as pool:
        parts = pool.map(_pool_chunk, jobs, chunksize=1)
    ids = [i for p in parts for i in p[0]]
    emb = np.concatenate([p[1] for p in parts])
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"sample_id": ids, "image_emb": list(emb)}), out / "pool.parquet")
    return {"seconds": time.perf_counter() - t0}


def run_mmbatch(canon: Path, model: Path, cores: int, out: Path) -> dict:
    from mmbatch.config import workflow_from_dict
    from mmbatch.engine.runtime import init_ray
    from mmbatch.preprocess import run_preprocess

    t0 = time.perf_counter()
    init_ray(None, cores, 0, None)
    ray_s = time.perf_counter() - t0
    wf = workflow_from_dict({"datasets": [{"name": "imgs", "path": str(canon)}],
                             "features": {"image": {"extractor": "hf", "model_path": str(model), "batch_size": 32},
                                          "batch_size": 32},
                             "ray": {"num_cpus": cores}, "output": {"path": str(out / "mmbatch")}})
    t0 = time.perf_counter()
    run_preprocess(wf, progress=False)
    return {"seconds": time.perf_counter() - t0, "ray_start_seconds": ray_s}


def compare(out: Path) -> float:
    import pyarrow.parquet as pq

    a = pq.read_table(out / "pool.parquet").to_pydict()
    b = pq.read_table(out / "mmbatch", columns=["sample_id", "image_emb"]).to_pydict()
    pa_ = dict(zip(a["sample_id"], a["image_emb"]))
    return float(max(np.abs(np.asarray(pa_[s]) - np.asarray(e)).max() for s, e in zip(b["sample_id"], b["image_emb"])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--data", default="/tmp/mmbatch-bench-hf")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--child", choices=("pool", "mmbatch"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = Path(args.data) / f"n{args.images}{'-tiny' if args.tiny else ''}"
    canon, model = make_data(root, args.images, args.tiny)
    if args.child:
        fn = run_pool if args.child == "pool" else run_mmbatch
        print("RESULT", json.dumps(fn(canon, model, args.cores, root / "out")))
        return 0
    res = {"images": args.images, "cores": args.cores, "model": "ViTModel 192x" + ("2" if args.tiny else "12"),
           "command": "python -m benchmarks.hf_cpu " + " ".join(argv if argv is not None else sys.argv[1:])}
    for who in ("pool", "mmbatch"):
        cmd = [sys.executable, "-m", "benchmarks.hf_cpu", "--child", who, *(argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        res[who] = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        res[who]["img_per_s"] = round(args.images / res[who]["seconds"], 1)
    res["speedup_vs_pool"] = round(res["pool"]["seconds"] / res["mmbatch"]["seconds"], 2)
    res["max_abs_diff"] = compare(root / "out")
    md = (f"| contender | seconds | img/s |\n|---|---|---|\n"
          f"| multiprocessing.Pool, plain transformers | {res['pool']['seconds']:.1f} | {res['pool']['img_per_s']} |\n"
          f"| mmbatch preprocess (Ray started before: {res['mmbatch']['ray_start_seconds']:.1f} s) | "
          f"{res['mmbatch']['seconds']:.1f} | {res['mmbatch']['img_per_s']} |\n\n"
          f"{args.images} images, {args.cores} cores, {res['model']}; mmbatch / Pool: {res['speedup_vs_pool']}x; "
          f"max abs difference of the embeddings {res['max_abs_diff']:.2g}. `{res['command']}`\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_cpu.json").write_text(json.dumps(res, indent=2))
    (out / "hf_cpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
