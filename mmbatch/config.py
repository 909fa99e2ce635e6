"""Workflow files: one YAML document describes a run, validated on load.

Load with :func:`load_workflow`; ``--set key.sub=value`` overrides go through
:func:`apply_overrides` before validation, so they are checked the same way.
Errors name the key, the value given and what is allowed (:class:`WorkflowError`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmbatch.schema import MODALITIES

Modality = Literal["image", "audio", "text"]


class WorkflowError(ValueError):
    """A workflow file or override that does not validate."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Strict):
    """Where and with what resources to run. ``address: null`` starts an embedded local Ray."""
    address: Optional[str] = None
    num_cpus: Optional[int] = Field(None, ge=1)
    num_gpus: Optional[float] = Field(None, ge=0)
    object_store_memory: Optional[int] = None


class CompletionConfig(Strict):
    """Fill a missing modality from another column before extraction ("modality completion")."""
    kind: Literal["image-to-speech", "image-to-text", "text-to-image", "text-to-speech"]
    source_column: Optional[str] = None              # default: the kind's source modality column
    target: Optional[Modality] = None                # default: the kind's target modality


class DatasetConfig(Strict):
    """An ingested (canonical) dataset to preprocess."""
    name: str
    path: str
    modalities: Optional[list[Modality]] = None      # default: every modality present
    label_column: Optional[str] = None               # derive labels from this column (sorted unique index)
    splits: Optional[list[str]] = None               # keep only these splits
    complete: list[CompletionConfig] = Field(default_factory=list)   # conversions filling missing modalities


class ImageFeatures(Strict):
    extractor: Literal["hog", "cnn"] = "hog"
    size: int = Field(64, ge=16, le=1024)             # square input side after resize/center-crop
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    weights: Optional[str] = None                    # local path or URI of a torchvision state_dict
    batch_size: int = Field(64, ge=1)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    num_gpus: Optional[float] = Field(None, ge=0)    # per actor; null = auto (fraction when GPUs exist)


class AudioFeatures(Strict):
    extractor: Literal["logmel_stats", "cnn"] = "logmel_stats"
    backend: Literal["librosa", "torch"] = "librosa"
    sample_rate: int = Field(16000, ge=1000)
    win_ms: float = Field(25.0, gt=0)
    hop_ms: float = Field(10.0, gt=0)
    n_mels: int = Field(80, ge=1)
    n_mfcc: int = Field(13, ge=0)
    fmin: float = 0.0
    fmax: Optional[float] = None
    max_seconds: Optional[float] = Field(30.0, gt=0)  # clip longer audio (recorded in metadata)
    embedding_dim: int = Field(128, ge=8)             # cnn encoder output size
    weights: Optional[str] = None
    batch_size: int = Field(32, ge=1)
    num_gpus: Optional[float] = Field(None, ge=0)


class TextFeatures(Strict):
    extractor: Literal["hashing", "sentence"] = "hashing"
    dim: int = Field(256, ge=8)                      # hashing embedding size
    ngram_range: tuple[int, int] = (1, 2)
    model_path: Optional[str] = None                 # local dir of a sentence-transformers model
    batch_size: int = Field(64, ge=1)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    num_gpus: Optional[float] = Field(None, ge=0)


class FeaturesConfig(Strict):
    image: ImageFeatures = ImageFeatures()
    audio: AudioFeatures = AudioFeatures()
    text: TextFeatures = TextFeatures()
    batch_size: int = Field(64, ge=1)                # rows per batch in CPU stages


class PairingConfig(Strict):
    """How rows of several datasets become one multimodal sample."""
    by: Literal["none", "key", "label"] = "none"
    key: str = "sample_id"
    seed: int = 0
    primary: Optional[str] = None                    # dataset whose rows define the samples


class FusionConfig(Strict):
    method: Literal["concat", "weighted"] = "concat"
    dim: int = Field(256, ge=1)                      # common size for `weighted`
    weights: dict[Modality, float] = Field(default_factory=lambda: {m: 1.0 for m in MODALITIES})
    seed: int = 0


class OutputConfig(Strict):
    path: str = "out/features"
    row_group_size: int = Field(4096, ge=1)


class TrainConfig(Strict):
    data: Optional[str] = None                       # fused Parquet; default output.path
    out: str = "out/train"                           # storage path for checkpoints and report
    name: str = "fusion"
    model: Literal["early", "weighted", "late", "gated"] = "early"
    modalities: Optional[list[Modality]] = None      # default: every modality in the data
    baselines: bool = False                          # also train each modality alone
    hidden: int = Field(128, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    modality_dropout: float = Field(0.2, ge=0, lt=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["none", "cosine", "step"] = "cosine"
    early_stopping_patience: Optional[int] = Field(None, ge=1)
    metric: Literal["accuracy", "macro_f1", "loss"] = "accuracy"
    num_workers: int = Field(2, ge=1)
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float = Field(0.5, gt=0)
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    val_fraction: float = Field(0.15, ge=0, lt=1)    # used when the data has no split column values
    test_fraction: float = Field(0.15, ge=0, lt=1)


class RetrainConfig(Strict):
    registry: str = "out/registry"
    margin: float = 0.0                              # candidate must beat champion by this much
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    warm_start: bool = False
    force_train: bool = False                        # train even when no data changed


class Workflow(Strict):
    """A complete mmbatch run."""
    name: str = "mmbatch"
    description: str = ""
    ray: RayConfig = RayConfig()
    datasets: list[DatasetConfig] = Field(default_factory=list)
    features: FeaturesConfig = FeaturesConfig()
    pairing: PairingConfig = PairingConfig()
    fusion: FusionConfig = FusionConfig()
    output: OutputConfig = OutputConfig()
    train: TrainConfig = TrainConfig()
    retrain: RetrainConfig = RetrainConfig()

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, v):
        names = [d.name for d in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"dataset names must be unique, repeated: {sorted(dup)}")
        return v

    def train_data(self) -> str:
        return self.train.data or self.output.path


# --- loading -----------------------------------------------------------------------
def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}' (check spelling; allowed keys are documented in README 'Workflow file')")
            continue
        msg = e["msg"]
        got = e.get("input")
        lines.append(f"key '{key}': {msg} (got {got!r})")
    return "invalid workflow:\n  " + "\n  ".join(lines)


def parse_override(expr: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], parsed value). Values are YAML (numbers, lists, null)."""
    if "=" not in expr:
        raise WorkflowError(f"--set expects key.sub=value, got {expr!r}")
    key, raw = expr.split("=", 1)
    if not key.strip():
        raise WorkflowError(f"--set has an empty key: {expr!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise WorkflowError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from e
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    data = copy.deepcopy(data)
    for expr in overrides or []:
        path, value = parse_override(expr)
        node = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[int(part)]
                continue
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise WorkflowError(f"--set {'.'.join(path)}: '{'.'.join(path[:i + 1])}' is not a section")
        last = path[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def workflow_from_dict(data: dict, overrides: list[str] | None = None, base_dir: Path | None = None) -> Workflow:
    data = apply_overrides(data or {}, overrides)
    try:
        wf = Workflow.model_validate(data)
    except ValidationError as e:
        raise WorkflowError(_format_error(e)) from None
    if base_dir is not None:
        _resolve_paths(wf, base_dir)
    return wf


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> Workflow:
    """Read, override and validate a workflow YAML (safe loader only)."""
    p = Path(path)
    if not p.is_file():
        raise WorkflowError(f"workflow file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise WorkflowError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{p}: top level must be a mapping of keys, got {type(data).__name__}")
    return workflow_from_dict(data, overrides)


def _resolve_paths(wf: Workflow, base: Path) -> None:
    """Make relative local paths relative to ``base`` (used by generated workflows)."""
    def fix(p: str | None) -> str | None:
        if p is None or "://" in p or Path(p).is_absolute():
            return p
        return str(base / p)
    for d in wf.datasets:
        d.path = fix(d.path)
    wf.output.path = fix(wf.output.path)
    wf.train.out = fix(wf.train.out)
    wf.train.data = fix(wf.train.data)
    wf.retrain.registry = fix(wf.retrain.registry)


def dump_workflow(wf: Workflow) -> str:
    return yaml.safe_dump(wf.model_dump(mode="json"), sort_keys=False)
