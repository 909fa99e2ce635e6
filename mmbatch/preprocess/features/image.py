"""Image features: decode (bytes -> RGB uint8 square) and two extractors.

Decode (CPU, :func:`decode_image`):

1. :func:`mmbatch.media.probe_image` reads the header only and refuses empty,
   non-image and decompression-bomb inputs before anything is allocated.
2. ``cv2.imdecode`` to 8-bit RGB. For JPEG, libjpeg-turbo's DCT-domain scaling
   (``IMREAD_REDUCED_COLOR_2/4/8``) is used when the shorter side is at least
   2/4/8x the target size: a cheaper decode that still leaves >= ``size``
   pixels for the final resize. EXIF orientation is ignored (as torchvision's
   ImageNet loader does). CMYK and grayscale JPEG, 16-bit and alpha PNG all
   come out as 8-bit RGB (alpha is dropped, as ``PIL.Image.convert("RGB")``
   does; 16-bit is scaled to 8-bit). The format is read from the bytes, so a
   PNG named ``.JPEG`` decodes as PNG. A truncated or corrupt image fails with
   reason ``corrupt_image``. Formats OpenCV cannot read fall back to Pillow.
3. Resize the shorter side to ``size`` (``cv2.INTER_AREA``; the longer side is
   ``int(size * long / short)`` as in torchvision) and center-crop to
   ``size x size``.

Extractors (see :data:`HOG_DEFAULTS` and :class:`ResNetExtractor`):

- ``hog_color`` (no model): gradient-orientation histograms (HOG) on the
  grayscale image plus an HSV colour histogram, computed for a whole batch in
  NumPy/OpenCV without per-pixel Python.
- ``cnn``: a torchvision-compatible ResNet's global-average-pooled features.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from mmbatch import media
from mmbatch.engine import storage
from mmbatch.preprocess.features.base import Decoded, Error, Extractor, precision_autocast
from mmbatch.engine.runtime import pin_threads

log = logging.getLogger("mmbatch.preprocess.features.image")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# 8-bit RGB output, EXIF orientation ignored; index = DCT scale denominator.
_READ_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
_REDUCED = {
    1: _READ_RGB,
    2: (cv2.IMREAD_REDUCED_COLOR_2 & ~cv2.IMREAD_COLOR) | _READ_RGB,
    4: (cv2.IMREAD_REDUCED_COLOR_4 & ~cv2.IMREAD_COLOR) | _READ_RGB,
    8: (cv2.IMREAD_REDUCED_COLOR_8 & ~cv2.IMREAD_COLOR) | _READ_RGB,
}

_JPEG_FORMATS = ("JPEG", "MPO")    # Pillow calls camera JPEGs with a second picture "MPO"

# Decode settings recorded in every image extractor's params().
DECODE_PARAMS = {
    "color": "RGB", "resize": "shorter_side_then_center_crop", "interpolation": "INTER_AREA",
    "jpeg_reduced_decode": True, "exif_orientation": False, "alpha": "dropped",
}


def media_bytes(item: Any) -> Optional[bytes | memoryview]:
    """Raw bytes from a column value: bytes-like, or a ``{"bytes", "path"}`` struct (dict). A
    memoryview (a zero-copy view into a Parquet column, see ``preprocess.unit.raw_items``) is
    passed on as is."""
    if item is None:
        return None
    if isinstance(item, dict):
        item = item.get("bytes")
        if item is None:
            return None
    if isinstance(item, (bytes, memoryview)):
        return item
    if isinstance(item, bytearray):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise media.MediaError("not_an_image", f"expected image bytes, got {type(item).__name__}")


def reduced_scale(width: int, height: int, size: int) -> int:
    """Largest libjpeg-turbo scale denominator (1, 2, 4, 8) keeping the shorter side >= ``size``."""
    short = min(width, height)
    for f in (8, 4, 2):
        if short >= f * size:
            return f
    return 1


def resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Shorter side -> ``size`` (INTER_AREA), then center crop to ``size x size``."""
    h, w = img.shape[:2]
    if w <= h:
        nw, nh = size, max(size, int(size * h / w))
    else:
        nh, nw = size, max(size, int(size * w / h))
    if (nh, nw) != (h, w):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(img[y0:y0 + size, x0:x0 + size])


def _pil_decode(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise media.MediaError("corrupt_image", f"{type(e).__name__}: {e}") from None


def decode_full(data: bytes | memoryview, scale: int = 1, info: Optional[media.ImageInfo] = None) -> np.ndarray:
    """Bytes -> RGB uint8 [h, w, 3] (``scale`` > 1: JPEG DCT-scaled decode). Probes first."""
    info = info or media.probe_image(data)
    if info.format not in _JPEG_FORMATS:
        scale = 1   # OpenCV would decode fully and resize bilinearly: no gain, worse pixels
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, _REDUCED[scale])
    except cv2.error as e:
        raise media.MediaError("corrupt_image", f"OpenCV: {str(e).strip().splitlines()[-1]}") from None
    if img is None:
        if info.format in _JPEG_FORMATS or info.format == "PNG":
            raise media.MediaError("corrupt_image", f"{info.format} {info.width}x{info.height} "
                                   "could not be decoded (truncated or corrupt data)")
        img = _pil_decode(data)     # formats OpenCV lacks (e.g. GIF, some TIFF)
    if img.ndim == 2:               # defensive: OpenCV already converts to 3 channels
        img = np.repeat(img[:, :, None], 3, axis=2)
    return img


def decode_image(data: Any, size: int) -> np.ndarray:
    """Bytes -> RGB uint8 [size, size, 3]; raises :class:`mmbatch.media.MediaError`."""
    raw = media_bytes(data)
    info = media.probe_image(raw)   # refuses empty / non-image / bombs before decoding
    img = decode_full(raw, reduced_scale(info.width, info.height, size), info)
    return resize_center_crop(img, size)


class ImageExtractor(Extractor):
    """Common decode for image extractors: rows -> RGB uint8 [size, size, 3] or an error."""
    modality = "image"

    def __init__(self, size: int):
        if size < 8:
            raise ValueError(f"image size must be >= 8, got {size}")
        self.size = int(size)

    def decode(self, items: Sequence[Any]) -> Decoded:
        values: list[Any] = []
        errors: list[Error] = []
        for item in items:
            try:
                values.append(decode_image(item, self.size))
                errors.append(None)
            except media.MediaError as e:
                values.append(None)
                errors.append((e.reason, e.detail))
        return Decoded(values, errors)

    @staticmethod
    def _stack(values: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([np.asarray(v, dtype=np.uint8) for v in values]) if len(values) else \
            np.zeros((0, 1, 1, 3), np.uint8)


# --- hog_color ---------------------------------------------------------------------
HOG_DEFAULTS = {
    "cells": 8,             # cells x cells grid over the image (cell side = size / cells px)
    "bins": 9,              # unsigned orientations over 0..180 degrees, linear vote between bins
    "block": 2,             # block x block cells, stride one cell, L2-Hys normalised (clip 0.2)
    "hsv_bins": (8, 4, 4),  # joint H x S x V histogram, Hellinger (sqrt) normalised
}


def hog_dim(cells: int = 8, bins: int = 9, block: int = 2, hsv_bins: Sequence[int] = (8, 4, 4)) -> int:
    nb = cells - block + 1
    return nb * nb * block * block * bins + int(np.prod(hsv_bins))


@functools.lru_cache(maxsize=32)
def _hog_index_base(n: int, S: int, cells: int, slots: int) -> np.ndarray:
    """intp [n, S, S]: first histogram slot of each pixel's (image, cell)."""
    cell_of = (np.arange(S) * cells) // S                                 # pixel -> cell row/col
    cell = cell_of[:, None] * cells + cell_of[None, :]                    # [S, S]
    base = (np.arange(n)[:, None, None] * (cells * cells) + cell[None]) * slots
    base = base.astype(np.intp)
    base.setflags(write=False)
    return base


def _hog(gray: np.ndarray, cells: int, bins: int, block: int) -> np.ndarray:
    """gray float32 [n, S, S] -> [n, nb*nb*block*block*bins] HOG (L2-Hys blocks)."""
    n, S, _ = gray.shape
    tall = gray.reshape(n * S, S)
    # [-1, 0, 1] derivatives (Dalal & Triggs: no smoothing). On the stacked batch the
    # columns behave as per image; the first/last row of each image would see its
    # neighbour image, and per-image cv2.Sobel (BORDER_REFLECT_101) gives 0 there.
    gx = cv2.Sobel(tall, cv2.CV_32F, 1, 0, ksize=1)
    gy = cv2.Sobel(tall, cv2.CV_32F, 0, 1, ksize=1)
    gy3 = gy.reshape(n, S, S)
    gy3[:, 0, :] = 0.0
    gy3[:, S - 1, :] = 0.0
    mag, ang = cv2.cartToPolar(gx, gy, angleInDegrees=True)      # ang in [0, 360), ~0.3 deg accuracy
    # unsigned orientation, linear vote between the two nearest bin centres
    # ((b + 0.5) * 180 / bins). Slot s holds bin s - 1 (mod bins): slot 0 and slot
    # bins + 1 are wrap-around slots, folded after counting (no per-pixel modulo).
    q = ang
    q *= bins / 180.0
    q -= np.float32(bins) * (q >= bins)                                       # [0, bins): unsigned
    q += 0.5                                                        # [0.5, bins + 0.5)
    slot = q.astype(np.intp)                                        # floor (q > 0)
    frac = q - slot
    w_hi = mag * frac
    w_lo = mag - w_hi
    slots = bins + 2
    idx = _hog_index_base(n, S, cells, slots).reshape(-1) + slot.reshape(-1)
    total = n * cells * cells * slots
    hist = np.bincount(idx, weights=w_lo.reshape(-1), minlength=total)
    idx += 1
    hist += np.bincount(idx, weights=w_hi.reshape(-1), minlength=total)
    hist = hist.reshape(n, cells, cells, slots)
    h = hist[..., 1:bins + 1].astype(np.float32)
    h[..., bins - 1] += hist[..., 0]
    h[..., 0] += hist[..., bins + 1]
    nb = cells - block + 1
    blocks = np.concatenate([h[:, dy:dy + nb, dx:dx + nb, :]
                             for dy in range(block) for dx in range(block)], axis=-1)
    eps = 1e-5
    blocks /= np.sqrt(np.sum(blocks * blocks, axis=-1, keepdims=True) + eps * eps)
    np.minimum(blocks, 0.2, out=blocks)
    blocks /= np.sqrt(np.sum(blocks * blocks, axis=-1, keepdims=True) + eps * eps)
    return blocks.reshape(n, -1)


_ONES_1x3 = np.ones((1, 3), np.float32)


@functools.lru_cache(maxsize=8)
def _hsv_lut(hsv_bins: tuple) -> np.ndarray:
    """uint8 [1, 256, 3] LUT: H, S, V byte -> its term of the joint bin index."""
    hb, sb, vb = hsv_bins
    v = np.arange(256)
    lut = np.stack([np.minimum(v * hb // 180, hb - 1) * (sb * vb), (v * sb // 256) * vb, v * vb // 256], axis=-1)
    return lut.astype(np.uint8)[None]


def _hsv_hist(tall_rgb: np.ndarray, n: int, hsv_bins: Sequence[int]) -> np.ndarray:
    """RGB uint8 [n*S, S, 3] -> [n, hb*sb*vb] sqrt of the normalised joint HSV histogram."""
    hsv_bins = tuple(int(b) for b in hsv_bins)
    k = int(np.prod(hsv_bins))
    hsv = cv2.cvtColor(tall_rgb, cv2.COLOR_RGB2HSV)                  # H 0..179, S/V 0..255
    if k <= 256:
        terms = cv2.LUT(hsv, _hsv_lut(hsv_bins))                     # per-channel index terms
        code = cv2.transform(terms, _ONES_1x3).reshape(n, -1).astype(np.intp)   # their sum, < 256
    else:
        hb, sb, vb = hsv_bins
        hsv = hsv.reshape(n, -1, 3).astype(np.intp)
        code = ((np.minimum(hsv[..., 0] * hb // 180, hb - 1) * sb + hsv[..., 1] * sb // 256) * vb
                + hsv[..., 2] * vb // 256)
    code += (np.arange(n, dtype=np.intp) * k)[:, None]
    hist = np.bincount(code.reshape(-1), minlength=n * k).reshape(n, k).astype(np.float32)
    hist /= float(code.shape[1])
    return np.sqrt(hist)


def hog_color_features(images: np.ndarray, cells: int = 8, bins: int = 9, block: int = 2,
                       hsv_bins: Sequence[int] = (8, 4, 4), chunk: int = 64) -> np.ndarray:
    """RGB uint8 [n, S, S, 3] -> float32 [n, hog_dim(...)] (HOG on gray, then HSV histogram)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    n = images.shape[0]
    dim = hog_dim(cells, bins, block, hsv_bins)
    out = np.empty((n, dim), dtype=np.float32)
    if n == 0:
        return out
    S = images.shape[1]
    if images.shape[2] != S or images.shape[3] != 3:
        raise ValueError(f"expected square RGB images [n, S, S, 3], got {images.shape}")
    if S < cells:
        raise ValueError(f"image side {S} is smaller than the cell grid {cells}")
    for i in range(0, n, chunk):        # bounded temporaries at large sizes
        part = images[i:i + chunk]
        m = part.shape[0]
        tall = part.reshape(m * S, S, 3)
        gray = cv2.cvtColor(tall, cv2.COLOR_RGB2GRAY).reshape(m, S, S).astype(np.float32)
        h = _hog(gray, cells, bins, block)
        out[i:i + m, :h.shape[1]] = h
        out[i:i + m, h.shape[1]:] = _hsv_hist(tall, m, hsv_bins)
    return out


class HogColorExtractor(ImageExtractor):
    """HOG (gradient-orientation histograms) + HSV colour histogram; no model.

    dim = (cells-block+1)^2 * block^2 * bins + prod(hsv_bins); with the defaults
    (8x8 cells, 9 bins, 2x2 blocks, 8x4x4 HSV) 1764 + 128 = 1892, whatever ``size``.
    """
    name = "hog_color"
    version = "1"
    needs_model = False

    def __init__(self, size: int = 64, cells: int = 8, bins: int = 9, block: int = 2,
                 hsv_bins: Sequence[int] = (8, 4, 4)):
        pin_threads()
        super().__init__(size)
        if not (1 <= block <= cells <= size):
            raise ValueError(f"need 1 <= block ({block}) <= cells ({cells}) <= size ({size})")
        self.cells, self.bins, self.block = int(cells), int(bins), int(block)
        self.hsv_bins = tuple(int(b) for b in hsv_bins)
        self.dim = hog_dim(self.cells, self.bins, self.block, self.hsv_bins)

    def params(self) -> dict:
        return {"size": self.size, **DECODE_PARAMS,
                "gray": "cv2 RGB2GRAY", "gradient": "cv2.Sobel ksize=1 ([-1,0,1])",
                "cells": self.cells, "bins": self.bins, "orientation": "unsigned_0_180",
                "block": self.block, "block_stride": 1, "block_norm": "L2-Hys(0.2)",
                "hsv_bins": list(self.hsv_bins), "hsv_norm": "sqrt(hist/pixels)"}

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        return hog_color_features(self._stack(values), self.cells, self.bins, self.block, self.hsv_bins)


# --- cnn ---------------------------------------------------------------------------
class ResNetExtractor(ImageExtractor):
    """ResNet-18/34/50 global-average-pooled features (512 / 2048), ImageNet normalisation.

    ``weights``: local path or fsspec URI of a torchvision-style checkpoint
    (raw ``state_dict`` or ``{"state_dict"|"model": ...}``), read with
    ``torch.load(weights_only=True)``. ``None``: seeded random initialisation,
    with a loud warning (the features are then only good for plumbing tests).
    ``precision``: fp16/bf16 use autocast on CUDA; on CPU, bf16 uses CPU
    autocast and fp16 falls back to fp32.
    """
    name = "cnn"
    version = "1"
    needs_model = True

    def __init__(self, arch: str = "resnet18", size: int = 224, weights: Optional[str] = None,
                 batch_size: int = 64, precision: str = "fp32", seed: int = 0, device: str = "cpu"):
        import torch  # noqa: F401  (imported first so that pin_threads also pins torch)

        from mmbatch.preprocess.features.resnet import FEATURE_DIMS

        pin_threads()
        super().__init__(size)
        if arch not in FEATURE_DIMS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(FEATURE_DIMS)}")
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        self.arch, self.weights, self.precision, self.seed = arch, weights, precision, int(seed)
        self.batch_size = int(batch_size)
        self.dim = FEATURE_DIMS[arch]
        self.device = str(device)
        self._model = None
        self._weights_sha256: Optional[str] = None
        self._warned_fp16 = False

    def params(self) -> dict:
        p = {"size": self.size, **DECODE_PARAMS, "arch": self.arch, "output": "global_avg_pool",
             "normalize_mean": list(IMAGENET_MEAN), "normalize_std": list(IMAGENET_STD),
             "precision": self.precision, "weights": self.weights}
        if self.weights is None:
            p["init"] = f"random(seed={self.seed})"
        else:
            p["weights_sha256"] = self._weights_digest()
        return p

    # model ---------------------------------------------------------------------
    def _weights_digest(self) -> str:
        if self._weights_sha256 is None:
            self._weights_sha256 = hashlib.sha256(storage.read_bytes(self.weights)).hexdigest()
        return self._weights_sha256

    def build_model(self):
        """The ResNet (on CPU, eval mode) with weights loaded or seeded random init."""
        from mmbatch.preprocess.features.resnet import build_or_load, build_resnet, load_weights

        model, sha = build_or_load(
            lambda: build_resnet(self.arch), self.weights, self.seed,
            f"image cnn extractor: no weights given for {self.arch}; using RANDOM weights (seed {self.seed}). "
            "Features will carry little signal; set features.image.weights to a torchvision ImageNet state_dict.",
            load=lambda m, sd: load_weights(m, sd, self.weights))
        if sha is not None:
            self._weights_sha256 = sha
        return model

    def _get_model(self):
        if self._model is None:
            self._model = self._place(self.build_model())
        return self._model

    def _place(self, model):
        import torch

        model = model.to(self.device)
        if torch.device(self.device).type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    def to(self, device: str) -> "ResNetExtractor":
        """Move (building it first if needed) the model to ``device``."""
        self.device = str(device)
        self._model = self._place(self._model) if self._model is not None else self._get_model()
        return self

    def _autocast(self):
        return precision_autocast(self.device, self.precision, self._warn_fp16)

    def _warn_fp16(self, dev: str) -> None:
        if not self._warned_fp16:
            log.warning("image cnn: fp16 is not used on %s; running fp32", dev)
            self._warned_fp16 = True

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        import torch

        imgs = self._stack(values)
        if len(imgs) == 0:
            return np.zeros((0, self.dim), np.float32)
        model = self._get_model()
        dev = torch.device(self.device)
        mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
        out = np.empty((len(imgs), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, len(imgs), self.batch_size):
                xb = torch.from_numpy(imgs[i:i + self.batch_size]).to(dev, non_blocking=True)
                xb = (xb.permute(0, 3, 1, 2).float().div_(255.0) - mean) / std
                if dev.type == "cuda":
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    f = model.features(xb)
                out[i:i + len(xb)] = f.float().cpu().numpy()
        return out
