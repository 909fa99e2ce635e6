"""Cross-modal conversions: image -> speech (sonification), image -> text (OCR),
text -> image (rendering, word cloud), text -> speech (espeak-ng).

Each direction is a module of pure functions (arrays and strings in, arrays and
strings out) that tests and plain loops call directly; :mod:`.cli` runs them
over files and folders, :mod:`.transforms` over canonical rows in Ray Data.
No Ray imports here or in the direction modules.

This module holds the few pieces they share: the output sample rate, the
missing-tool error and image/audio byte codecs.
"""
from __future__ import annotations

import io

import numpy as np

SR = 16000                    # every generated waveform: 16 kHz mono float32

DIRECTIONS = ("image-to-speech", "image-to-text", "text-to-image", "text-to-speech")


class MissingTool(RuntimeError):
    """A system program a conversion needs is not installed (message says how to install it)."""


def decode_rgb(data: bytes) -> np.ndarray:
    """Image bytes (any format Pillow reads) -> RGB uint8 [H, W, 3].

    Header checked first by :func:`mmbatch.media.probe_image` (empty, unknown,
    oversized images raise :class:`mmbatch.media.MediaError`).
    """
    from PIL import Image

    from mmbatch.media import MediaError, probe_image

    probe_image(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # truncated bodies decode lazily, after the header probe
        raise MediaError("corrupt_image", f"{type(e).__name__}: {e}") from None


def encode_png(image: np.ndarray) -> bytes:
    """RGB or grayscale uint8 array -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def encode_audio(x: np.ndarray, sr: int = SR, format: str = "FLAC") -> bytes:
    """float32 mono samples in [-1, 1] -> FLAC or WAV bytes (16-bit PCM)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0), int(sr),
             format=format.upper(), subtype="PCM_16")
    return buf.getvalue()


def audio_format_for(path: str) -> str:
    """Container for an output file name: ``.flac`` -> FLAC, anything else WAV."""
    return "FLAC" if str(path).lower().endswith(".flac") else "WAV"
