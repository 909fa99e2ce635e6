"""Probing and decoding raw media bytes, shared by ingest (checks) and features (decode).

Every failure raises :class:`MediaError` with a short ``reason`` code (what the
quarantine table records) and a human ``detail``.

Audio goes through libsndfile (``soundfile``) for every format, NIST SPHERE
(TIMIT ``.WAV``) included: libsndfile reads SPHERE PCM in both byte orders.
Before that, :func:`sphere_header` reads the SPHERE text header so a
shorten-compressed file (which libsndfile refuses as "unimplemented format")
is reported as ``sphere_shorten`` and a file shorter than its declared
``sample_count`` as ``truncated`` (libsndfile would read what is there).

Decoding is bounded by the header, not by the file size (30 minutes of 8-channel silence is a
0.7 MB FLAC and 2.8 GB of float32): :func:`decode_audio` with ``max_seconds`` reads only the frames
the clip needs; without it, a clip over :data:`MAX_DECODE_SAMPLES` is ``too_long``. The probe
(ingest) keeps long audio: it stores the bytes, and whoever decodes them clips.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

# Refuse images whose header declares more pixels than this, before allocating
# (decompression bombs). 16k x 16k; ImageNet's largest is far below.
MAX_IMAGE_PIXELS = 16384 * 16384

# Refuse to decode more than this many samples (frames x channels) of one clip: 512 MiB as float32
# (2 h 20 min of 16 kHz mono, 23 min of 48 kHz stereo). The header's frame count is checked before
# a sample is read. A caller that clips (``max_seconds``) reads only the frames the clip needs, so
# only an unclipped decode of a long file, or absurd channel counts, meet this limit (``too_long``).
MAX_DECODE_SAMPLES = 2**27


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


SPHERE_MAGIC = b"NIST_1A\n"


def is_sphere(data: bytes | memoryview) -> bool:
    return bytes(data[:8]) == SPHERE_MAGIC


def sphere_header(data: bytes) -> dict[str, str]:
    """The ``name -type value`` fields of a NIST SPHERE header, values as written (no samples read).

    Raises ``bad_header`` when the header size is not a number or exceeds the file.
    """
    try:
        header_size = int(bytes(data[8:16]).strip())
    except ValueError:
        raise MediaError("bad_header", "SPHERE header size is not a number") from None
    if header_size < 16 or header_size > len(data):
        raise MediaError("truncated", f"SPHERE header declares {header_size} bytes, file has {len(data)}")
    fields: dict[str, str] = {}
    for raw in bytes(data[16:header_size]).split(b"\n"):
        line = raw.decode("ascii", "replace").strip()
        if line == "end_head":
            break
        parts = line.split(None, 2)
        if len(parts) == 3:
            fields[parts[0]] = parts[2]
    return fields


def _check_sphere(data: bytes) -> int | None:
    """Refuse shorten-compressed SPHERE; the header's ``sample_count`` (None when absent)."""
    h = sphere_header(data)
    coding = h.get("sample_coding", "pcm")
    if "shorten" in coding:
        raise MediaError("sphere_shorten", f"SPHERE sample_coding={coding!r} (shorten-compressed) is not "
                         "supported; decompress with sph2pipe first")
    try:
        return int(h["sample_count"]) if "sample_count" in h else None
    except ValueError:
        raise MediaError("bad_header", f"SPHERE sample_count={h['sample_count']!r} is not a number") from None


def _check_count(declared: int | None, frames: int) -> None:
    if declared is not None and declared > frames:
        raise MediaError("truncated", f"SPHERE header declares {declared} samples, file holds {frames}")


def _reader(data: bytes | memoryview):
    """A seekable file object over ``data`` that does not copy it (``io.BytesIO`` copies a memoryview)."""
    if isinstance(data, bytes):
        return io.BytesIO(data)       # shares the bytes object
    import pyarrow as pa

    return pa.BufferReader(data)


def probe_audio(data: bytes | None) -> AudioInfo:
    """Read the audio header only (FLAC/WAV/OGG/NIST SPHERE via libsndfile)."""
    if not data:
        raise MediaError("empty_file", "zero-byte audio")
    declared = _check_sphere(data) if is_sphere(data) else None
    import soundfile as sf

    try:
        # the open file's header fields, not sf.info (which also formats an extra-info text)
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, frames, channels, fmt = f.samplerate, f.frames, f.channels, f.format
    except Exception as e:
        raise MediaError("corrupt_audio", f"{type(e).__name__}: {e}") from None
    _check_count(declared, int(frames))
    fmt = "SPHERE" if is_sphere(data) else str(fmt)
    return AudioInfo(int(rate), int(frames), int(channels), fmt)


def clip_frames(max_seconds: float, sample_rate: int) -> int:
    """Frames at ``sample_rate`` that a clip of ``max_seconds`` needs: its length rounded up, plus
    1/20 s, so that a resampler sees the same neighbourhood at the cut as in the whole file."""
    return int(math.ceil(max_seconds * sample_rate)) + sample_rate // 20


def read_audio(data: bytes | memoryview, max_seconds: float | None = None) -> tuple[np.ndarray, int, int]:
    """(float32 samples, [frames] or [frames, channels], the file's rate, the header's frame count).

    Reads at most :func:`clip_frames` ``(max_seconds, rate)`` frames (all of them when ``max_seconds``
    is None): a 30-minute 8-channel file clipped to 30 s costs 30 s of samples, not 30 minutes.
    Raises ``too_long`` before reading when the frames to read x channels exceed
    :data:`MAX_DECODE_SAMPLES`, ``corrupt_audio`` when libsndfile fails.
    """
    import soundfile as sf

    try:
        with sf.SoundFile(_reader(data)) as f:
            sr, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
            n = frames if max_seconds is None else min(frames, clip_frames(max_seconds, sr))
            if n * channels > MAX_DECODE_SAMPLES:
                raise MediaError("too_long", f"{frames} frames x {channels} channels at {sr} Hz "
                                 f"({frames / max(sr, 1):.0f} s); decoding {n} frames would exceed "
                                 f"{MAX_DECODE_SAMPLES} samples (set max_seconds to clip it)")
            x = f.read(frames=n, dtype="float32", always_2d=False)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError("corrupt_audio", f"{type(e).__name__}: {e}") from None
    return x, sr, frames


def decode_audio(data: bytes | memoryview | None, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode to float32 mono samples in [-1, 1] and the file's sample rate.

    With ``max_seconds``, only the first :func:`clip_frames` frames are decoded (see
    :func:`read_audio`; they are the same samples a whole decode starts with); without it, a file
    over :data:`MAX_DECODE_SAMPLES` is refused as ``too_long``.
    ``data`` may be a memoryview into a Parquet column's buffer: libsndfile reads it in place
    (through ``pyarrow.BufferReader``), without a copy of the file."""
    if not data:
        raise MediaError("empty_file", "zero-byte audio")
    declared = _check_sphere(data) if is_sphere(data) else None
    x, sr, frames = read_audio(data, max_seconds)
    _check_count(declared, frames)
    if x.ndim > 1:
        x = x.mean(axis=1)
    if x.size == 0:
        raise MediaError("empty_audio", "audio has no samples")
    if not np.all(np.isfinite(x)):
        raise MediaError("corrupt_audio", "audio has NaN or infinite samples")
    return np.ascontiguousarray(x, dtype=np.float32), int(sr)
