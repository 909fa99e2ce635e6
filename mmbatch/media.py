"""Probing and decoding raw media bytes, shared by ingest (checks) and features (decode).

Every failure raises :class:`MediaError` with a short ``reason`` code (what the
quarantine table records) and a human ``detail``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from mmbatch.sources import sphere

# Refuse images whose header declares more pixels than this, before allocating
# (decompression bombs). 16k x 16k; ImageNet's largest is far below.
MAX_IMAGE_PIXELS = 16384 * 16384


class MediaError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str      # JPEG, PNG, ... as found in the bytes (not the file name)
    mode: str        # RGB, L, CMYK, RGBA, I;16 ...


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    frames: int
    channels: int
    format: str      # FLAC, WAV, SPHERE, ...

    @property
    def duration(self) -> float:
        return self.frames / float(self.sample_rate) if self.sample_rate else 0.0


def probe_image(data: bytes | None) -> ImageInfo:
    """Read the image header only; refuse empty, unknown and oversized images."""
    if not data:
        raise MediaError("empty_file", "zero-byte image")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            fmt, mode = im.format or "unknown", im.mode
    except UnidentifiedImageError:
        raise MediaError("not_an_image", "bytes are not a known image format") from None
    except Image.DecompressionBombError as e:
        raise MediaError("decompression_bomb", str(e)) from None
    except Exception as e:  # truncated headers raise assorted errors
        raise MediaError("corrupt_image", f"{type(e).__name__}: {e}") from None
    if w <= 0 or h <= 0:
        raise MediaError("corrupt_image", f"image declares {w}x{h} pixels")
    if w * h > MAX_IMAGE_PIXELS:
        raise MediaError("decompression_bomb",
                         f"image declares {w}x{h} = {w * h} pixels (limit {MAX_IMAGE_PIXELS}); refused before decoding")
    return ImageInfo(w, h, fmt, mode)


def probe_audio(data: bytes | None) -> AudioInfo:
    """Read the audio header only (FLAC/WAV/OGG via libsndfile, SPHERE natively)."""
    if not data:
        raise MediaError("empty_file", "zero-byte audio")
    if sphere.is_sphere(data):
        try:
            h = sphere.parse_header(data)
        except sphere.SphereError as e:
            raise MediaError(e.reason, str(e)) from None
        coding = str(h.get("sample_coding", "pcm"))
        if "shorten" in coding:
            raise MediaError("sphere_shorten", f"SPHERE sample_coding={coding!r} (shorten) is not supported; "
                             "decompress with sph2pipe first")
        return AudioInfo(int(h.get("sample_rate", 16000)), int(h.get("sample_count", 0)),
                         int(h.get("channel_count", 1)), "SPHERE")
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception as e:
        raise MediaError("corrupt_audio", f"{type(e).__name__}: {e}") from None
    return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels), str(info.format))


def decode_audio(data: bytes | None) -> tuple[np.ndarray, int]:
    """Decode to float32 mono samples in [-1, 1] and the file's sample rate."""
    if not data:
        raise MediaError("empty_file", "zero-byte audio")
    if sphere.is_sphere(data):
        try:
            x, sr = sphere.decode(data)
        except sphere.SphereError as e:
            raise MediaError(e.reason, str(e)) from None
    else:
        import soundfile as sf

        try:
            x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
        except Exception as e:
            raise MediaError("corrupt_audio", f"{type(e).__name__}: {e}") from None
    if x.ndim > 1:
        x = x.mean(axis=1)
    if x.size == 0:
        raise MediaError("empty_audio", "audio has no samples")
    if not np.all(np.isfinite(x)):
        raise MediaError("corrupt_audio", "audio has NaN or infinite samples")
    return np.ascontiguousarray(x, dtype=np.float32), int(sr)
