"""Generate small corpora in the real on-disk layouts, with learnable labels.

Used by ``mmbatch demo``, the tests and the benchmarks. Class ``c`` (of 4) is
split into two bits: the image shows ``a = c // 2`` (warm vs cool colours), the
audio ``b = c % 2`` (low vs high pitch), the transcript ``a xor b`` (two word
pools). Each modality alone is ambiguous (about 50 % on 4 classes); image +
audio, or audio + text, together are not.

Layouts written (the layouts the ingest readers in ``mmbatch.ingest.sources`` document):
- ImageNet: ``imagenet/train/<wnid>/<wnid>_<n>.JPEG``, ``imagenet/val/<wnid>/...``, ``LOC_synset_mapping.txt``
- LibriSpeech: ``LibriSpeech/<part>/<reader>/<chapter>/<reader>-<chapter>-NNNN.flac``,
  ``<reader>-<chapter>.trans.txt``, ``SPEAKERS.TXT``
- TIMIT (LDC, upper case): ``timit/TRAIN|TEST/DR<n>/<SPK>/<UTT>.WAV|TXT|WRD|PHN`` with SPHERE audio
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

from mmbatch.ingest.sources import sphere

NUM_CLASSES = 4
WNIDS = [f"n0{1000000 + 1111 * c:07d}"[:9] for c in range(NUM_CLASSES)]  # sorted == class order
CLASS_NAMES = ["warm low", "warm high", "cool low", "cool high"]
READERS = [str(1001 + c) for c in range(NUM_CLASSES)]                  # sorted == class order
READER_SEX = ["F", "M", "F", "M"]
WORDS = [
    ["RED", "APPLE", "RIVER", "STONE", "FIRE", "BREAD", "HORSE", "GARDEN"],
    ["BLUE", "OCEAN", "CLOUD", "GLASS", "SNOW", "WINDOW", "LETTER", "SILVER"],
]
FILLER = ["THE", "A", "AND", "OF", "TO", "IN", "WAS", "HE", "SHE", "IT", "THAT", "WITH"]
SR = 16000


def bits(c: int) -> tuple[int, int, int]:
    a, b = c // 2, c % 2
    return a, b, a ^ b


def make_image(c: int, rng: np.random.Generator, width: int = 128, height: int = 96) -> np.ndarray:
    """BGR uint8 image: textured background plus shapes, warm (a=0) or cool (a=1) palette."""
    a, _, _ = bits(c)
    img = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        hue = rng.uniform(0, 25) if a == 0 else rng.uniform(95, 125)        # OpenCV hue 0..180
        colour = cv2.cvtColor(np.uint8([[[hue, rng.uniform(150, 255), rng.uniform(150, 255)]]]),
                              cv2.COLOR_HSV2BGR)[0, 0].tolist()
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if rng.random() < 0.5:
            cv2.circle(img, centre, int(rng.integers(8, 30)), colour, -1)
        else:
            cv2.rectangle(img, centre, (centre[0] + int(rng.integers(10, 40)), centre[1] + int(rng.integers(10, 40))),
                          colour, -1)
    return img


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def make_audio(b: int, rng: np.random.Generator, seconds: float | None = None, sr: int = SR,
               base: float | None = None) -> np.ndarray:
    """float32 mono clip: a harmonic tone, low (b=0) or high (b=1) pitch, with noise and an envelope."""
    seconds = seconds if seconds is not None else float(rng.uniform(0.8, 1.8))
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = base if base is not None else (rng.uniform(180, 320) if b == 0 else rng.uniform(900, 1400))
    wave = sum((0.5 / k) * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3))
    env = np.minimum(1.0, np.minimum(t, t[::-1]) * 20)
    noise = rng.normal(0, 0.05, n)
    return (0.5 * wave * env + noise).astype(np.float32)


def encode_flac(x: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def make_sentence(t: int, rng: np.random.Generator, n_words: int | None = None) -> list[str]:
    n_words = n_words or int(rng.integers(5, 10))
    words = []
    for _ in range(n_words):
        pool = WORDS[t] if rng.random() < 0.5 else FILLER
        words.append(str(rng.choice(pool)))
    return words


@dataclass
class DemoCorpus:
    root: Path
    imagenet: Path
    librispeech: Path
    timit: Path


def write_imagenet(root: Path, per_class: int, seed: int = 0, val_fraction: float = 0.3) -> Path:
    rng = np.random.default_rng(seed)
    base = root / "imagenet"
    n_val = max(1, int(round(per_class * val_fraction)))
    for c, wnid in enumerate(WNIDS):
        for split, count in (("train", per_class - n_val), ("val", n_val)):
            d = base / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                n = int(rng.integers(1, 99999))
                (d / f"{wnid}_{n}{i:03d}.JPEG").write_bytes(encode_jpeg(make_image(c, rng)))
    (base / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} {name}\n" for w, name in zip(WNIDS, CLASS_NAMES)))
    return base


def write_librispeech(root: Path, per_class: int, seed: int = 1,
                      parts: tuple[str, ...] = ("train-clean-5", "dev-clean-2")) -> Path:
    rng = np.random.default_rng(seed)
    base = root / "LibriSpeech"
    base.mkdir(parents=True, exist_ok=True)
    speakers = [";ID  |SEX| SUBSET           |MINUTES| NAME"]
    for c, reader in enumerate(READERS):
        _, b, t = bits(c)
        speakers.append(f"{reader:<5}| {READER_SEX[c]} | {parts[0]:<16} | 25.00 | Reader {reader}")
        for p_i, part in enumerate(parts):
            count = per_class - per_class // 3 if p_i == 0 else per_class // 3
            chapter = str(2000 + 10 * c + p_i)
            d = base / part / reader / chapter
            d.mkdir(parents=True, exist_ok=True)
            lines = []
            for i in range(count):
                uid = f"{reader}-{chapter}-{i:04d}"
                (d / f"{uid}.flac").write_bytes(encode_flac(make_audio(b, rng)))
                lines.append(f"{uid} {' '.join(make_sentence(t, rng))}")
            (d / f"{reader}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    (base / "SPEAKERS.TXT").write_text("\n".join(speakers) + "\n")
    return base


TIMIT_SPEAKERS = {  # speaker -> (split dir, dialect region); FAKS0 is a dev speaker, FDHC0/MJMP0 core test
    "FCJF0": ("TRAIN", "DR1"), "MDAB1": ("TRAIN", "DR1"), "FDAW0": ("TRAIN", "DR2"), "MRCG0": ("TRAIN", "DR2"),
    "FAKS0": ("TEST", "DR1"), "MMDB1": ("TEST", "DR2"), "FDHC0": ("TEST", "DR1"), "MJMP0": ("TEST", "DR2"),
}
TIMIT_PHONES = ["h#", "sh", "iy", "hv", "ae", "dcl", "d", "y", "er", "q", "h#"]


def write_timit(root: Path, utts_per_speaker: int = 4, seed: int = 2, byte_format: str = "01") -> Path:
    """LDC-style TIMIT (upper case): SPHERE audio, .TXT/.WRD/.PHN alignments in samples."""
    rng = np.random.default_rng(seed)
    base = root / "timit"
    for spk, (split, dr) in TIMIT_SPEAKERS.items():
        d = base / split / dr / spk
        d.mkdir(parents=True, exist_ok=True)
        female = spk[0] == "F"
        utts = ["SA1", "SA2"] + [f"SX{100 + i}" for i in range(utts_per_speaker // 2)] + \
               [f"SI{1200 + i}" for i in range(utts_per_speaker - utts_per_speaker // 2)]
        for utt in utts:
            x = make_audio(int(female), rng, seconds=float(rng.uniform(1.0, 2.0)),
                           base=float(rng.uniform(200, 260) if female else rng.uniform(100, 140)))
            n = len(x)
            (d / f"{utt}.WAV").write_bytes(sphere.encode(x, SR, byte_format=byte_format,
                                                         extra={"utterance_id": f"{spk.lower()}_{utt.lower()}"}))
            words = make_sentence(int(female), rng, n_words=4)
            (d / f"{utt}.TXT").write_text(f"0 {n} {' '.join(w.capitalize() for w in words)}.\n")
            bounds = np.linspace(0, n, len(words) + 1).astype(int)
            (d / f"{utt}.WRD").write_text("".join(
                f"{bounds[i]} {bounds[i + 1]} {w.lower()}\n" for i, w in enumerate(words)))
            pb = np.linspace(0, n, len(TIMIT_PHONES) + 1).astype(int)
            (d / f"{utt}.PHN").write_text("".join(
                f"{pb[i]} {pb[i + 1]} {p}\n" for i, p in enumerate(TIMIT_PHONES)))
    return base


def write_demo_corpus(root: str | Path, per_class: int = 48, seed: int = 0) -> DemoCorpus:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return DemoCorpus(
        root=root,
        imagenet=write_imagenet(root, per_class, seed=seed),
        librispeech=write_librispeech(root, per_class, seed=seed + 1),
        timit=write_timit(root, seed=seed + 2),
    )
