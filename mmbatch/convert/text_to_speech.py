"""Text -> speech with eSpeak NG (the ``espeak-ng`` program, a system package).

``espeak-ng`` writes a 22.05 kHz 16-bit WAV to stdout; it is decoded and
resampled to 16 kHz mono float32 with soxr. Install the program with
``apt-get install espeak-ng`` (Debian/Ubuntu) or ``brew install espeak-ng``
(macOS); :func:`check_espeak` says so when it is missing.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess

import numpy as np

from mmbatch.convert import SR, MissingTool

VOICE = "en"
WORDS_PER_MINUTE = 160
TIMEOUT_S = 120.0
MAX_CHARS = 100_000       # refuse absurdly long inputs (a whole book in one call)
INSTALL_HINT = ("the `espeak-ng` program is not installed or not on PATH; install it with "
                "`apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng` (macOS), "
                "or set ESPEAK_CMD to its location")


def espeak_cmd() -> str:
    return os.environ.get("ESPEAK_CMD") or "espeak-ng"


def check_espeak() -> str:
    """Path of the espeak-ng program; :class:`MissingTool` (with the install command) if absent."""
    path = shutil.which(espeak_cmd())
    if path is None:
        raise MissingTool(INSTALL_HINT)
    return path


def _decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """espeak-ng's streamed WAV (its header sizes are placeholders) -> float32 mono, rate."""
    import soundfile as sf

    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return x.mean(axis=1), int(sr)
    except Exception:
        pass
    # fall back to reading the PCM chunk by hand (16-bit little-endian, as espeak-ng writes)
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError(f"espeak-ng did not produce a WAV ({len(data)} bytes)")
    channels = int.from_bytes(data[22:24], "little") or 1
    sr = int.from_bytes(data[24:28], "little")
    pos = data.find(b"data", 12)
    pcm = np.frombuffer(data[pos + 8:len(data) - (len(data) - pos - 8) % (2 * channels)], dtype="<i2")
    return pcm.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0, sr


def synthesize(text: str, sr: int = SR, voice: str = VOICE, words_per_minute: int = WORDS_PER_MINUTE,
               timeout: float = TIMEOUT_S, pitch: int | None = None) -> np.ndarray:
    """Speak ``text``: float32 mono samples at ``sr`` (16 kHz by default); ``pitch`` 0-99
    (espeak-ng's ``-p``; None: the voice's own, 50)."""
    import soxr

    if text is None or not str(text).strip():
        raise ValueError("no text to speak")
    text = str(text)
    if len(text) > MAX_CHARS:
        raise ValueError(f"text is {len(text)} characters; at most {MAX_CHARS} per call")
    cmd = [check_espeak(), "--stdout", "--stdin", "-v", voice, "-s", str(int(words_per_minute))]
    if pitch is not None:
        if not 0 <= int(pitch) <= 99:
            raise ValueError(f"pitch is {pitch}; espeak-ng takes 0 to 99")
        cmd += ["-p", str(int(pitch))]
    try:
        proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"espeak-ng took longer than {timeout:g} s; killed") from None
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng failed (exit {proc.returncode}): "
                           f"{proc.stderr.decode('utf-8', 'replace').strip()[:500]}")
    x, native = _decode_wav(proc.stdout)
    if x.size == 0:
        raise RuntimeError("espeak-ng produced no audio")
    if native != sr:
        x = soxr.resample(x, native, sr, quality="HQ")
    return np.ascontiguousarray(np.clip(x, -1.0, 1.0), dtype=np.float32)
