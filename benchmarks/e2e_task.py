"""The AV-shaped task of the end-to-end benchmark, as media files + a JSONL manifest.

10 classes; per sample a 28x28-ish handwritten-looking digit image (partly occluded, noisy),
a 1 s noisy keypad-tone "word" for the class (FLAC, a spoken-digit stand-in: no speech
synthesiser is needed), and a short, weakly informative sentence. The generators are those
of :mod:`benchmarks.fusion_tasks`; the split is fixed by position (train / validation / test).

``write_task(root, sizes, seed)`` writes ``root/media/*`` and ``root/manifest.jsonl``, which
``mmbatch ingest manifest`` turns into one canonical dataset with all three modalities.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.fusion_tasks import DIGIT_WORDS, _labels, _splits, digit_image, sentence, tone_code

# how informative each modality is (chosen so each is clearly imperfect alone)
IMAGE_OCCLUDE, IMAGE_NOISE = 0.3, 0.15
AUDIO_SNR_DB = (-26.0, -16.0)
AUDIO_SECONDS = 1.0
TEXT_INFORMATIVE = 0.35


def generate(sizes: tuple[int, int, int], seed: int = 0) -> dict:
    """{"labels", "splits", "image", "audio", "text"}: raw items of the task (JPEG, FLAC bytes, str)."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    y = _labels(n, 10, rng)
    return {"labels": y, "splits": _splits(*sizes),
            "image": [digit_image(int(c), rng, IMAGE_OCCLUDE, IMAGE_NOISE, size=32) for c in y],
            "audio": [tone_code(int(c), rng, AUDIO_SNR_DB, seconds=AUDIO_SECONDS) for c in y],
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
