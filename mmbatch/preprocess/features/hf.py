"""Pretrained Hugging Face ``transformers`` encoders from a model folder (``extractor: hf``, ``hf_frames``).

``model_path`` is a folder that ``save_pretrained`` wrote (config, weights, and the image processor,
feature extractor or tokenizer); a local path, or an ``s3://`` / ``gs://`` URI that each worker
process copies once to a local cache (``$TMPDIR/mmbatch-hf/<signature>``). Nothing is ever
downloaded: ``HF_HUB_OFFLINE=1`` and ``local_files_only=True``; a missing or incomplete folder is
refused with one line naming it and how to make one (:func:`check_folder`).

| modality | model                                   | input                         | embedding                        |
|----------|-----------------------------------------|-------------------------------|----------------------------------|
| image    | CLIP / SigLIP folder: its vision tower  | PIL decode -> AutoImageProcessor (PIL backend) | the tower's pooled (projected) output |
| image    | ViT, DINOv2, ConvNeXt, ... (AutoModel)  | same                          | ``pooler_output`` or the CLS token (``pooling``) |
| audio    | wav2vec 2.0, HuBERT, WavLM; Whisper's encoder | mono clip at the feature extractor's rate -> AutoFeatureExtractor | mean over the clip's frames of the last hidden state, or of hidden layer ``layer`` |
| audio    | same, ``hf_frames``                     | same                          | the frames themselves (sequence column ``audio_frames``) |
| text     | BERT-family (AutoModel)                 | AutoTokenizer (truncated to the model's positions) | mean over the tokens (attention mask) |
| text     | CLIP / SigLIP folder: its text tower    | same (SigLIP: padded to its length) | the tower's pooled (projected) output: the image tower's space |

Frames of a padded clip are left out of the mean (wav2vec 2.0 family: the model's own output
lengths; Whisper: every second mel frame of the feature extractor's mask). The attention mask is
given to a speech model only when its feature extractor asks for one (``return_attention_mask``),
as transformers documents; wav2vec2-base-style models then see zero padding, so their output
depends on the clips batched together, as in any transformers loop: mmbatch and
``mmbatch.data.Embed`` batch the same rows the same way (``features.batch_size``, then the
modality's ``batch_size``).

``precision``: fp16/bf16 run under ``torch.autocast`` on CUDA; on CPU bf16 uses CPU autocast and
fp16 runs fp32. The folder's content digest (``mmbatch.engine.provenance.content_digest``) is in
``params()`` (``model_sha256``), hence in every unit's fingerprint and the output metadata.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from typing import Any, Optional, Sequence

import numpy as np

from mmbatch import media
from mmbatch.engine import storage
from mmbatch.errors import UsageError
from mmbatch.preprocess.features.audio import AudioExtractor, FrameParams
from mmbatch.preprocess.features.base import Decoded, Error, Extractor, precision_autocast
from mmbatch.preprocess.features.image import media_bytes
from mmbatch.preprocess.features.text import TextExtractor, normalize_light

log = logging.getLogger("mmbatch.preprocess.features.hf")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# what each modality needs besides config.json and weights: (files, one of which must exist; the class that saves them)
INPUT_FILES = {
    "image": (("preprocessor_config.json",), "AutoImageProcessor"),
    "audio": (("preprocessor_config.json",), "AutoFeatureExtractor"),
    "text": (("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json"), "AutoTokenizer"),
}
DUAL_TOWERS = ("clip", "siglip")      # image + text models: image uses the vision tower, text the text tower
POOLINGS = ("pooler", "cls")


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"          # never download
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()           # no "Loading weights" bar per worker


# --- the folder ----------------------------------------------------------------------------------
def check_folder(uri: str, modality: str) -> None:
    """Refuse a missing or incomplete model folder with one line naming it and how to make one."""
    key = f"features.{modality}.model_path"
    if not uri:
        raise UsageError(f"{key}: extractor hf needs model_path, a folder written by save_pretrained "
                         "(models are never downloaded)")
    fs, path = storage.url_to_fs(uri)
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)} if fs.isdir(path) else None
    inputs, saver = INPUT_FILES[modality]
    how = (f"make one where the model can be downloaded: AutoModel.from_pretrained(NAME).save_pretrained(DIR) "
           f"and {saver}.from_pretrained(NAME).save_pretrained(DIR), then copy DIR there (docs/pretrained-encoders.md)")
    if names is None:
        raise UsageError(f"{key}: {uri} is not a folder (models are never downloaded); {how}")
    missing = [what for what, ok in (("config.json", "config.json" in names),
                                     (" or ".join(WEIGHT_FILES[::2]), any(w in names for w in WEIGHT_FILES)),
                                     (" or ".join(inputs), any(f in names for f in inputs))) if not ok]
    if missing:
        raise UsageError(f"{key}: {uri} has no {', no '.join(missing)}: not a complete model folder; {how}")


_LOCAL: dict[str, str] = {}


def local_folder(uri: str) -> str:
    """A local path of the model folder: ``uri`` itself, or a copy made once per process (and kept
    on this machine's disk, named by the remote files' signature, for the next process)."""
    from mmbatch.engine.provenance import weights_signature

    fs, path = storage.url_to_fs(uri)
    if storage.is_local(fs):
        return path
    key = storage.fingerprint(weights_signature({"model_path": uri}))
    if key in _LOCAL:
        return _LOCAL[key]
    root = os.path.join(tempfile.gettempdir(), "mmbatch-hf")
    dest = os.path.join(root, key[:32])
    if not os.path.isfile(os.path.join(dest, ".complete")):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".copy-", dir=root)
        for f in fs.find(path):
            rel = f[len(path.rstrip("/")) + 1:]
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)) or tmp, exist_ok=True)
            fs.get(f, os.path.join(tmp, rel))
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, dest)
        except OSError:                 # another worker on this machine finished first: use its copy
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    _LOCAL[key] = dest
    return dest


def read_config(uri: str):
    """The folder's ``config.json`` as a transformers config object (no weights read)."""
    from transformers import AutoConfig

    d = json.loads(storage.read_bytes(storage.join(uri, "config.json")))
    if "model_type" not in d:
        raise UsageError(f"{uri}/config.json has no model_type: not a transformers model folder")
    return AutoConfig.for_model(d.pop("model_type"), **d)


def output_dim(cfg, modality: str) -> int:
    """The embedding size (frame size for audio) of ``modality`` from a model's config."""
    kind = cfg.model_type
    if kind == "clip":
        return int(cfg.projection_dim)
    if kind == "siglip":
        sub = cfg.vision_config if modality == "image" else cfg.text_config
        return int(getattr(sub, "projection_size", None) or sub.hidden_size) if modality == "text" \
            else int(sub.hidden_size)
    if kind == "whisper":
        return int(cfg.d_model)
    sizes = getattr(cfg, "hidden_sizes", None)
    if getattr(cfg, "hidden_size", None) is None and sizes:
        return int(sizes[-1])           # ConvNeXt-style: the last stage's channels
    return int(cfg.hidden_size)


def num_layers(cfg) -> int:
    return int(cfg.encoder_layers if cfg.model_type == "whisper" else cfg.num_hidden_layers)


# --- the model, shared by the three modalities ------------------------------------------------------
class HFEncoder:
    """Mixin: model folder, lazy load (once per worker), device, precision, params."""
    needs_model = True
    version = "1"

    def _setup(self, model_path: Optional[str], batch_size: int, precision: str, device: str) -> None:
        import torch  # noqa: F401  (imported first so that pin_threads also pins torch)

        from mmbatch.engine.runtime import pin_threads

        pin_threads()
        check_folder(model_path, self.modality)
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"features.{self.modality}.precision must be fp32, fp16 or bf16, got {precision!r}")
        self.model_path, self.batch_size, self.precision = str(model_path), int(batch_size), precision
        self.device = str(device)
        self.config = read_config(self.model_path)
        self.model_type = self.config.model_type
        self._model = self._inputs = None
        self._warned_fp16 = False

    def model_params(self) -> dict:
        from mmbatch.engine.provenance import content_digest

        return {"model_path": self.model_path, "model": self.model_path.rstrip("/").rsplit("/", 1)[-1],
                "model_type": self.model_type, "architectures": list(self.config.architectures or []),
                "model_sha256": content_digest(self.model_path), "precision": self.precision,
                "library": "transformers"}

    def _load(self):
        """(model on self.device in eval mode, its input processor), loaded once."""
        if self._model is None:
            _offline()
            from transformers import AutoModel

            folder = local_folder(self.model_path)
            self._inputs = self._inputs or self._load_inputs(folder)
            model = AutoModel.from_pretrained(folder, local_files_only=True, dtype="float32")
            self._model = self._tower(model).to(self.device).eval()
        return self._model, self._inputs

    def _tower(self, model):
        return model

    def _processor(self):
        """The input processor alone (a split shape's decode worker never loads the model)."""
        if self._inputs is None:
            _offline()
            self._inputs = self._load_inputs(local_folder(self.model_path))
        return self._inputs

    def to(self, device: str):
        self.device = str(device)
        if self._model is not None:
            self._model = self._model.to(self.device)
        else:
            self._load()
        return self

    def _autocast(self):
        return precision_autocast(self.device, self.precision, self._warn_fp16)

    def _warn_fp16(self, dev: str) -> None:
        if not self._warned_fp16:
            log.warning("%s hf: fp16 is not used on %s; running fp32", self.modality, dev)
            self._warned_fp16 = True

    def _batches(self, n: int):
        return (slice(i, min(n, i + self.batch_size)) for i in range(0, n, self.batch_size))


def _pil_rgb(data) -> Any:
    from PIL import Image

    raw = media_bytes(data)
    media.probe_image(raw)          # refuses empty / non-image / decompression bombs before decoding
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except Exception as e:
        raise media.MediaError("corrupt_image", f"{type(e).__name__}: {e}") from None


# --- image ---------------------------------------------------------------------------------------
class HFImageExtractor(HFEncoder, Extractor):
    """A transformers vision model's embedding. Decode (CPU): PIL decode to RGB (as transformers'
    examples do) and the folder's image processor (PIL backend: the same pixels on every machine),
    giving each row's ``pixel_values``; encode: the model in batches of ``batch_size``."""
    modality = "image"
    name = "hf"

    def __init__(self, model_path: Optional[str] = None, pooling: str = "pooler", batch_size: int = 64,
                 precision: str = "fp32", device: str = "cpu"):
        self._setup(model_path, batch_size, precision, device)
        if pooling not in POOLINGS:
            raise ValueError(f"features.image.pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if pooling == "cls" and (self.model_type in DUAL_TOWERS or getattr(self.config, "hidden_size", None) is None):
            raise UsageError(f"features.image.pooling: cls needs a transformer with a CLS token; {self.model_path} "
                             f"is a {self.model_type} model: use pooling: pooler")
        self.pooling = pooling
        self.dim = output_dim(self.config, "image")

    def params(self) -> dict:
        return {**self.model_params(), "decode": "PIL convert(RGB)", "processor": "AutoImageProcessor(backend=pil)",
                "output": f"{self.model_type}_vision_tower" if self.model_type in DUAL_TOWERS else self.pooling}

    def _load_inputs(self, folder: str):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil")

    def decode(self, items: Sequence[Any]) -> Decoded:
        values: list[Any] = [None] * len(items)
        errors: list[Error] = [None] * len(items)
        images = {}
        for i, item in enumerate(items):
            try:
                images[i] = _pil_rgb(item)
            except media.MediaError as e:
                errors[i] = (e.reason, e.detail)
        if images:
            processor = self._processor()
            for i, img in images.items():
                try:
                    values[i] = processor(images=img, return_tensors="np")["pixel_values"][0]
                except Exception as e:        # an image the processor refuses (e.g. a 1 px side)
                    errors[i] = ("image_processor", f"{type(e).__name__}: {e}")
        return Decoded(values, errors)


    def encode(self, values: Sequence[Any]) -> np.ndarray:
        import torch

        out = np.zeros((len(values), self.dim), np.float32)
        if not len(values):
            return out
        model, _ = self._load()
        with torch.inference_mode():
            for s in self._batches(len(values)):
                x = torch.from_numpy(np.stack(values[s]).astype(np.float32)).to(self.device)
                with self._autocast():
                    out[s] = self._forward(model, x).float().cpu().numpy()
        return out

    def _forward(self, model, x):
        if self.model_type in DUAL_TOWERS:
            return model.get_image_features(pixel_values=x).pooler_output
        res = model(pixel_values=x)
        if self.pooling == "cls":
            return res.last_hidden_state[:, 0]
        if getattr(res, "pooler_output", None) is None:
            raise UsageError(f"{self.model_path}: the {self.model_type} model has no pooled output; "
                             "set features.image.pooling: cls")
        return res.pooler_output.reshape(len(x), -1)


# --- audio ---------------------------------------------------------------------------------------
class HFAudioExtractor(HFEncoder, AudioExtractor):
    """A speech encoder's hidden states (last, or ``layer``; 0 is the transformer's input), averaged
    over the clip's frames. Decode: mono at the feature extractor's sampling rate, clipped to
    ``max_seconds``, zero-padded to 25 ms; encode: the feature extractor and the model per batch."""
    name = "hf"

    def __init__(self, model_path: Optional[str] = None, layer: Optional[int] = None,
                 max_seconds: Optional[float] = 30.0, batch_size: int = 32, precision: str = "fp32",
                 device: str = "cpu"):
        self._setup(model_path, batch_size, precision, device)
        n = num_layers(self.config)
        if layer is not None and not -(n + 1) <= int(layer) <= n:
            raise UsageError(f"features.audio.layer: {layer} is not a layer of {self.model_path} (a "
                             f"{self.model_type} model with {n} layers: 0..{n}, or -{n + 1}..-1)")
        self.layer = None if layer is None else int(layer)
        pre = json.loads(storage.read_bytes(storage.join(self.model_path, "preprocessor_config.json")))
        sr = int(pre.get("sampling_rate") or 16000)
        AudioExtractor.__init__(self, FrameParams.from_ms(sr, 25.0, 10.0, 80, 0, 0.0, None), max_seconds)
        self.dim = output_dim(self.config, "audio")

    def params(self) -> dict:
        return {**self.model_params(), "mono": "mean_of_channels", "resample": "soxr HQ",
                "sample_rate": self.p.sample_rate, "max_seconds": self.max_seconds,
                "short_audio": "zero_pad_to_25ms", "processor": "AutoFeatureExtractor",
                "layer": "last" if self.layer is None else self.layer, "output": "mean_over_frames"}

    def _load_inputs(self, folder: str):
        from transformers import AutoFeatureExtractor

        return AutoFeatureExtractor.from_pretrained(folder, local_files_only=True)

    def _tower(self, model):
        return model.get_encoder() if self.model_type == "whisper" else model

    def hidden(self, clips: Sequence[np.ndarray]):
        """(hidden states [b, T, d] of the chosen layer, frame mask [b, T] bool) of one batch."""
        import torch

        model, fe = self._load()
        sr, want = self.p.sample_rate, self.layer is not None
        feats = fe(list(clips), sampling_rate=sr, padding="max_length" if self.model_type == "whisper" else True,
                   return_attention_mask=True, return_tensors="pt")
        mask = feats["attention_mask"].to(self.device)
        with self._autocast():
            if self.model_type == "whisper":
                res = model(feats["input_features"].to(self.device), output_hidden_states=want)
                frames = mask[:, ::2].bool()
            else:
                kw = {"attention_mask": mask} if getattr(fe, "return_attention_mask", False) else {}
                res = model(feats["input_values"].to(self.device), output_hidden_states=want, **kw)
                lengths = model._get_feat_extract_output_lengths(mask.sum(-1))
                T = res.last_hidden_state.shape[1]
                frames = torch.arange(T, device=mask.device)[None, :] < lengths[:, None]
        h = res.last_hidden_state if self.layer is None else res.hidden_states[self.layer]
        return h.float(), frames[:, :h.shape[1]]

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        import torch

        out = np.zeros((len(values), self.dim), np.float32)
        with torch.inference_mode():
            for s in self._batches(len(values)):
                h, frames = self.hidden(values[s])
                m = frames.unsqueeze(-1).to(h.dtype)
                out[s] = ((h * m).sum(1) / m.sum(1).clamp(min=1.0)).cpu().numpy()
        return out


class HFFramesExtractor(HFAudioExtractor):
    """The speech encoder's frames themselves (``hf_frames``), time first: float32
    [min(frames, max_frames), hidden size], stored like ``logmel_frames`` (column ``audio_frames``,
    true length in ``audio_len``) for ``train.encoders.audio: lstm``."""
    name = "hf_frames"
    sequence = True

    def __init__(self, model_path: Optional[str] = None, layer: Optional[int] = None,
                 max_seconds: Optional[float] = 30.0, max_frames: int = 100, batch_size: int = 32,
                 precision: str = "fp32", device: str = "cpu"):
        super().__init__(model_path, layer, max_seconds, batch_size, precision, device)
        self.frame_dim, self.max_frames = self.dim, int(max_frames)
        self.dim = self.max_frames * self.frame_dim

    def params(self) -> dict:
        return {**super().params(), "output": "frames", "frame_dim": self.frame_dim, "max_frames": self.max_frames,
                "layout": "frames_x_hidden"}

    def empty_rows(self, n: int) -> np.ndarray:
        return np.full(n, None, dtype=object)

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        import torch

        out = self.empty_rows(len(values))
        with torch.inference_mode():
            for s in self._batches(len(values)):
                h, frames = self.hidden(values[s])
                h, n = h.cpu().numpy(), frames.sum(1).cpu().numpy()
                for k, i in enumerate(range(*s.indices(len(values)))):
                    out[i] = np.ascontiguousarray(h[k, :min(int(n[k]), self.max_frames)], np.float32)
        return out

    def fields(self):
        from mmbatch import schema

        return schema.sequence_fields("audio", self.params())

    def to_arrow(self, values: np.ndarray, present: np.ndarray):
        from mmbatch.preprocess.features.sequence import sequence_columns

        return sequence_columns("audio", values, present, self.fields())


# --- text ----------------------------------------------------------------------------------------
class HFTextExtractor(HFEncoder, TextExtractor):
    """A transformers text model's token states averaged over the attention mask; with a CLIP or
    SigLIP folder, its text tower's pooled (projected) output, in the image tower's space. Text is
    given after NFKC and whitespace collapsing only (the tokenizer is trained on case and punctuation)."""
    name = "hf"
    normalization = "nfkc_ws"
    _normalize = staticmethod(normalize_light)

    def __init__(self, model_path: Optional[str] = None, batch_size: int = 64, precision: str = "fp32",
                 device: str = "cpu"):
        self._setup(model_path, batch_size, precision, device)
        sub = getattr(self.config, "text_config", None) if self.model_type in DUAL_TOWERS else self.config
        self.max_length = int(getattr(sub, "max_position_embeddings", None) or 512)
        self.dim = output_dim(self.config, "text")

    def params(self) -> dict:
        return {**self.model_params(), "normalize": self.normalization, "processor": "AutoTokenizer",
                "max_length": self.max_length, "padding": "max_length" if self.model_type == "siglip" else "longest",
                "output": f"{self.model_type}_text_tower" if self.model_type in DUAL_TOWERS else "mean_over_tokens"}

    def _load_inputs(self, folder: str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        import torch

        out = np.zeros((len(values), self.dim), np.float32)
        if not len(values):
            return out
        model, tok = self._load()
        limit = min(self.max_length, int(getattr(tok, "model_max_length", None) or self.max_length))
        with torch.inference_mode():
            for s in self._batches(len(values)):
                enc = tok(list(values[s]), padding="max_length" if self.model_type == "siglip" else True,
                          truncation=True, max_length=limit, return_tensors="pt").to(self.device)
                with self._autocast():
                    if self.model_type in DUAL_TOWERS:
                        kw = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
                        e = model.get_text_features(**kw).pooler_output
                    else:
                        h = model(**enc).last_hidden_state.float()
                        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                        e = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
                out[s] = e.float().cpu().numpy()
        return out
