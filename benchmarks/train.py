"""Training benchmark: Ray Train (1 and 2 workers) vs a plain single-process torch loop.

    python -m benchmarks.train                         # the README table (12k rows, 3 x 64 dims, 4 classes)
    python -m benchmarks.train --rows 3000 --epochs 4  # smoke run
    python -m benchmarks.train --e2e --rows 3000 --epochs 4   # the end-to-end model (docs/e2e-model.md)

Every contender trains the same model (mmbatch.train.models, ``train.model`` /
``hidden`` / ``dropout``), optimizer, LR schedule, modality dropout and global batch
size on the same synthetic fused-feature Parquet (the schema `mmbatch preprocess`
writes), and scores the whole validation split after every epoch:

- plain loop: one process, one torch thread (what a Ray Train CPU worker gets), the
  train split in memory, a fresh permutation per epoch (``loop.in_memory_batches``);
- torch DDP without Ray (reference): the same loop in 2 spawned processes over gloo,
  each taking half of every global batch -- what data parallelism itself costs here;
- mmbatch: ``mmbatch.train.run.train_one`` (Ray Train V2 TorchTrainer, the same
  path as `mmbatch train`) with 1 and 2 workers at ``--cpus-per-worker`` CPUs each.

Epoch seconds = median over the epochs after the first of the wall time from the
start of one epoch to the start of the next (for Ray Train: training pass,
validation, checkpoint write and ``ray.train.report``), taken from the loop's
``started_at`` metric. Start-up = from the call to the start of the first epoch
(Ray Train: controller, worker processes, process group, data set-up), reported
separately. Writes train.json and train.md to --out.

With ``--e2e`` the data is the AV-shaped task of ``benchmarks.e2e_task`` as sequence features
(pixels, log-mel frames, token ids: the columns `mmbatch preprocess` writes for them) and every
contender trains the end-to-end model (``train.encoders``: image cnn, audio lstm, text lstm,
early fusion); results go to train-e2e.json and train-e2e.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.run import Steal  # noqa: E402
from mmbatch import schema  # noqa: E402

SPLITS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))


# --- data ---------------------------------------------------------------------------------------
def make_fused(path: Path, rows: int, dim: int, classes: int, seed: int = 0, files: int = 4) -> str:
    """``rows`` fused rows (image/audio/text embeddings of ``dim``, ``classes`` labels) as Parquet.

    Each modality holds a noisy class centroid, so every modality is informative but
    none alone is clean; 5 % of rows miss one modality (null embedding, has_<m> false).
    Reused when ``path`` already holds the same parameters.
    """
    params = {"rows": rows, "dim": dim, "classes": classes, "seed": seed, "files": files, "noise": 6.0}
    marker = path / "_bench.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return str(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    mods = list(schema.MODALITIES)
    dims = {m: dim for m in mods}
    label = rng.integers(0, classes, rows)
    present = np.ones((rows, len(mods)), bool)
    drop = rng.random(rows) < 0.05
    present[drop, rng.integers(0, len(mods), rows)[drop]] = False
    cols = {
        "sample_id": pa.array([f"b{i:07d}" for i in range(rows)]),
        "source": pa.array(["bench"] * rows),
        "split": pa.array(rng.choice([s for s, _ in SPLITS], rows, p=[p for _, p in SPLITS]).tolist()),
        "label": pa.array(label, pa.int64()),
        "label_name": pa.array([f"class{k}" for k in label]),
    }
    embs = {}
    for j, m in enumerate(mods):
        centroids = rng.normal(size=(classes, dim)).astype(np.float32)
        e = centroids[label] + 6.0 * rng.normal(size=(rows, dim)).astype(np.float32)
        embs[m] = np.where(present[:, [j]], e, 0).astype(np.float32)
        flat = pa.array(embs[m].reshape(-1))
        cols[schema.emb_column(m)] = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~present[:, j]))
    for j, m in enumerate(mods):
        cols[schema.has_column(m)] = pa.array(present[:, j])
    fused = np.concatenate([embs[m] for m in mods], 1)
    cols["fused"] = pa.FixedSizeListArray.from_arrays(pa.array(fused.reshape(-1)), fused.shape[1])
    meta = {"kind": "fused", "dims": dims, "fusion": {"method": "concat", "dim": int(fused.shape[1])},
            "features": {m: {"name": "synthetic", "version": "1", "dim": dim, "params": {}} for m in mods}}
    sch = schema.with_metadata(schema.fused_schema(dims, int(fused.shape[1])), meta)
    table = pa.table(cols, schema=sch)
    per = -(-rows // files)
    for k in range(files):
        pq.write_table(table.slice(k * per, per), path / f"part-{k:05d}.parquet")
    marker.write_text(json.dumps(params))
    return str(path)


def make_e2e_fused(path: Path, rows: int, seed: int = 0, files: int = 4) -> str:
    """``rows`` samples of the end-to-end benchmark's task as sequence-feature Parquet (80/10/10 split),
    extracted in this process with the extractors preprocess uses. Reused when ``path`` holds the same."""
    params = {"rows": rows, "seed": seed, "files": files, "kind": "e2e", "audio": "spoken words"}  # task version
    marker = path / "_bench.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return str(path)
    from benchmarks.e2e import extract
    from benchmarks.e2e_task import generate, sequence_features
    from mmbatch.config import AudioFeatures, ImageFeatures, TextFeatures
    from mmbatch.preprocess.features.sequence import build_vocabulary

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    n_train, n_val = int(rows * 0.8), int(rows * 0.1)
    items = generate((n_train, n_val, rows - n_train - n_val), seed)
    f = sequence_features()
    f["text"]["vocabulary"] = build_vocabulary([t for t, sp in zip(items["text"], items["splits"]) if sp == "train"])
    table, dims, feats = extract(items, {"image": ImageFeatures(**f["image"]), "audio": AudioFeatures(**f["audio"]),
                                         "text": TextFeatures(**f["text"])})
    table = table.replace_schema_metadata(
        schema.with_metadata(table.schema, {"kind": "fused", "dims": dims, "features": feats}, hf=False).metadata)
    per = -(-rows // files)
    for k in range(files):
        pq.write_table(table.slice(k * per, per), path / f"part-{k:05d}.parquet")
    marker.write_text(json.dumps(params))
    return str(path)


def workflow(data: str, out: Path, name: str, args, workers: int):
    from mmbatch.config import Workflow

    encoders = {"image": "cnn", "audio": "lstm", "text": "lstm"} if getattr(args, "e2e", False) else {}
    return Workflow.model_validate({"train": {
        "data": data, "out": str(out), "name": name, "epochs": args.epochs, "hidden": args.hidden,
        "batch_size": args.batch_size, "model": args.model, "num_workers": workers, "use_gpu": False,
        "cpus_per_worker": args.cpus_per_worker, "seed": 0, "encoders": encoders}})


def steady(starts: list[float]) -> list[float]:
    """Epoch periods (start to next start), the first epoch left out."""
    return [b - a for a, b in zip(starts[1:], starts[2:])]


# --- contenders ----------------------------------------------------------------------------------
def plain_loop(data_uri: str, args, rank: int = 0, world: int = 1, port: int = 0) -> dict:
    """The plain torch loop: one process (``world`` 1), or rank ``rank`` of a torch DDP group
    over gloo without Ray (the reference for what DDP alone costs per step)."""
    import torch

    from mmbatch.engine.runtime import pin_threads
    from mmbatch.train.data import FusedData
    from mmbatch.train.evaluate import evaluate_arrays
    from mmbatch.train.loop import in_memory_batches, make_optimizer, make_scheduler, seed_everything
    from mmbatch.train.models import build_model, drop_modalities
    from mmbatch.train.run import model_spec

    pin_threads()
    t_call = time.time()
    wf = workflow(data_uri, Path("unused"), "plain", args, world)
    cfg = wf.train.model_dump(mode="json")
    data = FusedData.open(data_uri, seed=cfg["seed"])
    mods = list(data.dims)
    spec = model_spec(wf, data, mods, "plain")
    class_names = [c["name"] for c in spec["classes"]]
    train, val = data.arrays("train", mods), data.arrays("validation", mods)
    seed_everything(cfg["seed"])
    model = raw = build_model(spec)
    raw.fit_input_stats(train)                   # as loop.fit_in_memory does (the driver, under Ray Train)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(raw)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    batch_size = max(1, cfg["batch_size"] // world)
    starts, history = [], []
    phases = {"forward": [], "backward": [], "optimizer": []}     # ms per step, epochs after the first
    for epoch in range(cfg["epochs"]):
        starts.append(time.time())
        model.train()
        gen = torch.Generator().manual_seed(cfg["seed"] * 100003 + epoch * 1009 + rank)
        loss_sum, n = torch.zeros((), dtype=torch.float64), 0
        for batch in in_memory_batches(train, batch_size, cfg["seed"], epoch, rank, world):
            y = batch.pop("y")
            mask = drop_modalities(raw.presence(batch), cfg["modality_dropout"], gen)
            t0 = time.perf_counter()
            loss = raw.loss(model(batch, mask, with_aux=True), y)     # as loop.train_epoch does
            optimizer.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            loss.backward()                    # under DDP: + waiting for the gradient all-reduce
            t2 = time.perf_counter()
            optimizer.step()
            if epoch:
                for k, a, b in (("forward", t0, t1), ("backward", t1, t2), ("optimizer", t2, time.perf_counter())):
                    phases[k].append(1e3 * (b - a))
            loss_sum += loss.detach() * len(y)
            n += len(y)
        scheduler.step()
        vm = evaluate_arrays(raw, val, class_names)
        history.append({"epoch": epoch, "train_loss": float(loss_sum) / n, "val_accuracy": vm["accuracy"]})
    res = {"startup_s": starts[0] - t_call, "epoch_s": steady(starts), "train_rows": n * world,
           "steps_per_epoch": -(-n // batch_size), "rows_per_step": batch_size,
           "step_ms": {k: round(statistics.median(v), 3) for k, v in phases.items()},
           "val_accuracy": history[-1]["val_accuracy"], "history": history}
    if world > 1:
        res["allreduce_ms"] = allreduce_ms(raw)
        torch.distributed.destroy_process_group()
    return res


def allreduce_ms(model, calls: int = 200) -> float:
    """Median time of one gloo all-reduce of a buffer the size of ``model``'s gradients: the
    synchronisation every DDP step waits for (all ranks must call this together)."""
    import torch

    flat = torch.zeros(sum(p.numel() for p in model.parameters()))
    times = []
    for _ in range(calls + 20):
        t0 = time.perf_counter()
        torch.distributed.all_reduce(flat)
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times[20:]), 3)


def _ddp_rank(rank, data_uri, args, world, port, queue):
    res = plain_loop(data_uri, args, rank, world, port)
    if rank == 0:
        queue.put(res)


def run_ddp(data_uri: str, args, world: int) -> dict:
    """``world`` spawned processes running :func:`plain_loop` under torch DDP (no Ray)."""
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, data_uri, args, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    res = queue.get()
    for p in procs:
        p.join()
    return res


def run_ray(data_uri: str, args, workers: int, out: Path) -> dict:
    from mmbatch.train.data import FusedData
    from mmbatch.train.run import train_one

    name = f"bench-{workers}w"
    shutil.rmtree(out / name, ignore_errors=True)
    t_call = time.time()
    wf = workflow(data_uri, out, name, args, workers)
    data = FusedData.open(data_uri, seed=wf.train.seed)
    res = train_one(wf, data, list(data.dims), name)
    hist = res.history
    starts = [h["started_at"] for h in hist]
    return {"startup_s": starts[0] - t_call, "epoch_s": steady(starts),
            "loop_epoch_time_s": [h["epoch_time_s"] for h in hist[1:]],
            "loop_train_time_s": [h["train_time_s"] for h in hist[1:]],
            "train_rows": hist[-1]["train_rows"], "val_accuracy": hist[-1]["val_accuracy"],
            "total_s": time.time() - t_call,
            "history": [{k: h[k] for k in ("epoch", "train_loss", "val_accuracy", "epoch_time_s", "train_time_s", "started_at")}
                        for h in hist]}


# --- main ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--dim", type=int, default=64, help="embedding size of each of the 3 modalities")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=8, help="epochs per contender (the first is not timed)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (train.batch_size)")
    ap.add_argument("--model", default="early")
    ap.add_argument("--cpus-per-worker", type=float, default=0.5)
    ap.add_argument("--only", default="plain,ddp2,ray1,ray2", help="contenders to run (comma-separated)")
    ap.add_argument("--data", default="/tmp/mmbatch-bench-train")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--e2e", action="store_true", help="the end-to-end model on sequence features (--dim, "
                    "--classes unused)")
    args = ap.parse_args()
    if args.epochs < 3:
        ap.error("--epochs must be at least 3 (the first epoch is not timed)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.data)
    only = set(args.only.split(","))

    t0 = time.perf_counter()
    if args.e2e:
        data_uri = make_e2e_fused(work / f"e2e-{args.rows}", args.rows)
        print(f"data: {args.rows} rows of sequence features in {time.perf_counter() - t0:.1f} s")
    else:
        data_uri = make_fused(work / f"fused-{args.rows}x{args.dim}x{args.classes}", args.rows, args.dim,
                              args.classes)
        print(f"data: {args.rows} rows, 3 x {args.dim} dims, {args.classes} classes in {time.perf_counter() - t0:.1f} s")
    cores = os.cpu_count() or 1
    results = {"machine": {"cores": cores, "cpu": platform.processor() or platform.machine(),
                           "python": platform.python_version(), "load_avg_1m_before": round(os.getloadavg()[0], 2)},
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data", "only")}, "runs": {}}

    if "plain" in only:
        with Steal() as st:
            r = plain_loop(data_uri, args)
        results["runs"]["plain torch loop (1 process)"] = {**r, "steal_pct": st.pct}
        print("plain:", _brief(r))
    if "ddp2" in only:
        with Steal() as st:
            r = run_ddp(data_uri, args, 2)
        results["runs"]["torch DDP without Ray (2 processes, reference)"] = {**r, "steal_pct": st.pct}
        print("ddp 2 processes:", _brief(r))
    if only & {"ray1", "ray2"}:
        from mmbatch.engine.runtime import init_ray
        t0 = time.perf_counter()
        init_ray(num_cpus=cores)
        results["ray_startup_s"] = round(time.perf_counter() - t0, 2)
        for w in (1, 2):
            if f"ray{w}" in only:
                key = f"mmbatch Ray Train, {w} worker{'s' if w > 1 else ''} x {args.cpus_per_worker} CPU"
                with Steal() as st:
                    r = run_ray(data_uri, args, w, work / "runs")
                results["runs"][key] = {**r, "steal_pct": st.pct}
                print(f"ray {w}w:", _brief(r))
    results["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    write_results(results, out, "train-e2e" if args.e2e else "train")


def _brief(r: dict) -> dict:
    return {"startup_s": round(r["startup_s"], 2), "epoch_s_median": round(statistics.median(r["epoch_s"]), 3),
            "val_accuracy": round(r["val_accuracy"], 3)}


def write_results(results: dict, out: Path, stem: str = "train") -> None:
    runs = results["runs"]
    for r in runs.values():
        r["epoch_s_median"] = round(statistics.median(r["epoch_s"]), 3)
        r["epoch_s_range"] = [round(min(r["epoch_s"]), 3), round(max(r["epoch_s"]), 3)]
        r["startup_s"] = round(r["startup_s"], 2)
    base = next((r["epoch_s_median"] for k, r in runs.items() if k.startswith("plain")), None)
    for r in runs.values():
        r["ratio_to_plain"] = round(r["epoch_s_median"] / base, 2) if base else None
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    s = results["settings"]
    m = results["machine"]
    what = (f"{s['rows']} rows of the end-to-end task (sequence features, CNN + 2 LSTM encoders, 10 classes, "
            "80 % train)" if s.get("e2e") else
            f"{s['rows']} fused rows (3 x {s['dim']} dims, {s['classes']} classes, 80 % train)")
    lines = [f"Machine: {m['cores']} cores (load average {m['load_avg_1m_before']} before, "
             f"{m['load_avg_1m_after']} after), Python {m['python']}, CPU only. "
             f"{what}, "
             f"`{s['model']}` fusion, hidden {s['hidden']}, global batch {s['batch_size']}, {s['epochs']} epochs. "
             f"Epoch = training pass + validation (+ checkpoint and report for Ray Train), median over epochs "
             f"2..{s['epochs'] - 1}. Ray start-up {results.get('ray_startup_s', '-')} s (not included below).", "",
             "| contender | epoch s (median) | epoch s (min-max) | ratio to plain loop | start-up s | final val accuracy "
             "| CPU steal % |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lo, hi = r["epoch_s_range"]
        lines.append(f"| {name} | {r['epoch_s_median']} | {lo}-{hi} | {r['ratio_to_plain'] or '-'} | "
                     f"{r['startup_s']} | {r['val_accuracy']:.3f} | {r.get('steal_pct', '-')} |")
    steps = [(name, r) for name, r in runs.items() if "step_ms" in r]
    if steps:
        lines += ["", "Per optimizer step (median ms; DDP's backward includes waiting for the gradient all-reduce):", "",
                  "| contender | rows per step | forward | backward | optimizer | step | steps per epoch |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in steps:
            ms = r["step_ms"]
            lines.append(f"| {name} | {r['rows_per_step']} | "
                         f"{ms['forward']} | {ms['backward']} | {ms['optimizer']} | {sum(ms.values()):.2f} | "
                         f"{r['steps_per_epoch']} |")
    for name, r in runs.items():
        if "allreduce_ms" in r:
            lines += ["", f"{name}: one gloo all-reduce of the model's gradients, timed alone after training, takes "
                          f"{r['allreduce_ms']} ms (median of 200)."]
    lines += ["", "Measured on a shared, loaded 2-core VM (other engineers' jobs running)."] if s.get("e2e") else []
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
