"""Workflow files: one YAML document describes a run, validated on load.

Load with :func:`load_workflow`; ``--set key.sub=value`` overrides go through
:func:`apply_overrides` before validation, so they are checked the same way.
Errors name the key, the value given and what is allowed (:class:`WorkflowError`).
"""
from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmbatch.schema import MODALITIES

Modality = Literal[MODALITIES]
log = logging.getLogger(__name__)


class WorkflowError(ValueError):
    """A workflow file or override that does not validate."""


def plain_name(v: str) -> str:
    """``v`` if it is a plain name, safe as one folder or file name (it becomes part of output paths)."""
    from mmbatch.engine.storage import plain_name as is_plain

    if not is_plain(v):
        raise ValueError(f"{v!r} is not a plain name: use letters, digits, '.', '_', '-', '=', '+', starting "
                         "with a letter or digit (no '/', no '..')")
    return v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Strict):
    """Where and with what resources to run."""
    address: Optional[str] = Field(None, description="null: a new embedded local Ray (or the cluster in "
                                   "RAY_ADDRESS); \"auto\": the `ray start` cluster on this machine; or ray://HOST:PORT")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the embedded Ray (null: all)")
    num_gpus: Optional[float] = Field(None, ge=0, description="GPUs of the embedded Ray (null: all)")
    object_store_memory: Optional[int] = Field(None, description="bytes for the embedded Ray's object store "
                                               "(null: Ray's default)")
    max_workers: Optional[int] = Field(None, ge=1, description="most unit workers (actors) of an ingest or "
                                       "preprocess job (null: no limit; the pool grows as nodes join)")


class CompletionConfig(Strict):
    """Fill a missing modality from another column before extraction ("modality completion")."""
    kind: Literal["image-to-speech", "image-to-text", "text-to-image", "text-to-speech"] = Field(
        description="the conversion (see `mmbatch convert`)")
    source_column: Optional[str] = Field(None, description="column to convert (null: the kind's source modality)")
    target: Optional[Modality] = Field(None, description="modality to fill (null: the kind's target)")


class DatasetConfig(Strict):
    """An ingested (canonical) dataset to preprocess."""
    name: str = Field(description="a name for this dataset, unique in the workflow")
    path: str = Field(description="folder `mmbatch ingest` wrote (local path or s3://, gs://)")
    modalities: Optional[list[Modality]] = Field(None, description="modalities to use (null: every one present)")
    label_column: Optional[str] = Field(None, description="derive labels from this column (index of its sorted "
                                        "unique values), e.g. speaker")
    splits: Optional[list[str]] = Field(None, description="keep only these splits (null: all)")
    complete: list[CompletionConfig] = Field(default_factory=list,
                                             description="conversions that fill missing modalities")

    @field_validator("name")
    @classmethod
    def _plain(cls, v):
        return plain_name(v)


class ImageFeatures(Strict):
    extractor: Literal["hog", "cnn", "pixels", "hf"] = Field(
        "hog", description="hog: gradient + colour histograms on CPU; cnn: a torchvision ResNet embedding; pixels: "
        "the resized image itself (uint8), for train.encoders.image: cnn; hf: a Hugging Face vision model from "
        "model_path (CLIP/SigLIP: its vision tower)")
    size: int = Field(64, ge=16, le=1024, description="square input side after resize and center crop "
                      "(pixels: 28 unless set)")
    channels: Literal[1, 3] = Field(1, description="pixels: 1 (grayscale) or 3 (RGB)")
    arch: Literal["resnet18", "resnet34", "resnet50"] = Field("resnet18", description="cnn network")
    weights: Optional[str] = Field(None, description="cnn: local path or URI of a torchvision state_dict "
                                   "(null: random weights)")
    model_path: Optional[str] = Field(None, description="hf: folder written by save_pretrained (model + image "
                                      "processor), local or s3://, gs:// (copied once per worker; never downloaded)")
    pooling: Literal["pooler", "cls"] = Field("pooler", description="hf: the model's pooled output or its CLS "
                                              "token (CLIP/SigLIP: always the vision tower's pooled output)")
    batch_size: int = Field(64, ge=1, description="images per model call")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="cnn, hf: precision (fp16/bf16 "
                                                       "autocast on GPU; bf16 also on CPU)")
    num_gpus: Optional[float] = Field(None, ge=0, description="GPU per actor (null: a fraction when GPUs exist)")

    @model_validator(mode="after")
    def _hf_model_path(self):
        return _hf_needs_model_path(self, "image")

    @model_validator(mode="after")
    def _pixels_size(self):
        if self.extractor == "pixels" and "size" not in self.model_fields_set:
            self.__dict__["size"] = PIXELS_SIZE        # direct: no re-validation loop
            self.model_fields_set.add("size")
        return self


PIXELS_SIZE = 28        # features.image.size of the pixels extractor when not set


def _hf_needs_model_path(cfg, modality: str):
    """An hf extractor without ``model_path``: refused when the workflow loads."""
    if cfg.extractor in ("hf", "hf_frames") and not cfg.model_path:
        raise ValueError(f"features.{modality}.extractor: {cfg.extractor} needs features.{modality}.model_path, "
                         "a folder written by save_pretrained (models are never downloaded; "
                         "docs/pretrained-encoders.md)")
    return cfg


class AudioFeatures(Strict):
    extractor: Literal["logmel_stats", "cnn", "logmel_frames", "hf", "hf_frames"] = Field(
        "logmel_stats", description="logmel_stats: log-mel and MFCC statistics; cnn: a small convolutional "
        "encoder; logmel_frames: the log-mel frames themselves, for train.encoders.audio: lstm; hf: a Hugging Face "
        "speech encoder from model_path (wav2vec 2.0, HuBERT, WavLM, Whisper's encoder), mean over frames; "
        "hf_frames: that encoder's frames, for train.encoders.audio: lstm")
    max_frames: int = Field(100, ge=1, description="logmel_frames, hf_frames: frames kept per clip (longer clips "
                            "are cropped, shorter ones padded in training; the true length is stored)")
    model_path: Optional[str] = Field(None, description="hf, hf_frames: folder written by save_pretrained (model "
                                      "+ feature extractor), local or s3://, gs:// (copied once per worker)")
    layer: Optional[int] = Field(None, description="hf, hf_frames: hidden layer to use (0: the transformer's "
                                 "input, k: after layer k, -1: the last; null: the last hidden state)")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="hf, hf_frames: precision (fp16/bf16 "
                                                       "autocast on GPU; bf16 also on CPU)")
    backend: Literal["numpy", "torch"] = Field("numpy", description="logmel_stats: numpy (CPU; librosa's "
                                               "computation) or torch (GPU when there is one); 'librosa' is "
                                               "the old name of numpy")
    sample_rate: int = Field(16000, ge=1000, description="resample to this rate (Hz; hf: the model's feature "
                             "extractor's rate instead)")
    win_ms: float = Field(25.0, gt=0, description="frame length (ms)")
    hop_ms: float = Field(10.0, gt=0, description="frame shift (ms)")
    n_mels: int = Field(80, ge=1, description="mel bands")
    n_mfcc: int = Field(13, ge=0, description="MFCC coefficients (0: none)")
    fmin: float = Field(0.0, description="lowest mel frequency (Hz)")
    fmax: Optional[float] = Field(None, description="highest mel frequency (Hz; null: Nyquist)")
    max_seconds: Optional[float] = Field(30.0, gt=0, description="clip longer audio (recorded in the metadata)")
    embedding_dim: int = Field(128, ge=8, description="cnn encoder output size")
    weights: Optional[str] = Field(None, description="cnn: encoder weights (null: random)")
    batch_size: int = Field(32, ge=1, description="clips per model call")
    num_gpus: Optional[float] = Field(None, ge=0, description="GPU per actor (null: a fraction when GPUs exist)")

    @model_validator(mode="after")
    def _hf_model_path(self):
        return _hf_needs_model_path(self, "audio")

    @field_validator("backend", mode="before")
    @classmethod
    def _old_backend_name(cls, v):
        if v == "librosa":
            logging.getLogger("mmbatch.config").warning(
                "features.audio.backend: 'librosa' is deprecated, it is now called 'numpy' (the same computation)")
            return "numpy"
        return v


class TextFeatures(Strict):
    extractor: Literal["hashing", "sentence", "tokens", "hf"] = Field(
        "hashing", description="hashing: hashed word n-grams; sentence: a sentence-transformers model; tokens: "
        "word ids from a vocabulary of the train split, for train.encoders.text: lstm; hf: a Hugging Face text "
        "model from model_path, mean over tokens (CLIP/SigLIP: its text tower, the image tower's space)")
    max_tokens: int = Field(32, ge=1, description="tokens: ids kept per text (the true length is stored)")
    vocab_size: int = Field(10000, ge=3, description="tokens: most frequent train-split words kept, plus "
                            "<pad> and <unk>")
    min_count: int = Field(1, ge=1, description="tokens: a word enters the vocabulary from this many train rows")
    vocabulary: Optional[list[str]] = Field(None, description="tokens: the vocabulary (null: built by preprocess "
                                            "from the train split and stored in the output metadata)")
    dim: int = Field(256, ge=8, description="hashing embedding size")
    ngram_range: tuple[int, int] = Field((1, 2), description="hashing word n-gram lengths")
    model_path: Optional[str] = Field(None, description="sentence: local folder of a sentence-transformers model; "
                                      "hf: folder written by save_pretrained (model + tokenizer), local or s3://, gs://")
    batch_size: int = Field(64, ge=1, description="texts per model call")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="sentence, hf: model precision on GPU "
                                                       "(hf: bf16 also on CPU)")
    num_gpus: Optional[float] = Field(None, ge=0, description="GPU per actor (null: a fraction when GPUs exist)")

    @model_validator(mode="after")
    def _hf_model_path(self):
        return _hf_needs_model_path(self, "text")


class FeaturesConfig(Strict):
    """Per-modality feature extractors."""
    image: ImageFeatures = ImageFeatures()
    audio: AudioFeatures = AudioFeatures()
    text: TextFeatures = TextFeatures()
    batch_size: int = Field(64, ge=1, description="rows per batch in CPU stages")
    gpu_shape: Literal["fused", "split"] = Field(
        "fused", description="a model extractor (cnn, sentence, hf) on GPU. fused: each unit worker decodes and embeds "
        "on its GPU share; split: CPU workers decode, one actor per GPU embeds (GPU nodes short of CPUs; "
        "docs/data-path.md). Same output either way")


def feature_config(modality: str, spec: dict | None = None):
    """The ``features.<modality>`` config (its class is the field's type in :class:`FeaturesConfig`)
    validated from ``spec``; its defaults when ``spec`` is None."""
    return FeaturesConfig.model_fields[modality].annotation.model_validate(spec or {})


class PairingConfig(Strict):
    """How rows of several datasets become one multimodal sample."""
    by: Literal["none", "key", "label"] = Field("none", description="none: one sample per row; key: join on "
                                                "`key`; label: pair rows of the same label (AV-MNIST style)")
    key: str = Field("sample_id", description="join column for by: key")
    seed: int = Field(0, description="seed of the label pairing")
    primary: Optional[str] = Field(None, description="dataset whose rows define the samples (null: the first)")


class FusionConfig(Strict):
    """How per-modality features become the `fused` column."""
    method: Literal["concat", "weighted"] = Field("concat", description="concat: concatenate; weighted: project "
                                                  "each modality to `dim` and sum with `weights`")
    dim: int = Field(256, ge=1, description="common size for weighted")
    weights: dict[Modality, float] = Field(default_factory=lambda: {m: 1.0 for m in MODALITIES},
                                           description="per-modality weights for weighted")
    seed: int = Field(0, description="seed of the weighted projections")


class OutputConfig(Strict):
    """Where preprocess writes the fused feature Parquet."""
    path: str = Field("out/features", description="fused feature folder (local path or s3://, gs://)")
    row_group_size: int = Field(4096, ge=1, description="Parquet rows per row group")


class EncodersConfig(Strict):
    """Per-modality encoders of `mmbatch train`: frozen (the features as stored) or learned end to end."""
    image: Literal["frozen", "cnn"] = Field("frozen", description="frozen: the image embedding as stored; "
                                            "cnn: a small CNN trained end to end on features.image.extractor: pixels")
    audio: Literal["frozen", "lstm"] = Field("frozen", description="lstm: an LSTM over "
                                             "features.audio.extractor: logmel_frames, trained end to end")
    text: Literal["frozen", "lstm"] = Field("frozen", description="lstm: word embeddings + an LSTM over "
                                            "features.text.extractor: tokens, trained end to end")
    hidden: int = Field(64, ge=1, description="LSTM size and CNN output size")


class TrainConfig(Strict):
    """`mmbatch train`: the fusion model, its baselines and the Ray Train run."""
    data: Optional[str] = Field(None, description="fused Parquet to train on (null: output.path)")
    out: Optional[str] = Field(None, description="checkpoints, model and report go to <out>/<name> (null: a "
                               "`train` folder next to the training data, e.g. out/features -> out/train)")
    name: str = Field("fusion", description="run name: the run folder under out, and the prefix of the baselines' "
                      "runs (<name>-only-<modality>)")
    model: Literal["early", "weighted", "late", "gated"] = Field("early", description="fusion architecture")

    @field_validator("name")
    @classmethod
    def _plain(cls, v):
        return plain_name(v)

    modalities: Optional[list[Modality]] = Field(None, description="modalities to train on (null: all in the data)")
    baselines: bool = Field(False, description="also train each modality alone and compare (same as --baselines)")
    hidden: int = Field(128, ge=1, description="hidden layer size")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout")
    modality_dropout: float = Field(0.2, ge=0, lt=1, description="chance of hiding each modality in a training row")
    epochs: int = Field(10, ge=1, description="epochs")
    batch_size: int = Field(64, ge=1, description="global batch size")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adamw", description="optimizer")
    lr: float = Field(3e-3, gt=0, description="learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    schedule: Literal["none", "cosine", "step"] = Field("cosine", description="learning-rate schedule")
    early_stopping_patience: Optional[int] = Field(None, ge=1, description="stop after this many epochs without "
                                                   "a better validation score (null: never)")
    metric: Literal["accuracy", "macro_f1", "loss"] = Field("accuracy", description="validation metric that picks "
                                                            "the best checkpoint")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data parallel)")
    use_gpu: Literal["auto", True, False] = Field("auto", description="auto: when the cluster has GPUs")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per worker (fractional leaves CPUs to Ray Data)")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from (from the last checkpoint)")
    seed: int = Field(0, description="seed of the initialisation and the batches (the split's seed is "
                      "splits.seed)")
    encoders: EncodersConfig = EncodersConfig()
    exclude: Optional[str] = Field(None, description="Parquet or CSV file with a sample_id column (e.g. the "
                                   "issues.parquet of `mmbatch audit`): those rows are left out of the train and "
                                   "validation splits, never the test split; part of the run's fingerprint")


class AuditConfig(Strict):
    """`mmbatch audit`: cross-validated models on the fused features find label errors and mismatched pairs
    (docs/audit.md)."""
    folds: int = Field(5, ge=2, le=20, description="cross-validation folds; every row is scored by the models "
                       "that did not see it")
    epochs: int = Field(15, ge=1, description="training epochs of each fold's models")
    hidden: int = Field(64, ge=1, description="hidden layer size of each fold's models")
    modalities: Optional[list[Modality]] = Field(None, description="modalities to audit, each alone and fused "
                                                 "(null: all in the data)")
    splits: list[Literal["train", "validation", "test"]] = Field(
        ["train", "validation", "test"], min_length=1, description="splits whose rows are audited (and trained on "
        "across folds)")
    min_odds: float = Field(30.0, ge=1, description="a mismatched pair: the modality finds its class at least this "
                            "many times likelier than the given label (out-of-fold probabilities; docs/audit.md)")
    cpus_per_task: float = Field(0.5, gt=0, description="CPUs each fold task asks Ray for (fractional on "
                                 "small machines)")
    seed: int = Field(0, description="seed of the folds and the models")
    out: Optional[str] = Field(None, description="audit folder of `mmbatch retrain` (null: an `audit` folder next to "
                               "the training data); `mmbatch audit` takes --out")


class SplitsConfig(Strict):
    """Which rows are train, validation and test: decided by `mmbatch preprocess` (the fused `split` column is
    final), read as is by train, evaluate and retrain."""
    seed: int = Field(0, description="seed of the carving: rows without a split value, and a missing "
                      "validation or test split, are carved by a hash of seed:sample_id")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="validation share, used when the data has no "
                                "validation split")
    test_fraction: float = Field(0.15, ge=0, lt=1, description="test share, used when the data has no test split")


# train settings that do not change what is learned (where it runs and is written): a training run
# that differs only in these resumes, and retrain's candidate fingerprint leaves them out
NOT_LEARNING = frozenset({"out", "name", "data", "baselines", "num_workers", "use_gpu", "cpus_per_worker",
                          "max_failures"})


class RetrainConfig(Strict):
    """`mmbatch retrain`: one cycle of preprocess, train, compare, promote."""
    registry: str = Field("out/registry", description="model registry folder (local path or s3://, gs://)")
    margin: float = Field(0.0, description="a candidate must beat the champion by this much to be promoted")
    metric: Literal["accuracy", "macro_f1"] = Field("accuracy", description="test metric of the comparison")
    warm_start: bool = Field(False, description="start the candidate from the champion's weights")
    force_train: bool = Field(False, description="train even when no data changed")
    audit: Literal["off", "report", "exclude"] = Field(
        "off", description="off; report: run `mmbatch audit` on the new features before training (audit.out); "
        "exclude: also train the candidate without the flagged train/validation rows (train.exclude)")


class DedupConfig(Strict):
    """Duplicates between splits, checked before preprocessing (docs/duplicates.md)."""
    leakage: Literal["off", "report", "quarantine"] = Field(
        "off", description="off; report: count validation/test rows that duplicate a train row (summary and "
        "_manifest.json); quarantine: also quarantine them (reason duplicate_of_train:<modality>:<train id>)")
    thresholds: dict[Literal["image", "audio", "text"], float] = Field(
        default_factory=dict, description="near-duplicate score threshold per modality, in [-1, 1], e.g. "
        "`{image: 0.9}` (unset: the defaults of docs/duplicates.md; also `mmbatch duplicates --threshold`)")

    @field_validator("thresholds")
    @classmethod
    def _thresholds_in_range(cls, v):
        for m, t in v.items():
            if not -1.0 <= t <= 1.0:
                raise ValueError(f"dedup.thresholds.{m}: {t} is outside [-1, 1]")
        return v


class Workflow(Strict):
    """A complete mmbatch run."""
    name: str = Field("mmbatch", description="workflow name (recorded with outputs and models)")
    description: str = Field("", description="free text")
    ray: RayConfig = RayConfig()
    datasets: list[DatasetConfig] = Field(default_factory=list, description="ingested datasets to preprocess")
    features: FeaturesConfig = FeaturesConfig()
    pairing: PairingConfig = PairingConfig()
    fusion: FusionConfig = FusionConfig()
    output: OutputConfig = OutputConfig()
    splits: SplitsConfig = SplitsConfig()
    train: TrainConfig = TrainConfig()
    retrain: RetrainConfig = RetrainConfig()
    dedup: DedupConfig = DedupConfig()
    audit: AuditConfig = AuditConfig()
    storage: dict[str, dict[str, Any]] = Field(
        default_factory=dict, exclude=True, repr=False,
        description="fsspec options per scheme, e.g. `{s3: {endpoint_url: http://host:9000, profile: x}}` "
        "(null: the standard environment: AWS_* variables, AWS_ENDPOINT_URL, profiles, GOOGLE_APPLICATION_"
        "CREDENTIALS); never written to outputs, models or the registry (docs/object-storage.md)")

    @field_validator("storage")
    @classmethod
    def _known_schemes(cls, v):
        import fsspec

        bad = sorted(set(v) - set(fsspec.available_protocols()))
        if bad:
            raise ValueError(f"unknown storage scheme(s) {bad}: use fsspec protocol names such as s3, gs, gcs")
        return v

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

    def train_record(self) -> dict:
        """``train`` as model specs and fingerprints record it: its settings plus the split fractions, which
        were ``train`` keys before the ``splits`` section (kept there so no fingerprint changes)."""
        rec = {**self.train.model_dump(mode="json"), "val_fraction": self.splits.val_fraction,
               "test_fraction": self.splits.test_fraction}
        if rec["exclude"] is None:       # unset: the record (and every fingerprint of it) as before the key
            del rec["exclude"]
        return rec

    def audit_out(self) -> str:
        """The audit folder of `mmbatch retrain`: ``audit.out``, else ``audit`` next to the training data."""
        if self.audit.out:
            return self.audit.out
        return default_train_out(self.train_data()).rsplit("train", 1)[0] + "audit"


# --- loading -----------------------------------------------------------------------
def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model that holds the key at ``loc`` (e.g. ('train', 'epochz') -> TrainConfig)."""
    model: Any = Workflow
    for part in loc[:-1]:
        if isinstance(part, int):
            continue                                   # a list item: the model is the list's item type
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _inner_model(field.annotation)
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _inner_model(annotation: Any) -> Optional[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):                   # list[DatasetConfig], Optional[...]
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def unknown_key_message(loc: tuple) -> str:
    key = ".".join(str(p) for p in loc)
    model = _model_at(loc)
    if model is None:
        return f"unknown key '{key}'"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    section = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int)) or "the top level"
    return (f"unknown key '{key}': {hint}allowed keys in {section}: {', '.join(allowed)} "
            "(docs/workflow-reference.md)")


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(unknown_key_message(tuple(e["loc"])))
            continue
        msg = e["msg"]
        got = e.get("input")
        if _is_secret(e["loc"]):                        # options may hold credentials: never echo them
            got = sorted(got) if isinstance(got, dict) else "(not shown)"
        lines.append(f"key '{key}': {msg} (got {got!r})")
    return "invalid workflow:\n  " + "\n  ".join(lines)


def parse_override(expr: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], parsed value). Values are YAML (numbers, lists, null)."""
    if "=" not in expr:
        shown = "(not shown)" if _is_secret(expr.strip().split(".")) else repr(expr)
        raise WorkflowError(f"--set expects key.sub=value, got {shown}")
    key, raw = expr.split("=", 1)
    if not key.strip():
        raise WorkflowError("--set has an empty key (=VALUE with nothing before the =)")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        shown = "(not shown)" if _is_secret(key.strip().split(".")) else repr(raw)
        raise WorkflowError(f"--set {key}: value {shown} is not valid YAML: {yaml_problem(e)}") from None
    return key.strip().split("."), value


def _is_secret(loc) -> bool:
    """Values under ``storage`` may be credentials: no message shows them."""
    return bool(loc) and loc[0] == "storage"


def yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong and where (line, column), without PyYAML's snippet of the text: the line it quotes
    may hold a credential (a ``storage`` option)."""
    mark = getattr(e, "problem_mark", None)
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    if mark is None:
        return what or type(e).__name__
    return f"line {mark.line + 1}, column {mark.column + 1}: {what or type(e).__name__}"


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
    """Validate a workflow. With ``base_dir``, relative paths (except those given by ``overrides``,
    which stay relative to the current folder, as typed) are made relative to ``base_dir``."""
    data = move_split_keys(apply_overrides(data or {}, overrides))
    try:
        wf = Workflow.model_validate(data)
    except ValidationError as e:
        raise WorkflowError(_format_error(e)) from None
    from mmbatch.engine import storage
    storage.configure(wf.storage)      # valid: every filesystem this process makes from now on gets these options
    if base_dir is not None:
        overridden = {".".join(parse_override(o)[0]) for o in overrides or []}
        _resolve_paths(wf, Path(base_dir), skip=overridden)
    if wf.train.out is None:
        wf.train.out = default_train_out(wf.train_data())
    return wf


def move_split_keys(data: dict) -> dict:
    """Map the deprecated ``train.val_fraction`` / ``train.test_fraction`` into ``splits`` (one warning
    each); both set differently is an error naming both. ``train.seed`` stays the training seed and, when
    ``splits.seed`` is not set, also seeds the split, as it did before the ``splits`` section."""
    train, splits = data.get("train"), data.get("splits")
    if not isinstance(train, dict) or (splits is not None and not isinstance(splits, dict)):
        return data                                    # not mappings: validation names the problem
    data = {**data, "train": dict(train), "splits": dict(splits or {})}
    train, splits = data["train"], data["splits"]
    for key in ("val_fraction", "test_fraction"):
        if key not in train:
            continue
        old = train.pop(key)
        if key in splits and splits[key] != old:
            raise WorkflowError(f"train.{key} ({old!r}) and splits.{key} ({splits[key]!r}) disagree: set only "
                                f"splits.{key} (train.{key} is its deprecated name)")
        splits[key] = old
        log.warning("train.%s is deprecated: use splits.%s (read as splits.%s=%r)", key, key, key, old)
    if "seed" in train and "seed" not in splits:
        splits["seed"] = train["seed"]
        log.warning("train.seed also seeds the split (splits.seed=%r), as before the splits section; set "
                    "splits.seed to choose the split's seed (train.seed then seeds only the training)",
                    train["seed"])
    return data


def default_train_out(train_data: str) -> str:
    """``train.out`` when not set: a ``train`` folder next to the training data."""
    parent = train_data.rstrip("/").rsplit("/", 1)[0] if "/" in train_data.rstrip("/") else "."
    return f"{parent}/train" if parent != "." else "train"


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> Workflow:
    """Read, override and validate a workflow YAML (safe loader only). Relative paths in the file
    (and the default paths) are relative to the file's folder; paths given with --set stay as typed."""
    p = Path(path)
    if not p.is_file():
        raise WorkflowError(f"workflow file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise WorkflowError(f"{p}: not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{p}: top level must be a mapping of keys, got {type(data).__name__}")
    return workflow_from_dict(data, overrides, base_dir=p.resolve().parent)


def _resolve_paths(wf: Workflow, base: Path, skip: set[str] = frozenset()) -> None:
    """Make relative local paths relative to ``base`` (the workflow file's folder), except keys in ``skip``."""
    def fix(key: str, p: str | None) -> str | None:
        if p is None or key in skip or "://" in p or Path(p).is_absolute():
            return p
        return str(base / p)
    for i, d in enumerate(wf.datasets):
        d.path = fix(f"datasets.{i}.path", d.path)
    wf.output.path = fix("output.path", wf.output.path)
    wf.train.out = fix("train.out", wf.train.out)
    wf.train.data = fix("train.data", wf.train.data)
    wf.train.exclude = fix("train.exclude", wf.train.exclude)
    wf.audit.out = fix("audit.out", wf.audit.out)
    wf.retrain.registry = fix("retrain.registry", wf.retrain.registry)
    for m in ("image", "audio"):
        feats = getattr(wf.features, m)
        feats.weights = fix(f"features.{m}.weights", feats.weights)
    wf.features.text.model_path = fix("features.text.model_path", wf.features.text.model_path)


def dump_workflow(wf: Workflow) -> str:
    return yaml.safe_dump(wf.model_dump(mode="json"), sort_keys=False)


# --- the workflow reference (docs/workflow-reference.md) ---------------------------------------
REFERENCE_START = "<!-- workflow-reference: generated by `python -m mmbatch.config --reference`; do not edit -->"
REFERENCE_END = "<!-- end of workflow-reference -->"
REFERENCE_DOC = Path(__file__).resolve().parents[1] / "docs" / "workflow-reference.md"   # where the table lives


def _yaml_value(v: Any) -> str:
    if isinstance(v, tuple):
        v = list(v)
    return yaml.safe_dump(v, default_flow_style=True, width=1000, sort_keys=False).strip().removesuffix("...").strip()


def _allowed(field) -> str:
    literal = [a for a in _literal_args(field.annotation)]
    parts = []
    if literal:
        parts.append(" \\| ".join(_yaml_value(a) for a in literal))
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sign} {getattr(m, attr)}")
    return ", ".join(parts)


def _literal_args(annotation: Any) -> list:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    out = []
    for a in get_args(annotation):
        if get_origin(a) is Literal:
            out += list(get_args(a))
    return out


def _reference_rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = _inner_model(field.annotation)
        if inner is not None:
            is_list = get_origin(field.annotation) is list
            if is_list:
                rows.append((key, "[]", "", field.description or ""))
            rows += _reference_rows(inner, f"{key}[]." if is_list else f"{key}.")
            continue
        if field.is_required():
            default = "(required)"
        else:
            default = _yaml_value(field.get_default(call_default_factory=True))
        rows.append((key, default, _allowed(field), field.description or ""))
    return rows


def workflow_reference() -> str:
    """The workflow reference table (docs/workflow-reference.md): every key with its default, from the models above."""
    lines = [REFERENCE_START, "", "| key | default | allowed | meaning |", "|---|---|---|---|"]
    for key, default, allowed, meaning in _reference_rows(Workflow, ""):
        lines.append(f"| `{key}` | `{default}` | {allowed} | {meaning} |")
    lines += ["", REFERENCE_END]
    return "\n".join(lines)


def update_reference(doc: Path = REFERENCE_DOC) -> bool:
    """Rewrite the generated reference between the markers in ``doc``; True when it changed."""
    text = doc.read_text()
    a, b = text.index(REFERENCE_START), text.index(REFERENCE_END) + len(REFERENCE_END)
    new = text[:a] + workflow_reference() + text[b:]
    if new != text:
        doc.write_text(new)
    return new != text


if __name__ == "__main__":   # python -m mmbatch.config --reference | --update [docs/workflow-reference.md]
    import argparse
    ap = argparse.ArgumentParser(prog="python -m mmbatch.config",
                                 description="print or update the workflow reference (docs/workflow-reference.md)")
    ap.add_argument("--reference", action="store_true", help="print the workflow reference (Markdown)")
    ap.add_argument("--update", metavar="FILE", nargs="?", const=str(REFERENCE_DOC),
                    help="rewrite the generated section of FILE (default: docs/workflow-reference.md)")
    a = ap.parse_args()
    if a.update:
        print("updated" if update_reference(Path(a.update)) else "already up to date")
    else:
        print(workflow_reference())
