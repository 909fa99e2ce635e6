"""`mmbatch train`: fit a fusion model (and optional unimodal baselines) with Ray Train.

One run lives at ``<train.out>/<train.name>`` (Ray Train's storage path and run
name). Baselines are separate runs named ``<train.name>-only-<modality>``.
Inside a run folder::

    checkpoint_epoch_NNNN/   Ray Train checkpoints (state.pt + meta.json), a few kept
    model/                   export: model.pt (state_dict) + model.json (spec, metrics)
    report.html, metrics.json, *.png   (fused run only)

Restarting: Ray Train V2 (the default in Ray 2.60) reloads the run's checkpoint
snapshot when a trainer starts with the same ``RunConfig(storage_path, name)``;
``ray.train.get_checkpoint()`` then returns the latest checkpoint and the loop
continues from the next epoch. A run whose export (``model/model.json``) is
complete with the same settings is not started again at all. A run folder
holding a run with *different* settings or data is refused (pick a new
``train.name``), so a stale checkpoint can never be resumed into another model.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

import mmbatch
from mmbatch import schema
from mmbatch.engine import capacity, ownership, progress, runtime, storage
from mmbatch.config import NOT_LEARNING, Workflow
from mmbatch.errors import UsageError
from mmbatch.engine.runtime import init_ray
from mmbatch.train import report
from mmbatch.train.data import FusedData
from mmbatch.train.evaluate import evaluate_model
from mmbatch.train.exclude import read_exclude
from mmbatch.train.loop import META_FILE, STATE_FILE, remove_staging_dirs, train_loop_per_worker
from mmbatch.train.models import MODEL_FILE, arch_spec, build_model, feature_stats, read_spec, save_model

log = logging.getLogger("mmbatch.train")

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"   # read by the Ray Train controller (propagated from here)
MATERIALIZE_BYTES = 256 * 2 ** 20     # train splits smaller than this are held in memory (see _train_input)
VALIDATION_BYTES = 64 * 2 ** 20       # validation splits smaller than this too (see _validation_input)
STATS_ROWS = 100_000                  # rows of a large data set the input statistics are streamed from
KEEP_CHECKPOINTS = 3                  # best by validation score; Ray always keeps the latest too


@dataclass
class TrainResult:
    model_dir: str                     # exported model folder (model.pt + model.json)
    metrics: dict                      # test split: accuracy, macro_f1, loss, per_class, confusion, ...
    report_path: Optional[str]         # report.html (fused run)
    run_dir: str
    baselines: dict = field(default_factory=dict)       # modality -> test metrics
    checkpoint_path: Optional[str] = None               # best Ray Train checkpoint
    val_metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)         # one record per epoch trained
    starts: list = field(default_factory=list)          # epoch each attempt started at ([0] = no restart)
    status: str = "trained"            # trained | resumed | complete (nothing left to train)
    spec: dict = field(default_factory=dict)
    gain: Optional[dict] = None        # fused vs best baseline (report.fusion_gain), with baselines


# --- the entry point ---------------------------------------------------------------------------
def run_training(wf: Workflow, baselines: bool | None = None, warm_start: str | None = None,
                 modalities: list[str] | None = None, allow_incomplete: bool = False) -> TrainResult:
    """Train the fusion model of ``wf.train`` (plus one baseline per modality when asked) on a complete,
    consistent fused output (mmbatch.engine.provenance.check_fused; ``allow_incomplete``: what is committed)."""
    from mmbatch.engine.provenance import check_fused_uri

    t = wf.train
    ownership.check_disjoint({"train.out": t.out}, {"train.data": wf.train_data(),
                                                    **({"train.exclude": t.exclude} if t.exclude else {}),
                                                    **({"the champion model": warm_start} if warm_start else {})})
    check_fused_uri(wf.train_data(), allow_incomplete=allow_incomplete)
    ownership.claim(t.out, "train", wf.name)
    init_ray(wf.ray.address, wf.ray.num_cpus, wf.ray.num_gpus, wf.ray.object_store_memory)
    sp = wf.splits
    data = FusedData.open(wf.train_data(), seed=sp.seed, val_fraction=sp.val_fraction, test_fraction=sp.test_fraction,
                          exclude=read_exclude(t.exclude))
    if t.exclude:
        log.warning("train.exclude: %d train/validation row(s) of %s left out", data.excluded, t.exclude)
    mods = resolve_modalities(modalities or t.modalities, data)
    log.info("training %s on %s (%s), classes %s", t.name, data.uri, mods, [c["name"] for c in data.classes])

    fused = train_one(wf, data, mods, t.name, warm_start=warm_start)
    base: dict[str, TrainResult] = {}
    if (t.baselines if baselines is None else baselines) and len(mods) > 1:
        for m in mods:
            base[m] = train_one(wf, data, [m], f"{t.name}-only-{m}")
    fused.baselines = {m: r.metrics for m, r in base.items()}

    summary = make_summary(fused, data, base)
    if summary["gain"] and summary["gain"]["warning"]:
        log.warning("%s", summary["gain"]["warning"])
    fused.gain = summary["gain"]
    fused.report_path = report.write_report(fused.run_dir, summary)
    print(report.summary_table(summary))
    print(f"report: {fused.report_path}")
    return fused


def resolve_modalities(wanted: Optional[Sequence[str]], data: FusedData) -> list[str]:
    if not wanted:
        return list(data.dims)
    missing = [m for m in wanted if m not in data.dims]
    if missing:
        raise UsageError(f"train.modalities asks for {missing}, but {data.uri} only has {sorted(data.dims)}")
    return [m for m in schema.MODALITIES if m in wanted]


# --- one run ------------------------------------------------------------------------------------
def model_spec(wf: Workflow, data: FusedData, mods: list[str], name: str) -> dict:
    t = wf.train
    return {
        "name": name,
        "mmbatch_version": mmbatch.__version__,
        "schema_version": schema.SCHEMA_VERSION,
        "arch": arch_spec(t.model, {m: data.dims[m] for m in mods}, len(data.classes), t.hidden, t.dropout,
                          encoders=learned_encoders(t, data, mods)),
        "modalities": mods,
        "classes": data.classes,
        "features": data.features(mods),
        "fusion": data.meta.get("fusion"),
        "split": {"seed": wf.splits.seed, "val_fraction": wf.splits.val_fraction,
                  "test_fraction": wf.splits.test_fraction, "plan": data.plan},
        "data": {"uri": data.uri, "fingerprint": data.fingerprint, "counts": data.counts,
                 "class_balance": data.imbalance("train"),
                 **({"excluded": data.excluded} if data.exclude else {})},
        "train": wf.train_record(),
    }


def learned_encoders(t, data: FusedData, mods: list[str]) -> dict:
    """``arch.encoders`` of ``train.encoders`` (learned ones only), checked against the data's features."""
    from mmbatch.train.encoders import encoder_spec
    from mmbatch.train.sequences import check_encoders

    feats = data.features(mods)
    kinds = check_encoders(t.encoders.model_dump(), feats, data.uri)
    return {m: encoder_spec(m, k, t.encoders.hidden, feats[m]) for m, k in kinds.items()}


def run_fingerprint(spec: dict, warm_start_blob: Optional[bytes]) -> str:
    # train.modalities is left out here as it is resolved into spec["arch"]; train.exclude (its path) as the
    # excluded ids are part of the data's fingerprint
    train = {k: v for k, v in spec["train"].items() if k not in NOT_LEARNING | {"modalities", "exclude"}}
    return storage.fingerprint({"arch": spec["arch"], "classes": spec["classes"], "features": spec["features"],
                                "split": spec["split"], "data": spec["data"]["fingerprint"], "train": train,
                                "warm_start": storage.fingerprint(warm_start_blob.hex()) if warm_start_blob else None})


@dataclass(frozen=True)
class RankPlacement:
    """How many Ray Train ranks, and what each asks for: a whole GPU per rank, or CPUs only."""
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict
    note: str = ""                   # why it differs from what the workflow asked, if it does

    def where(self) -> str:
        per = ", ".join(f"{v:g} {k}" for k, v in self.resources_per_worker.items())
        return f"{self.num_workers} rank(s) on {'GPUs' if self.use_gpu else 'CPUs'} ({per} each)"


def rank_placement(use_gpu, num_workers: int, cpus_per_worker: float, gpus_now: float,
                   gpus_max: Optional[float]) -> RankPlacement:
    """Ray Train's resources for ``train.use_gpu`` (auto / true / false). Ranks never share a GPU
    (NCCL refuses two ranks on one device): each asks for a whole one. ``gpus_now``: GPUs in the cluster
    now; ``gpus_max``: the most it can have once its autoscaler adds every node it may (``inf``: no limit;
    None: no autoscaler with known node types; mmbatch.engine.capacity.gpus). ``auto`` uses GPUs when the cluster
    has or can add a whole one, with no more ranks than GPUs; ``true`` needs one per rank."""
    cpu = RankPlacement(num_workers, False, {"CPU": cpus_per_worker})
    whole = int(min(max(gpus_now, gpus_max or 0), num_workers) + 1e-9)
    if use_gpu is False or (use_gpu == "auto" and whole < 1):
        return cpu
    if whole < num_workers:
        if use_gpu is True:
            raise UsageError(f"train.use_gpu: true needs {num_workers} whole GPUs (one per rank, train.num_workers="
                             f"{num_workers}); the cluster has {gpus_now:g}"
                             + (f" and can grow to {gpus_max:g}" if gpus_max is not None else " and no autoscaler")
                             + ": lower train.num_workers, or set train.use_gpu: auto or false")
        note = f"train.num_workers={num_workers} but the cluster can have {whole} GPU(s): {whole} rank(s), one GPU each"
    else:
        note = ""
    n = min(num_workers, whole)
    if gpus_now + 1e-9 < n:
        note = (note + "; " if note else "") + f"asking the autoscaler for {n - int(gpus_now)} more GPU(s)"
    return RankPlacement(n, True, {"CPU": cpus_per_worker, "GPU": 1.0}, note)


GPU_PROBE_S = 900.0                   # how long the GPU probe waits for a GPU node (the autoscaler may start one)
_gpu_probe: dict = {}                 # the probe's answer, once per driver ("" = usable)


def _cuda_here() -> str:
    """In a process that holds a GPU: what keeps a Ray Train rank from using it ("" when nothing)."""
    import torch
    import torch.distributed as dist
    if not torch.cuda.is_available():
        return f"no usable CUDA (torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})"
    if not dist.is_nccl_available():
        return f"a torch without NCCL (torch {torch.__version__})"
    return ""


def gpu_workers_lack() -> str:
    """What a rank on one of the cluster's GPU workers lacks to train there ("" when nothing): asked once per
    driver of a task that holds one GPU, as a rank would (the autoscaler starts a GPU node for it where none
    runs). Ray's GPUs are a resource name: a fake GPU, or a CPU torch on a GPU node, has no CUDA, and Ray
    Train's GPU ranks would fail setting up NCCL. Unknown (no GPU within :data:`GPU_PROBE_S`): ""."""
    import ray

    if "why" not in _gpu_probe:
        ref = ray.remote(num_cpus=0, num_gpus=1, max_retries=3)(_cuda_here).remote()
        ready, _ = ray.wait([ref], timeout=GPU_PROBE_S)
        if not ready:
            ray.cancel(ref, force=True)
        _gpu_probe["why"] = ray.get(ref) if ready else ""
    return _gpu_probe["why"]


def usable_gpus(place: RankPlacement, use_gpu, lack=None) -> RankPlacement:
    """``place`` where its GPU ranks can use their GPUs (``lack``: :func:`gpu_workers_lack`); else, with
    ``train.use_gpu: auto``, the same ranks on CPUs (Ray Train sets up gloo for CPU ranks), said once per
    driver; with ``true``, a UsageError naming the fix."""
    if not place.use_gpu:
        return place
    why = (lack or gpu_workers_lack)()
    if not why:
        return place
    if use_gpu is True:
        raise UsageError(f"train.use_gpu: true, but the cluster's GPU workers have {why}: install a CUDA build of "
                         "torch on the GPU nodes, or set train.use_gpu: auto (trains on CPUs) or false")
    note = f"the cluster's GPU workers have {why}: training on CPUs (gloo) instead"
    if not _gpu_probe.get("said"):
        _gpu_probe["said"] = True
        log.warning("%s", note)
    return RankPlacement(place.num_workers, False, {"CPU": place.resources_per_worker["CPU"]}, note="")


def storage_root(out: str) -> str:
    return out if "://" in out else os.path.abspath(out)


def checkpoint_storage(uri: str) -> tuple[str, object]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for the folder ``uri``: the path as it is and no
    filesystem (Ray resolves it, from the standard environment for a URI), except where the filesystem of
    ``uri`` has options (the workflow's ``storage`` key): then that filesystem, so checkpoints are written
    with the same endpoint and credentials as the data (Arrow's own S3 client where it takes the options,
    else the fsspec one), and the path without its scheme, as Ray wants it then."""
    root = storage_root(uri)
    fs, path = storage.url_to_fs(root)
    if storage.is_local(fs) or not getattr(fs, "storage_options", None):
        return root, None
    native = storage.arrow_s3(fs, path)
    if native is not None:
        return path, native
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    return path, PyFileSystem(FSSpecHandler(fs))


def _run_config(t, name: str):
    """Ray Train's RunConfig of the run ``<train.out>/<name>``."""
    import ray.train

    path, fs = checkpoint_storage(t.out)
    return ray.train.RunConfig(
        storage_path=path, storage_filesystem=fs, name=name,
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS,
                                                     checkpoint_score_attribute="val_score",
                                                     checkpoint_score_order="max"),
        # Ray Train's per-report and worker-group INFO lines only with --verbose
        logging_config=ray.train.LoggingConfig(log_level="INFO" if runtime.VERBOSE else "WARNING"))


def train_one(wf: Workflow, data: FusedData, mods: list[str], name: str,
              warm_start: Optional[str] = None) -> TrainResult:
    """Train (or resume, or find complete) the run ``<train.out>/<name>`` and export its best model."""
    t = wf.train
    run_dir = storage.join(storage_root(t.out), name)
    model_dir = storage.join(run_dir, "model")
    spec = model_spec(wf, data, mods, name)
    blob = _warm_start_bytes(storage.join(warm_start, MODEL_FILE)) if warm_start else None
    spec["fingerprint"] = fp = run_fingerprint(spec, blob)

    # -- already done? (same settings) / someone else's run? (different settings)
    done = read_spec(model_dir)
    if done and done.get("status") == "complete":
        if done.get("fingerprint") != fp:
            raise _occupied(run_dir, name)
        log.info("%s: already complete (%s), not training again", name, model_dir)
        return _complete_result(done, run_dir, model_dir)
    prior = latest_checkpoint_meta(run_dir)
    if prior is not None and prior.get("fingerprint") != fp:
        raise _occupied(run_dir, name)
    _check_splits(data)

    # -- Ray Train
    place = usable_gpus(rank_placement(t.use_gpu, t.num_workers, t.cpus_per_worker,
                                       *capacity.gpus(capacity.snapshot())), t.use_gpu)
    if place.note:
        log.warning("%s: %s", name, place.note)
    result = _fit(wf, data, mods, name, spec, blob, place, run_dir)

    # -- best checkpoint (validation score) -> export
    state, best_ckpt, final, test, val = _export(result, t, name, spec, place, model_dir, data)
    return TrainResult(model_dir=model_dir, metrics=test, report_path=None, run_dir=run_dir,
                       checkpoint_path=best_ckpt.path, val_metrics=val, history=state["history"],
                       starts=state["starts"], status=_status(prior, state), spec=final)


def _complete_result(done: dict, run_dir: str, model_dir: str) -> TrainResult:
    """The result of a run whose export (``done``: its model.json) is already complete."""
    tr = done.get("training", {})
    return TrainResult(model_dir=model_dir, metrics=done["metrics"]["test"], report_path=None, run_dir=run_dir,
                       checkpoint_path=tr.get("checkpoint"), val_metrics=done["metrics"].get("validation", {}),
                       history=tr.get("history", []), starts=tr.get("starts", []), status="complete", spec=done)


def _check_splits(data: FusedData) -> None:
    """Refuse an empty validation or test split; warn about a split too small to score."""
    sizes = data.split_sizes()
    for split in ("validation", "test"):
        if sizes[split] == 0:
            raise UsageError(f"{data.uri}: the {split} split is empty after splitting ({sizes}); add a "
                             f"{split} split or raise splits.val_fraction / splits.test_fraction (then rerun preprocess)")
    for split, why in data.unscorable().items():
        log.warning("%s: the %s split has %s: its scores (and model selection on it) mean nothing; "
                    "give it more rows", data.uri, split, why)


def _fit(wf: Workflow, data: FusedData, mods: list[str], name: str, spec: dict, blob: Optional[bytes],
         place: RankPlacement, run_dir: str):
    """Run (or resume) the run ``<train.out>/<name>`` with Ray Train on ``place``: its ``Result``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = wf.train
    # Ray Train V2 hands each report() to its controller when the controller next polls the
    # workers (a queue of one): at the default 2 s poll, an epoch of small data costs >= 2 s.
    os.environ.setdefault(POLL_ENV, "0.5")
    train_arrays, train_ds, input_stats = _train_input(data, mods)
    val_arrays, val_ds = _validation_input(data, mods)
    datasets = {k: v for k, v in (("train", train_ds), ("validation", val_ds)) if v is not None}
    config = {"train": t.model_dump(mode="json"), "spec": spec, "fingerprint": spec["fingerprint"],
              "input_stats": input_stats, "workflow": wf.model_dump(mode="json"), "warm_start": blob,
              "validation": val_arrays, "train_arrays": train_arrays}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=place.num_workers, use_gpu=place.use_gpu,
                                               resources_per_worker=place.resources_per_worker),
        run_config=_run_config(t, name),
        datasets=datasets or None,
        # the train split is sharded over the ranks; a streamed validation split is read whole by rank 0
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        with progress.watch_epochs(run_dir, f"train {name}", epochs=t.epochs, metric=t.metric):
            return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"training run '{name}' failed ({e.__class__.__name__}); its checkpoints are kept in "
                           f"{run_dir}: run the same command again to resume from the latest one") from e
    finally:
        remove_staging_dirs(config)        # of rank 0 when it ran on this machine


def _export(result, t, name: str, spec: dict, place: RankPlacement, model_dir: str, data: FusedData):
    """Export the run's best checkpoint (by validation score) to ``model_dir`` and score it on the test
    and validation splits; model.json is written last and marks the export complete.
    Returns (the loop state of the latest checkpoint, the best checkpoint, model.json, test, validation)."""
    if not result.best_checkpoints:
        raise RuntimeError(f"training run '{name}' reported no checkpoint (epochs={t.epochs})")
    best_ckpt, best_metrics = max(result.best_checkpoints,
                                  key=lambda cm: (cm[1]["val_score"], -cm[1]["epoch"]))
    best = _load_state(best_ckpt)
    latest = _load_state(result.checkpoint)
    state = json.loads(latest["state_json"])
    model = build_model(spec)
    model.load_state_dict(best["model"])
    training = {"history": state["history"], "starts": state["starts"], "best_epoch": int(best_metrics["epoch"]),
                "best_val_score": best_metrics["val_score"], "stopped_early": state["stopped_early"],
                "checkpoint": best_ckpt.path, "world_size": place.num_workers, "use_gpu": place.use_gpu,
                "placement": {**asdict(place), "where": place.where()}}
    save_model(model, {**spec, "status": "evaluating", "training": training}, model_dir)
    test = evaluate_model(model_dir, data.uri, "test", check=False)          # run_training checked the data
    val = evaluate_model(model_dir, data.uri, "validation", check=False)
    final = {**spec, "status": "complete", "training": training,
             "metrics": {"test": _slim(test), "validation": _slim(val)}}
    fs, p = storage.url_to_fs(model_dir)
    storage.write_json(fs, storage.join(p, "model.json"), final)     # last: marks the export complete
    storage.clean_tmp(fs, p)
    return state, best_ckpt, final, test, val


def _status(prior: Optional[dict], state: dict) -> str:
    """What this call did: "trained", "resumed" (from a checkpoint), or "complete" (the run was
    already at its last epoch: nothing trained now)."""
    if prior is not None and prior.get("epoch") == state["epoch"]:
        return "complete"
    if prior is not None or len(state["starts"]) > 1:
        return "resumed"
    return "trained"


def _train_input(data: FusedData, mods: list[str]):
    """(train_arrays, train dataset, input_stats) for the trainer. A train split whose embeddings
    are small (< MATERIALIZE_BYTES) is read once here and put in the object store as NumPy
    arrays (``train_arrays``, an ObjectRef): every worker maps it zero-copy and draws its
    batches from memory (loop.in_memory_batches), with no per-step Ray Data work. A larger
    split is streamed from Parquet every epoch as a Ray Dataset, sharded over the ranks.
    ``input_stats``: the per-feature mean/std the model standardises its inputs with, from
    the whole train split (small) or streamed over row groups of about STATS_ROWS rows spread
    over the data (large: FusedData.input_stats), so the driver never holds a large split."""
    import ray
    if data.array_bytes("train", mods) < MATERIALIZE_BYTES:
        arrays = data.arrays("train", mods)
        return ray.put(arrays), None, feature_stats(arrays, mods)
    return None, _quiet(data.dataset("train", mods)), data.input_stats(mods, STATS_ROWS)


def _validation_input(data: FusedData, mods: list[str]):
    """(validation arrays, validation dataset): a split under VALIDATION_BYTES as NumPy arrays in the
    object store (an ObjectRef every rank maps and scores whole), a larger one as a Ray Dataset that
    rank 0 streams and scores each epoch (loop._validate), so no process holds the whole split."""
    import ray
    if data.array_bytes("validation", mods) < VALIDATION_BYTES:
        return ray.put(data.arrays("validation", mods)), None
    return None, _quiet(data.dataset("validation", mods))


def _quiet(ds):
    """No Ray Data progress bars from inside the train workers (they interleave with the epoch logs)."""
    ds.context.enable_progress_bars = False
    ds.context.enable_operator_progress_bars = False
    return ds


def latest_checkpoint_meta(run_dir: str) -> Optional[dict]:
    """meta.json of the latest checkpoint of an existing Ray Train run folder (None when there is none)."""
    from ray.train import Result
    try:
        res = Result.from_path(*checkpoint_storage(run_dir))
    except (RuntimeError, FileNotFoundError, OSError):
        return None
    if res.checkpoint is None:
        return None
    with res.checkpoint.as_directory() as d:
        try:
            with open(os.path.join(d, META_FILE)) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}


def _occupied(run_dir: str, name: str) -> UsageError:
    return UsageError(f"{run_dir} already holds training run '{name}' with different settings or data; "
                      "set a new train.name (or delete that folder) to train a new model")


def _load_state(ckpt) -> dict:
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def _warm_start_bytes(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise UsageError(f"warm start: {uri} not found (expected an exported model folder)") from None


def _slim(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "data"}


# --- report ---------------------------------------------------------------------------------------
def make_summary(fused: TrainResult, data: FusedData, base: dict[str, TrainResult]) -> dict:
    spec = fused.spec
    summary = {
        "title": f"mmbatch training report: {spec.get('name')}",
        "name": spec.get("name"),
        "run_dir": fused.run_dir,
        "model_dir": fused.model_dir,
        "status": fused.status,
        "model": {k: spec.get(k) for k in ("arch", "classes", "features", "fusion", "split")},
        "data": {"uri": data.uri, "split_sizes": data.split_sizes(), "counts": data.counts,
                 "class_balance": data.imbalance("train"), "dropped_unlabeled": data.dropped_unlabeled,
                 "excluded": data.excluded,
                 "plan": data.plan},
        "metrics": _slim(fused.metrics),
        "val_metrics": _slim(fused.val_metrics),
        "history": fused.history,
        "starts": fused.starts,
        "best_epoch": (spec.get("training") or {}).get("best_epoch"),
        "selection_metric": (spec.get("train") or {}).get("metric"),   # what picked best_epoch
        "placement": (spec.get("training") or {}).get("placement"),
        "checkpoint": fused.checkpoint_path,
        "baselines": {m: _slim(r.metrics) for m, r in base.items()},
        "unscorable_splits": data.unscorable(),
        "mmbatch_version": mmbatch.__version__,
        # validation/test rows duplicating train (preprocess dedup.leakage), when that was checked
        "leakage": data.leakage,
    }
    summary["gain"] = report.fusion_gain(summary)
    return summary


__all__ = ["TrainResult", "run_training", "train_one"]
