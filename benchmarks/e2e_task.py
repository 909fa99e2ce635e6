"""The AV-shaped task of the end-to-end benchmark, as media files + a JSONL manifest.

10 classes; per sample a 28x28-ish handwritten-looking digit image (partly occluded, noisy),
a 1 s noisy spoken word for the class (FLAC: the digit's name, "zero".."nine", spoken by
espeak-ng in one of several voices, rates and pitches, sped up or slowed down a little, shifted
in time and buried in white/pink noise at a random SNR), and a short, weakly informative
sentence. Images and sentences come from :mod:`benchmarks.fusion_tasks`; the split is fixed by
position (train / validation / test).

Speech is synthesised once per (word, voice, rate, pitch) -- at most 10 x 16 x 2 x 2 = 640
espeak-ng calls, in parallel, cached for the process -- and every sample reuses a cached
utterance with its own speed, time shift and noise, so a few thousand samples take seconds.
Needs the ``espeak-ng`` program (``scripts/install-system-deps.sh``).

``write_task(root, sizes, seed)`` writes ``root/media/*`` and ``root/manifest.jsonl``, which
``mmbatch ingest manifest`` turns into one canonical dataset with all three modalities.
"""
from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soxr

from benchmarks.fusion_tasks import DIGIT_WORDS, SR, _labels, _splits, digit_image, sentence
from mmbatch.convert.text_to_speech import synthesize
from mmbatch.demo import corpus as demo

# how informative each modality is (chosen so each is clearly imperfect alone)
IMAGE_OCCLUDE, IMAGE_NOISE = 0.3, 0.15
AUDIO_SNR_DB = (-14.0, -6.0)          # speech power (over the word) to noise power
AUDIO_SECONDS = 1.0
TEXT_INFORMATIVE = 0.35
# the speakers: espeak-ng voices and variants, two rates (words per minute) and two pitches each
VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en+m1", "en+m2", "en+m3", "en+m4",
          "en+m5", "en+m7", "en+f1", "en+f2", "en+f3", "en+f4", "en-us+f2")
RATES = (140, 190)
PITCHES = (35, 65)
SPEED = (0.9, 1.1)                    # per-sample speed (and pitch) change by resampling


@functools.lru_cache(maxsize=None)
def spoken(word: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng saying ``word`` (16 kHz float32), leading and trailing silence cut; cached."""
    x = synthesize(word.lower(), voice=voice, words_per_minute=rate, pitch=pitch)
    loud = np.flatnonzero(np.abs(x) > 0.02 * np.abs(x).max())
    return x[loud[0]:loud[-1] + 1]


def noisy_speech(clean: np.ndarray, rng: np.random.Generator, snr_db: tuple[float, float],
                 seconds: float = AUDIO_SECONDS) -> bytes:
    """A cached utterance at a random speed and onset in a ``seconds`` clip, in white + pink
    noise at a random SNR (speech power over the word); FLAC bytes."""
    n = int(seconds * SR)
    word = soxr.resample(clean, SR * float(rng.uniform(*SPEED)), SR)
    if len(word) > n:
        start = int(rng.integers(len(word) - n + 1))
        word = word[start:start + n]
    x = np.zeros(n)
    on = int(rng.integers(n - len(word) + 1))
    x[on:on + len(word)] = word
    white = rng.normal(0, 1, n)
    spec = np.fft.rfft(rng.normal(0, 1, n))
    spec[0] = 0
    spec[1:] /= np.sqrt(np.arange(1, len(spec)))                                # 1/f power: pink
    pink = np.fft.irfft(spec, n)
    mix = float(rng.uniform())
    noise = mix * white / white.std() + (1 - mix) * pink / pink.std()
    p_speech = np.mean(word.astype(np.float64) ** 2) + 1e-12
    x = x + noise * np.sqrt(p_speech / 10 ** (rng.uniform(*snr_db) / 10) / np.mean(noise ** 2))
    x = 0.5 * x / (np.abs(x).max() + 1e-9)
    return demo.encode_flac(x.astype(np.float32))


def spoken_digits(labels, rng: np.random.Generator, snr_db: tuple[float, float] = AUDIO_SNR_DB) -> list[bytes]:
    """One noisy spoken digit word per label: each by a random voice, rate and pitch."""
    keys = [(DIGIT_WORDS[int(c)], VOICES[rng.integers(len(VOICES))], int(rng.choice(RATES)),
             int(rng.choice(PITCHES))) for c in labels]
    with ThreadPoolExecutor(4) as pool:                 # espeak-ng runs as a subprocess: threads overlap
        list(pool.map(lambda k: spoken(*k), sorted(set(keys))))
    return [noisy_speech(spoken(*k), rng, snr_db) for k in keys]


def generate(sizes: tuple[int, int, int], seed: int = 0) -> dict:
    """{"labels", "splits", "image", "audio", "text"}: raw items of the task (JPEG, FLAC bytes, str)."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    y = _labels(n, 10, rng)
    return {"labels": y, "splits": _splits(*sizes),
            "image": [digit_image(int(c), rng, IMAGE_OCCLUDE, IMAGE_NOISE, size=32) for c in y],
            "audio": spoken_digits(y, rng),
            "text": [sentence(int(c), rng, TEXT_INFORMATIVE) for c in y]}


def write_task(root: Path, sizes: tuple[int, int, int], seed: int = 0) -> Path:
    """Media files and ``manifest.jsonl`` under ``root``; returns the manifest's path."""
    task = generate(sizes, seed)
    media = Path(root) / "media"
    media.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (c, split) in enumerate(zip(task["labels"], task["splits"])):
        sid = f"s{i:05d}"
        (media / f"{sid}.jpg").write_bytes(task["image"][i])
        (media / f"{sid}.flac").write_bytes(task["audio"][i])
        lines.append(json.dumps({"sample_id": sid, "image_path": f"media/{sid}.jpg", "audio_path": f"media/{sid}.flac",
                                 "text": task["text"][i], "label": int(c), "label_name": DIGIT_WORDS[int(c)].lower(),
                                 "split": str(split)}))
    manifest = Path(root) / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def sequence_features(n_mels: int = 40, max_frames: int = 100, max_tokens: int = 16) -> dict:
    """The workflow's ``features`` section for the end-to-end model."""
    return {"image": {"extractor": "pixels", "size": 28, "channels": 1},
            "audio": {"extractor": "logmel_frames", "n_mels": n_mels, "max_frames": max_frames},
            "text": {"extractor": "tokens", "max_tokens": max_tokens}}
