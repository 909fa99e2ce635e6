"""The training loop each Ray Train worker runs, top to bottom.

Ray Train adds only the wrapping: ``prepare_model`` (DDP when there is more
than one worker), ``get_dataset_shard`` (this worker's stream of a large train
split) and ``report`` (metrics + a checkpoint every epoch). Everything else is
a plain PyTorch loop.

- Train data: a small train split (see ``run._train_input``) arrives as NumPy
  arrays in the object store; each epoch every rank takes its share of a fresh
  permutation (:func:`in_memory_batches`), with no per-step Ray Data work. A
  large split is streamed from Parquet by Ray Data, shuffled locally.
- Timing: each epoch's metrics carry ``train_time_s`` (training pass),
  ``epoch_time_s`` (+ validation) and ``started_at`` (wall clock, seconds).
- Resume: ``ray.train.get_checkpoint()`` returns the latest checkpoint after a
  worker failure (FailureConfig.max_failures) and when a run with the same name
  and storage path is started again. The loop restarts at the epoch after it.
- Validation, after each epoch: a small split (see ``run._validation_input``)
  arrives as NumPy arrays in the object store and every rank scores it whole
  (the replicas are identical under DDP, so every rank computes the same
  metrics). A larger one is a Ray Dataset that rank 0 streams and scores
  (``evaluate_batches``: memory bounded, not by the split) and broadcasts.
  Rank 0's early-stopping decision is broadcast either way, so all ranks
  always stop together.
- Inputs: the model standardises each feature with the train split's mean/std, computed
  once on the driver (``config["input_stats"]``, streamed for a large split) and saved with
  the weights.
- The epoch pass (:func:`train_epoch`) is shared with :func:`fit_in_memory`, the same loop
  in one process without Ray (the fusion benchmark and the model tests use it).
- ``batch_size`` is the global batch: each of N workers takes batch_size / N.
- Each epoch starts with :func:`epoch_batches` (this rank's batches of the epoch),
  a module-level function called by name, after the previous epoch's report: the
  place to wrap to observe or act at the start of every epoch of every worker.
- Ray Train V2 registers a reported checkpoint when its controller next polls
  the workers (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, set to 0.5 s by
  run.py); reports are handed over in the background, so the next epoch does
  not wait for that poll. A crash before a checkpoint is registered resumes
  from the checkpoint before it.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tempfile
import time
from typing import Any, Mapping, Optional

import numpy as np
import torch

from mmbatch.engine.runtime import pin_threads, quiet_worker_logs
from mmbatch.engine.storage import fingerprint
from mmbatch.train.evaluate import evaluate_arrays, evaluate_batches
from mmbatch.train.models import build_model, drop_modalities, warm_start_state

STATE_FILE = "state.pt"       # everything needed to resume (torch.load(weights_only=True))
META_FILE = "meta.json"       # the same facts, readable without torch
SHUFFLE_BUFFER = 2048
VALIDATION_BATCH = 4096       # rows per Ray Data batch of a streamed validation split


def make_optimizer(model: torch.nn.Module, cfg: Mapping) -> torch.optim.Optimizer:
    """The optimizer of ``cfg``, as its fused implementation where this torch has one for the
    device: the same update in one kernel per step instead of a Python loop over the
    parameters (for the small fusion models, ~1/4 of a CPU training step)."""
    if cfg["optimizer"] == "sgd":
        cls, kw = torch.optim.SGD, {"momentum": 0.9}
    else:
        cls, kw = (torch.optim.Adam if cfg["optimizer"] == "adam" else torch.optim.AdamW), {}
    kw.update(lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    try:
        return cls(model.parameters(), fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):      # no fused kernel for this device / torch version
        return cls(model.parameters(), **kw)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping):
    if cfg["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"])
    if cfg["schedule"] == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg["epochs"] // 3), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def improves(score: float, loss: float, best_score: Optional[float], best_loss: Optional[float]) -> bool:
    """A better validation score, or the same score at a lower validation loss (on a small validation
    split accuracy ties across epochs, and the first epoch is the least trained)."""
    if best_score is None or score > best_score:
        return True
    return score == best_score and best_loss is not None and loss < best_loss


def score_of(metrics: Mapping, metric: str) -> float:
    """Higher is better: accuracy / macro_f1 as they are, loss negated."""
    return -float(metrics["loss"]) if metric == "loss" else float(metrics[metric])


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _broadcast_flag(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def in_memory_batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int, epoch: int,
                      rank: int, world: int, device="cpu"):
    """This rank's batches of one epoch over a split held in memory (dicts of tensors, like
    ``iter_torch_batches``). Every rank draws the same permutation of the whole split (a new
    one each epoch) and takes every ``world``-th row of it from ``rank`` on; the last
    ``n % world`` rows of the permutation are left out, so all ranks run the same number of
    steps (DDP), as Ray Data's equal split does."""
    n = len(arrays["y"])
    mine = np.random.default_rng([seed % 2 ** 32, epoch]).permutation(n)[rank:n - n % world:world]
    for s in range(0, len(mine), batch_size):
        idx = mine[s:s + batch_size]
        yield {k: torch.from_numpy(v[idx]).to(device) for k, v in arrays.items()}


def epoch_batches(train_arrays, train_shard, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  device="cpu"):
    """This rank's batches of epoch ``epoch`` in a Ray Train worker: from the train split held in
    memory (``train_arrays``, see :func:`in_memory_batches`) or, when there is none, streamed from
    this worker's Ray Data shard (``train_shard``) with a local shuffle. Called once at the start of
    every epoch, after the previous epoch's report."""
    if train_arrays is not None:
        return in_memory_batches(train_arrays, batch_size, seed, epoch, rank, world, device)
    return train_shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                          local_shuffle_seed=seed + epoch * 7919 + rank)


def train_epoch(model: torch.nn.Module, raw_model, batches, optimizer: torch.optim.Optimizer,
                modality_dropout: float, generator: torch.Generator, device="cpu") -> tuple[torch.Tensor, int]:
    """One pass over ``batches``: (sum of the batch losses times their rows, rows). ``model`` is
    what runs forward (the DDP wrapper under Ray Train), ``raw_model`` the FusionModel itself."""
    loss_sum, n_rows = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in batches:
        y = batch.pop("y")
        mask = drop_modalities(raw_model.presence(batch), modality_dropout, generator)
        loss = raw_model.loss(model(batch, mask, with_aux=True), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)       # no per-step .item(): it would wait for the device
        n_rows += len(y)
    return loss_sum, n_rows


def fit_in_memory(spec: Mapping, train: Mapping[str, np.ndarray], validation: Mapping[str, np.ndarray],
                  cfg: Mapping) -> tuple[torch.nn.Module, list[dict]]:
    """The training loop of `mmbatch train` in this process, without Ray: one worker, the train
    split in memory, the same model, optimizer, schedule, modality dropout, epoch pass and
    model selection (best validation ``cfg["metric"]``, early stopping). Returns the model at
    its best epoch (eval mode) and one record per epoch. Used by the fusion benchmark and tests."""
    class_names = [c["name"] for c in spec["classes"]]
    seed_everything(cfg["seed"])
    model = build_model(spec)
    model.fit_input_stats(train)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    best, best_score, best_loss, bad, history = None, None, None, 0, []
    for epoch in range(cfg["epochs"]):
        model.train()
        gen = torch.Generator().manual_seed(cfg["seed"] * 100003 + epoch * 1009)
        batches = in_memory_batches(train, cfg["batch_size"], cfg["seed"], epoch, 0, 1)
        loss_sum, n_rows = train_epoch(model, model, batches, optimizer, cfg["modality_dropout"], gen)
        scheduler.step()
        vm = evaluate_arrays(model, validation, class_names)
        score = score_of(vm, cfg["metric"])
        history.append({"epoch": epoch, "train_loss": float(loss_sum) / max(n_rows, 1), "val_loss": vm["loss"],
                        "val_accuracy": vm["accuracy"], "val_macro_f1": vm["macro_f1"], "val_score": score})
        if improves(score, vm["loss"], best_score, best_loss):
            best_score, best_loss, bad = score, vm["loss"], 0
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if cfg.get("early_stopping_patience") and bad >= cfg["early_stopping_patience"]:
                break
    model.load_state_dict(best)
    return model.eval(), history


STAGING_PREFIX = "mmbatch-ckpt-"       # + the run's key + a random part (tempfile.mkdtemp)
STAGING_MARKER = ".mmbatch-staging"    # inside each staging folder: the run's key


def _staging_key(config: Mapping) -> str:
    return fingerprint([config.get("fingerprint"), config["train"].get("out"), config["train"].get("name")])


def make_staging_dir(config: Mapping) -> str:
    """A new private folder (``tempfile.mkdtemp``: mode 0700, an unpredictable name) where rank 0 writes
    each epoch's checkpoint until Ray Train has uploaded it and deleted it. Its name starts with the
    run's key and a marker file inside holds that key, so :func:`remove_staging_dirs` can find it again."""
    key = _staging_key(config)
    d = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{key}-")
    with open(os.path.join(d, STAGING_MARKER), "w") as f:
        f.write(key)
    return d


def staging_dirs(config: Mapping) -> list[str]:
    """This run's staging folders on this machine, made by :func:`make_staging_dir`: under the temp
    folder, named for the run, a folder (no link) owned by this user with mode 0700 and the marker
    naming the run inside. Anything else there, whoever made it, is never one of them."""
    key = _staging_key(config)
    base = tempfile.gettempdir()
    found = []
    for name in sorted(os.listdir(base)):
        if not name.startswith(f"{STAGING_PREFIX}{key}-"):
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                continue
            with open(os.path.join(path, STAGING_MARKER)) as f:
                if f.read() == key:
                    found.append(path)
        except OSError:
            continue
    return found


def remove_staging_dirs(config: Mapping) -> None:
    """Remove this run's staging folders on this machine (:func:`staging_dirs`): a killed predecessor's
    unuploaded epochs when a rank 0 starts, and every one left when the run ends (the driver)."""
    for d in staging_dirs(config):
        shutil.rmtree(d, ignore_errors=True)


def fresh_staging_dir(config: Mapping) -> str:
    """Rank 0's staging folder for this start: a killed predecessor's (its unuploaded epochs) removed,
    a new one made."""
    remove_staging_dirs(config)
    return make_staging_dir(config)


def _build(spec: Mapping, cfg: Mapping, input_stats, device):
    """(model, optimizer, schedule) of a worker, the same on every rank: the model of ``spec``
    standardising its inputs with the train split's statistics (computed on the driver), on ``device``."""
    model = build_model(spec)
    model.set_input_stats(input_stats)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    return model, optimizer, scheduler


def _resume(config: Mapping, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """The loop state to go on from, this start recorded in it: the latest checkpoint's (its weights,
    optimizer and schedule loaded), after a worker restart or when the same run is started again;
    else a fresh state (the weights warm started from ``config["warm_start"]`` when given)."""
    import ray.train
    state = {"epoch": -1, "best_score": None, "best_loss": None, "best_epoch": -1, "bad_epochs": 0,
             "stopped_early": False, "history": [], "starts": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = json.loads(saved["state_json"])
    elif config.get("warm_start"):      # bytes of an exported model.pt
        ws = torch.load(io.BytesIO(config["warm_start"]), map_location="cpu", weights_only=True)
        state["warm_started"] = len(warm_start_state(model, ws))
    state["starts"].append(state["epoch"] + 1)
    return state


def _train_data(config: Mapping):
    """(train_arrays, train_shard): a small train split as NumPy arrays (from the object store),
    else this worker's Ray Data shard of the streamed split."""
    import ray
    import ray.train
    train_arrays = config.get("train_arrays")         # small split: ObjectRef of NumPy arrays (else streamed)
    train_arrays = ray.get(train_arrays) if train_arrays is not None else None
    train_shard = ray.train.get_dataset_shard("train") if train_arrays is None else None
    return train_arrays, train_shard


def _epoch_pass(model, raw_model, optimizer, scheduler, train_arrays, train_shard, batch_size: int,
                cfg: Mapping, epoch: int, rank: int, world: int, device):
    """One pass over this worker's batches of epoch ``epoch``, then one schedule step:
    (sum of the batch losses times their rows, rows) of this rank."""
    batches = epoch_batches(train_arrays, train_shard, batch_size, cfg["seed"], epoch, rank, world, device)
    model.train()
    gen = torch.Generator().manual_seed(cfg["seed"] * 100003 + epoch * 1009 + rank)
    loss_sum, n_rows = train_epoch(model, raw_model, batches, optimizer, cfg["modality_dropout"], gen, device)
    scheduler.step()
    return loss_sum, n_rows


def _validation_data(config: Mapping):
    """(validation arrays, validation iterator): a small split as NumPy arrays (from the object store),
    else the Ray Data iterator of the whole split (streamed and scored by rank 0)."""
    import ray
    import ray.train
    ref = config.get("validation")
    if ref is not None:
        return ray.get(ref), None
    return None, ray.train.get_dataset_shard("validation")


def _broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (itself without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def score_validation(raw_model, val, val_iter, class_names: list[str], rank: int, device) -> dict:
    """The validation metrics: of the arrays ``val`` on every rank, or streamed from ``val_iter``
    by rank 0 (memory bounded by batches) and broadcast to the others."""
    if val is not None:
        return evaluate_arrays(raw_model, val, class_names, device=device)
    vm = None
    if rank == 0:
        batches = val_iter.iter_batches(batch_size=VALIDATION_BATCH, batch_format="numpy")
        vm = evaluate_batches(raw_model, (b for b in batches if len(b["y"])), class_names, device=device)
    return _broadcast_object(vm)


def _validate(raw_model, val, val_iter, class_names: list[str], cfg: Mapping, state: dict, epoch: int,
              rank: int, device):
    """Score the validation split (:func:`score_validation`) and update the best epoch and the count of
    epochs without improvement in ``state``: (metrics, score, stop), ``stop`` (early stopping)
    being rank 0's decision, so all ranks stop together."""
    vm = score_validation(raw_model, val, val_iter, class_names, rank, device)
    score = score_of(vm, cfg["metric"])
    if improves(score, vm["loss"], state["best_score"], state.get("best_loss")):
        state.update(best_score=score, best_loss=vm["loss"], best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    patience = cfg.get("early_stopping_patience")
    stop = _broadcast_flag(bool(patience) and state["bad_epochs"] >= patience)
    return vm, score, stop


def _epoch_record(epoch: int, train_loss: float, n_rows, vm: Mapping, score: float, optimizer,
                  t0: float, train_time: float, world: int, state: Mapping) -> dict:
    """The history record of one epoch (``epoch_time_s``: from ``t0`` until now)."""
    record = {"epoch": epoch, "train_loss": train_loss, "train_rows": int(n_rows),
              "val_loss": vm["loss"], "val_accuracy": vm["accuracy"], "val_macro_f1": vm["macro_f1"],
              "val_score": score, "lr": optimizer.param_groups[0]["lr"],
              "epoch_time_s": time.time() - t0, "train_time_s": train_time, "started_at": t0,
              "world_size": world, "attempt": len(state["starts"])}
    if "modality_weights" in vm:
        record["modality_weights"] = vm["modality_weights"]
    return record


def _write_checkpoint(staging: str, epoch: int, raw_model, optimizer, scheduler, state: Mapping,
                      config: Mapping, stop: bool) -> str:
    """Rank 0 writes epoch ``epoch``'s checkpoint (state.pt + meta.json) to a new folder of its
    staging folder (removed by Ray once uploaded) and returns that folder."""
    spec = config["spec"]
    d = os.path.join(staging, f"epoch_{epoch:04d}")
    os.makedirs(d)
    torch.save({"model": {k: v.detach().cpu() for k, v in raw_model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "best_score": state["best_score"],
                "state_json": json.dumps(state), "spec_json": json.dumps(spec),
                "workflow_json": json.dumps(config.get("workflow", {}))},
               os.path.join(d, STATE_FILE))
    with open(os.path.join(d, META_FILE), "w") as f:
        json.dump({"epoch": epoch, "fingerprint": config.get("fingerprint"),
                   "best_epoch": state["best_epoch"], "best_score": state["best_score"],
                   "classes": spec["classes"], "features": spec["features"],
                   "arch": spec["arch"], "stopped_early": stop}, f, indent=2)
    return d


def _report(record: Mapping, state: Mapping, stop: bool, epoch: int, checkpoint_dir: Optional[str]) -> None:
    """Report one epoch's metrics (every rank) with its checkpoint (rank 0's ``checkpoint_dir``). The
    report is handed over in the background (ASYNC): Ray Train V2 takes one report per worker each
    time its controller polls, and a SYNC report would hold the next epoch until that poll."""
    import ray.train
    metrics = {k: v for k, v in record.items() if not isinstance(v, dict)}
    metrics.update(best_epoch=state["best_epoch"], best_score=state["best_score"], stopped_early=stop)
    ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    quiet_worker_logs()
    pin_threads()
    cfg = config["train"]                 # TrainConfig.model_dump()
    spec = config["spec"]                 # model spec: arch, classes, features, ...
    class_names = [c["name"] for c in spec["classes"]]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(cfg["seed"])          # same init on every rank (DDP also broadcasts rank 0's)

    # -- setup: model, optimizer, schedule; rank 0's staging folder for checkpoints
    model, optimizer, scheduler = _build(spec, cfg, config["input_stats"], device)
    staging = fresh_staging_dir(config) if rank == 0 else None

    # -- resume from the latest checkpoint (worker restart, or the same run started again)
    state = _resume(config, model, optimizer, scheduler)
    start_epoch = state["epoch"] + 1

    model = ray.train.torch.prepare_model(model)      # DDP when world > 1
    raw_model = model.module if hasattr(model, "module") else model
    train_arrays, train_shard = _train_data(config)
    val, val_iter = _validation_data(config)          # NumPy arrays (small split) or a Ray Data iterator
    batch_size = max(1, cfg["batch_size"] // world)

    for epoch in range(start_epoch, cfg["epochs"]):
        if state["stopped_early"]:
            break
        t0 = time.time()

        # -- one pass over this worker's shard of the train split
        loss_sum, n_rows = _epoch_pass(model, raw_model, optimizer, scheduler, train_arrays, train_shard,
                                       batch_size, cfg, epoch, rank, world, device)
        train_time = time.time() - t0
        loss_sum, n_rows = _all_reduce_sum([float(loss_sum), n_rows])
        train_loss = loss_sum / max(n_rows, 1)

        # -- validation (the whole split: on every rank, or streamed by rank 0)
        vm, score, stop = _validate(raw_model, val, val_iter, class_names, cfg, state, epoch, rank, device)
        record = _epoch_record(epoch, train_loss, n_rows, vm, score, optimizer, t0, train_time, world, state)
        state["history"].append(record)
        state.update(epoch=epoch, stopped_early=stop)

        # -- checkpoint every epoch (rank 0 writes; every rank reports)
        ckpt_dir = None
        if rank == 0:
            ckpt_dir = _write_checkpoint(staging, epoch, raw_model, optimizer, scheduler, state, config, stop)
        _report(record, state, stop, epoch, ckpt_dir)
        if stop:
            break
