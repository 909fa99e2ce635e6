"""Build an extractor from a workflow's feature config (``mmbatch.config``).

``build_extractor("image", wf.features.image)`` -> :class:`~mmbatch.preprocess.features.base.Extractor`.
``embedding_dim(modality, cfg)`` gives the embedding size without loading any
model (for the sentence extractor it reads the model directory's config files).

| modality | cfg.extractor  | class                  | dim                               |
|----------|----------------|------------------------|-----------------------------------|
| image    | hog            | HogColorExtractor      | 1892 (8x8 cells, 9 bins, 2x2 blocks + 8x4x4 HSV) |
| image    | cnn            | ResNetExtractor        | 512 (resnet18/34), 2048 (resnet50) |
| audio    | logmel_stats   | LogMelStatsExtractor   | 2*n_mels + 2*n_mfcc (186)         |
| audio    | cnn            | AudioCNNExtractor      | embedding_dim (128)               |
| text     | hashing        | HashingTextExtractor   | dim (256)                         |
| text     | sentence       | SentenceExtractor      | from the model (384 for MiniLM-L6) |
| image    | pixels         | PixelsExtractor        | size*size*channels (sequence)     |
| audio    | logmel_frames  | LogMelFramesExtractor  | max_frames*n_mels (sequence)      |
| text     | tokens         | TokensExtractor        | max_tokens (sequence)             |
| image    | hf             | HFImageExtractor       | from the model folder's config    |
| audio    | hf             | HFAudioExtractor       | from the model folder's config    |
| audio    | hf_frames      | HFFramesExtractor      | max_frames*hidden size (sequence) |
| text     | hf             | HFTextExtractor        | from the model folder's config    |

Sequence extractors (mmbatch.preprocess.features.sequence) write model inputs for train.encoders, not
embeddings; their ``dim`` is the size of the padded input. The ``hf`` extractors
(mmbatch.preprocess.features.hf) run a transformers model from ``model_path``.
"""
from __future__ import annotations

from typing import Any

from mmbatch.preprocess.features.base import Extractor
from mmbatch.schema import MODALITIES, SEQUENCE_EXTRACTOR_NAMES

# cfg.extractor values (as in mmbatch.config) -> the extractor's name; "hog_color" is
# accepted as an alias of "hog".
IMAGE_EXTRACTORS = {"hog": "hog_color", "hog_color": "hog_color", "cnn": "cnn", "pixels": "pixels", "hf": "hf"}
AUDIO_EXTRACTORS = {"logmel_stats": "logmel_stats", "cnn": "cnn", "logmel_frames": "logmel_frames", "hf": "hf",
                    "hf_frames": "hf_frames"}
TEXT_EXTRACTORS = {"hashing": "hashing", "sentence": "sentence", "tokens": "tokens", "hf": "hf"}


def is_sequence(modality: str, cfg: Any) -> bool:
    """Whether ``cfg`` (a features.<modality> config) selects the modality's sequence extractor."""
    return getattr(cfg, "extractor", None) in SEQUENCE_EXTRACTOR_NAMES.get(modality, ())


def _default_cfg(modality: str):
    from mmbatch.config import feature_config

    return feature_config(modality)


def _kind(table: dict, modality: str, cfg: Any) -> str:
    name = getattr(cfg, "extractor", None)
    if name not in table:
        raise ValueError(f"features.{modality}.extractor: unknown extractor {name!r}; "
                         f"choose one of {sorted(set(table) - {'hog_color'})}")
    return table[name]


def build_extractor(modality: str, cfg: Any = None) -> Extractor:
    """The extractor described by ``cfg`` (ImageFeatures / AudioFeatures / TextFeatures)."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected image, audio or text")
    cfg = cfg if cfg is not None else _default_cfg(modality)
    if getattr(cfg, "extractor", None) in ("hf", "hf_frames"):
        return _hf_extractor(modality, cfg)
    if is_sequence(modality, cfg):
        return _sequence_extractor(modality, cfg)
    if modality == "image":
        from mmbatch.preprocess.features import image

        if _kind(IMAGE_EXTRACTORS, modality, cfg) == "hog_color":
            return image.HogColorExtractor(size=cfg.size)
        return image.ResNetExtractor(arch=cfg.arch, size=cfg.size, weights=cfg.weights,
                                     batch_size=cfg.batch_size, precision=cfg.precision)
    if modality == "audio":
        from mmbatch.preprocess.features import audio

        common = dict(sample_rate=cfg.sample_rate, win_ms=cfg.win_ms, hop_ms=cfg.hop_ms, n_mels=cfg.n_mels,
                      fmin=cfg.fmin, fmax=cfg.fmax, max_seconds=cfg.max_seconds, batch_size=cfg.batch_size)
        if _kind(AUDIO_EXTRACTORS, modality, cfg) == "logmel_stats":
            return audio.LogMelStatsExtractor(n_mfcc=cfg.n_mfcc, backend=cfg.backend, **common)
        return audio.AudioCNNExtractor(embedding_dim=cfg.embedding_dim, weights=cfg.weights, **common)
    from mmbatch.preprocess.features import text

    if _kind(TEXT_EXTRACTORS, modality, cfg) == "hashing":
        return text.HashingTextExtractor(dim=cfg.dim, ngram_range=tuple(cfg.ngram_range))
    return text.SentenceExtractor(model_path=cfg.model_path, batch_size=cfg.batch_size, precision=cfg.precision)


def _hf_extractor(modality: str, cfg: Any) -> Extractor:
    from mmbatch.preprocess.features import hf

    _kind({"image": IMAGE_EXTRACTORS, "audio": AUDIO_EXTRACTORS, "text": TEXT_EXTRACTORS}[modality], modality, cfg)
    common = dict(model_path=cfg.model_path, batch_size=cfg.batch_size, precision=cfg.precision)
    if modality == "image":
        return hf.HFImageExtractor(pooling=cfg.pooling, **common)
    if modality == "text":
        return hf.HFTextExtractor(**common)
    if cfg.extractor == "hf_frames":
        return hf.HFFramesExtractor(layer=cfg.layer, max_seconds=cfg.max_seconds, max_frames=cfg.max_frames, **common)
    return hf.HFAudioExtractor(layer=cfg.layer, max_seconds=cfg.max_seconds, **common)


def _sequence_extractor(modality: str, cfg: Any) -> Extractor:
    from mmbatch.preprocess.features import sequence

    if modality == "image":
        return sequence.PixelsExtractor(size=cfg.size, channels=cfg.channels)
    if modality == "audio":
        return sequence.LogMelFramesExtractor(sample_rate=cfg.sample_rate, win_ms=cfg.win_ms, hop_ms=cfg.hop_ms,
                                              n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax,
                                              max_seconds=cfg.max_seconds, max_frames=cfg.max_frames)
    return sequence.TokensExtractor(vocabulary=cfg.vocabulary, max_tokens=cfg.max_tokens)


def embedding_dim(modality: str, cfg: Any = None) -> int:
    """The embedding size ``build_extractor(modality, cfg)`` produces, without loading a model."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected image, audio or text")
    cfg = cfg if cfg is not None else _default_cfg(modality)
    if getattr(cfg, "extractor", None) in ("hf", "hf_frames"):
        return _hf_dim(modality, cfg)
    if is_sequence(modality, cfg):
        return {"image": lambda: cfg.size * cfg.size * cfg.channels, "audio": lambda: cfg.max_frames * cfg.n_mels,
                "text": lambda: cfg.max_tokens}[modality]()
    if modality == "image":
        if _kind(IMAGE_EXTRACTORS, modality, cfg) == "hog_color":
            from mmbatch.preprocess.features.image import HOG_DEFAULTS, hog_dim
            return hog_dim(**HOG_DEFAULTS)
        from mmbatch.preprocess.features.resnet import FEATURE_DIMS
        return FEATURE_DIMS[cfg.arch]
    if modality == "audio":
        if _kind(AUDIO_EXTRACTORS, modality, cfg) == "logmel_stats":
            return 2 * cfg.n_mels + 2 * cfg.n_mfcc
        return int(cfg.embedding_dim)
    if _kind(TEXT_EXTRACTORS, modality, cfg) == "hashing":
        return int(cfg.dim)
    from mmbatch.preprocess.features.text import SentenceExtractor
    return SentenceExtractor(model_path=cfg.model_path).dim   # reads config files; loads only if it must


def _hf_dim(modality: str, cfg: Any) -> int:
    """An hf extractor's size from its folder's config.json (no weights read)."""
    from mmbatch.preprocess.features import hf

    hf.check_folder(cfg.model_path, modality)
    size = hf.output_dim(hf.read_config(cfg.model_path), modality)
    return size * cfg.max_frames if cfg.extractor == "hf_frames" else size
