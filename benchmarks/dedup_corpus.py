"""A generated corpus with planted duplicates and look-alikes, and the truth to score against.

Two canonical datasets, ``alpha`` (train + test) and ``beta`` (test), each with
image rows (about 100 px drawn shapes on textured backgrounds), audio rows
(espeak-ng sentences) and text rows. Every original in alpha/train gets copies
in the test splits: exact (same bytes / same normalised text) and near (every
transformation the issue lists, cycled). Look-alikes share everything but the
object: the same shape kind on the same background at another place and colour,
the same sentence read by another voice, the same sentence template with other
words. Rows that descend from the same original are duplicates of each other;
any other pair found is a false pair.

Used by tests/test_dedup_accuracy.py and ``python -m benchmarks.duplicates --accuracy``.
"""
from __future__ import annotations

import io
import subprocess
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmbatch.dedup.signatures import content_hash, text_key
from mmbatch.schema import CANONICAL, MODALITIES, with_metadata

SIZE = 100
SPEECH_SR = 16000
GRID = [(x, y) for y in (30, 50, 70) for x in (30, 50, 70)]      # object centres: look-alikes never overlap
IMAGE_TRANSFORMS = ["jpeg60", "jpeg95", "to_png", "half", "double", "resize07", "bright12", "dark08",
                    "contrast125", "contrast08"]
AUDIO_TRANSFORMS = ["gain+6", "gain-6", "resample22k", "resample8k", "ogg", "wav", "lead05", "trail05",
                    "noise25", "pad_noise30"]
TEXT_TRANSFORMS = ["substitute", "insert", "delete", "swap_tail"]
VOICES = [("en+m3", 50, 165), ("en+f2", 65, 160), ("en-us+m1", 40, 150), ("en+f4", 75, 175)]
SENTENCES = [
    "the birch canoe slid on the smooth planks", "glue the sheet to the dark blue background",
    "it is easy to tell the depth of a well", "these days a chicken leg is a rare dish",
    "rice is often served in round bowls", "the juice of lemons makes fine punch",
    "the box was thrown beside the parked truck", "four hours of steady work faced us",
    "a large size in stockings is hard to sell", "the boy was there when the sun rose",
    "a rod is used to catch pink salmon", "the source of the huge river is the clear spring",
    "kick the ball straight and follow through", "help the woman get back to her feet",
    "a pot of tea helps to pass the evening", "smoky fires lack flame and heat",
    "the soft cushion broke the man's fall", "the salt breeze came across from the sea",
    "the girl at the booth sold fifty bonds", "the small pup gnawed a hole in the sock",
    "the fish twisted and turned on the bent hook", "press the pants and sew a button on the vest",
    "the swan dive was far short of perfect", "the beauty of the view stunned the young boy",
]
WORDS = ("apple river stone garden window quiet silver morning engine bridge lantern forest market "
         "violet thunder harbor pencil candle meadow copper whisper valley castle ribbon falcon "
         "orchard canyon glacier marble saddle prairie compass velvet beacon harvest island ember "
         "summit feather crystal timber anchor meadowlark orbit puzzle tunnel walnut blanket").split()


@dataclass
class Corpus:
    paths: dict[str, str]                          # dataset -> folder
    origin: dict[tuple[str, str, str], str] = field(default_factory=dict)   # (dataset, id, modality) -> origin
    exact_of: dict[tuple[str, str, str], str] = field(default_factory=dict)  # ... -> content hash
    kinds: dict[tuple[str, str, str], str] = field(default_factory=dict)     # ... -> how it was made

    def truth(self, modality: str) -> dict[frozenset, str]:
        """Expected pairs {frozenset of two (dataset, id)}: kind ('exact' | 'near')."""
        by_origin: dict[str, list] = {}
        for (d, s, m), o in self.origin.items():
            if m == modality:
                by_origin.setdefault(o, []).append((d, s))
        out = {}
        for rows in by_origin.values():
            for a, b in combinations(sorted(rows), 2):
                same = self.exact_of[(*a, modality)] == self.exact_of[(*b, modality)]
                out[frozenset((a, b))] = "exact" if same else "near"
        return out

    @property
    def rows(self) -> int:
        return len({(d, s) for d, s, _ in self.origin})


# --- images --------------------------------------------------------------------------------------------
def _background(kind: int) -> np.ndarray:
    r = np.random.default_rng(100 + kind)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    base = np.stack([120 + 50 * np.sin(x / (7 + 2 * kind)), 130 + 40 * np.cos(y / (11 + kind)),
                     110 + 45 * np.sin((x + y) / (13 + kind))], -1)
    base += r.normal(0, 8, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def draw_object(bg: int, shape: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """One object of a kind (``shape``) on a background (``bg``), centred in grid ``cell``."""
    import cv2

    im = _background(bg).copy()
    cx, cy = (c + int(rng.integers(-3, 4)) for c in GRID[cell])
    s = int(rng.integers(10, 15))
    grey_bg = float(im[cy, cx].mean())
    while True:                                    # an object that stands out from its background
        col = rng.integers(0, 256, 3)
        if abs(float(col.mean()) - grey_bg) >= 60:
            break
    col = tuple(int(c) for c in col)
    if shape == 0:
        cv2.circle(im, (cx, cy), s, col, -1)
    elif shape == 1:
        cv2.rectangle(im, (cx - s, cy - s), (cx + s, cy + s), col, -1)
    elif shape == 2:
        cv2.fillPoly(im, [np.array([[cx, cy - s], [cx - s, cy + s], [cx + s, cy + s]], np.int32)], col)
    else:
        cv2.ellipse(im, (cx, cy), (s, s // 2), int(rng.integers(0, 180)), 0, 360, col, -1)
    return im


def encode_image(im: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpg" else []
    return cv2.imencode("." + fmt, im, params)[1].tobytes()


def transform_image(im: np.ndarray, how: str) -> bytes:
    import cv2
    from PIL import Image, ImageEnhance

    if how == "jpeg60":
        return encode_image(im, "jpg", 60)
    if how == "jpeg95":
        return encode_image(im, "jpg", 95)
    if how == "to_png":
        return encode_image(cv2.imdecode(np.frombuffer(encode_image(im, "jpg", 80), np.uint8), cv2.IMREAD_COLOR))
    if how in ("half", "double", "resize07"):
        f = {"half": 0.5, "double": 2.0, "resize07": 0.7}[how]
        return encode_image(cv2.resize(im, (int(SIZE * f), int(SIZE * f)), interpolation=cv2.INTER_AREA
                                       if f < 1 else cv2.INTER_CUBIC), "jpg", 80)
    p = Image.fromarray(im[:, :, ::-1])
    enh = {"bright12": (ImageEnhance.Brightness, 1.2), "dark08": (ImageEnhance.Brightness, 0.8),
           "contrast125": (ImageEnhance.Contrast, 1.25), "contrast08": (ImageEnhance.Contrast, 0.8)}[how]
    buf = io.BytesIO()
    enh[0](p).enhance(enh[1]).save(buf, "JPEG", quality=85)
    return buf.getvalue()


# --- audio ---------------------------------------------------------------------------------------------
def speak(text: str, voice: tuple[str, int, int]) -> tuple[np.ndarray, int]:
    """espeak-ng's voice reading ``text``, at 16 kHz (as a speech corpus holds it)."""
    import soundfile as sf
    import soxr

    v, pitch, speed = voice
    wav = subprocess.run(["espeak-ng", "--stdout", "-v", v, "-p", str(pitch), "-s", str(speed), text],
                         capture_output=True, check=True, timeout=60).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(x, sr, SPEECH_SR).astype(np.float32), SPEECH_SR


def encode_audio(x: np.ndarray, sr: int, fmt: str = "FLAC") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt)
    return buf.getvalue()


def transform_audio(x: np.ndarray, sr: int, how: str, rng: np.random.Generator) -> bytes:
    import soxr

    def noise(y, snr_db):
        p = float(np.mean(x ** 2))
        return y + rng.normal(0, np.sqrt(p / 10 ** (snr_db / 10)), y.shape).astype(np.float32)

    pad = np.zeros(int(0.5 * sr), np.float32)
    if how == "gain+6":
        return encode_audio(np.clip(x * 2.0, -1, 1), sr)
    if how == "gain-6":
        return encode_audio(x * 0.5, sr)
    if how in ("resample22k", "resample8k"):
        to = 22050 if how == "resample22k" else 8000
        return encode_audio(soxr.resample(x, sr, to), to)
    if how == "ogg":
        return encode_audio(x, sr, "OGG")
    if how == "wav":
        return encode_audio(x, sr, "WAV")
    if how == "lead05":
        return encode_audio(np.concatenate([pad, x]), sr)
    if how == "trail05":
        return encode_audio(np.concatenate([x, pad]), sr)
    if how == "noise25":
        return encode_audio(np.clip(noise(x, 25.0), -1, 1), sr)
    if how == "pad_noise30":
        return encode_audio(np.clip(noise(np.concatenate([pad[: sr // 4], x, pad]), 30.0), -1, 1), sr)
    raise ValueError(how)


# --- text ----------------------------------------------------------------------------------------------
def make_text(rng: np.random.Generator, n: int) -> list[str]:
    return [str(w) for w in rng.choice(WORDS, size=n, replace=False)]


def transform_text(words: list[str], how: str, rng: np.random.Generator) -> str:
    w = list(words)
    k = int(rng.integers(2, len(w) - 2))
    if how == "substitute":
        w[k] = "zebra"
    elif how == "insert":
        w.insert(k, "indeed")
    elif how == "delete":
        del w[k]
    else:                                  # the last two words swapped, different punctuation/case
        w[-2], w[-1] = w[-1], w[-2]
        return " ".join(w).capitalize() + "!"
    return " ".join(w)


# --- the corpus ----------------------------------------------------------------------------------------
def build_corpus(root, *, images: int = 32, audio: int = 12, texts: int = 40, seed: int = 0) -> Corpus:
    """Write alpha/ and beta/ (canonical Parquet, two shards each) under ``root``; return the truth.

    At most 128 images (8 backgrounds x 4 kinds x 4 instances on a 9-cell grid) and 24 sentences."""
    if images > 128 or audio > len(SENTENCES):
        raise ValueError(f"at most 128 images and {len(SENTENCES)} audio originals")
    from pathlib import Path

    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict]] = {"alpha": [], "beta": []}
    c = Corpus(paths={d: str(Path(root) / d) for d in rows})

    def add(ds, sid, split, modality, value, origin, kind):
        row = {"sample_id": sid, "source": "manifest", "split": split}
        row[modality] = value if modality == "text" else {"bytes": value, "path": f"{sid}.bin"}
        rows[ds].append(row)
        c.origin[(ds, sid, modality)] = origin
        c.exact_of[(ds, sid, modality)] = text_key(value) if modality == "text" else content_hash(value)
        c.kinds[(ds, sid, modality)] = kind

    def place(i):        # copies alternate between alpha/test and beta/test
        return ("alpha", "test") if i % 2 == 0 else ("beta", "test")

    # images: originals in alpha/train; per class (background x shape) the grid cells are dealt out
    # without repeats, so no two instances of a class overlap
    cells: dict[tuple[int, int], list[int]] = {}
    backgrounds = 4 if images <= 64 else 8            # at most 4 instances of a class on the 9-cell grid
    for i in range(images):
        bg, shape = i % backgrounds, (i // backgrounds) % 4
        free = cells.setdefault((bg, shape), list(rng.permutation(len(GRID))))
        im = draw_object(bg, shape, free.pop(), rng)
        fmt = "png" if i % 2 == 0 else "jpg"
        orig = encode_image(im, fmt)
        o = f"img{i}"
        add("alpha", f"i{i:03d}", "train", "image", orig, o, f"original-{fmt}")
        for j in range(2):
            how = IMAGE_TRANSFORMS[(2 * i + j) % len(IMAGE_TRANSFORMS)]
            ds, split = place(i + j)
            add(ds, f"i{i:03d}-near{j}", split, "image", transform_image(im, how), o, how)
        if i % 4 == 0:
            ds, split = place(i + 1)
            add(ds, f"i{i:03d}-exact", split, "image", orig, o, "exact")
        lookalike = draw_object(bg, shape, free.pop(), rng)          # same kind, same background
        ds, split = place(i)
        add(ds, f"i{i:03d}-look", split, "image", encode_image(lookalike, "jpg", 90), f"{o}-look",
            "lookalike")
    # audio: originals by voice 0 in alpha/train; look-alikes: the same sentence by the other voices
    for i in range(audio):
        text = SENTENCES[i % len(SENTENCES)]
        x, sr = speak(text, VOICES[0])
        orig = encode_audio(x, sr)
        o = f"aud{i}"
        add("alpha", f"a{i:03d}", "train", "audio", orig, o, "original-flac")
        for j in range(2):
            how = AUDIO_TRANSFORMS[(2 * i + j) % len(AUDIO_TRANSFORMS)]
            ds, split = place(i + j)
            add(ds, f"a{i:03d}-near{j}", split, "audio", transform_audio(x, sr, how, rng), o, how)
        if i % 4 == 0:
            ds, split = place(i + 1)
            add(ds, f"a{i:03d}-exact", split, "audio", orig, o, "exact")
        voice = VOICES[1 + i % (len(VOICES) - 1)]
        y, sr2 = speak(text, voice)
        ds, split = place(i)
        add(ds, f"a{i:03d}-look", split, "audio", encode_audio(y, sr2), f"{o}-look",
            f"lookalike-{voice[0]}")
    # texts: random word sequences of 12-18 words; look-alikes share a third of the words
    for i in range(texts):
        words = make_text(rng, int(rng.integers(12, 19)))
        o = f"txt{i}"
        add("alpha", f"t{i:03d}", "train", "text", " ".join(words), o, "original")
        how = TEXT_TRANSFORMS[i % len(TEXT_TRANSFORMS)]
        ds, split = place(i)
        new = transform_text(words, how, rng)
        add(ds, f"t{i:03d}-near", split, "text", new, o, how)
        if i % 4 == 0:
            ds, split = place(i + 1)
            add(ds, f"t{i:03d}-exact", split, "text", " ".join(words).upper() + ".", o, "exact-normalised")
        look = list(words)
        for k in rng.choice(len(look), size=2 * len(look) // 3, replace=False):
            look[k] = str(rng.choice(WORDS))
        ds, split = place(i + 1)
        add(ds, f"t{i:03d}-look", split, "text", " ".join(look), f"{o}-look", "lookalike")
        if i % 8 == 0:          # a short text and a one-word edit of it: below 8 words, never near
            short = words[:5]
            add("alpha", f"t{i:03d}-short", "train", "text", " ".join(short), f"{o}-short", "short")
            ds, split = place(i)
            add(ds, f"t{i:03d}-short2", split, "text", " ".join(short[:4] + ["zebra"]), f"{o}-short2",
                "short-edit")
    for ds, rs in rows.items():
        Path(c.paths[ds]).mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rs, schema=with_metadata(CANONICAL, {"stage": "ingest", "kind": "manifest"}))
        half = table.num_rows // 2
        pq.write_table(table.slice(0, half), str(Path(c.paths[ds]) / "shard-00000.parquet"))
        pq.write_table(table.slice(half), str(Path(c.paths[ds]) / "shard-00001.parquet"))
    return c


def score(corpus: Corpus, pairs: pa.Table) -> dict:
    """Recall per modality and kind, and the false pairs (with the rows they involve)."""
    found: dict[str, dict[frozenset, str]] = {}
    for r in pairs.to_pylist():
        key = frozenset(((r["a_dataset"], r["a_sample_id"]), (r["b_dataset"], r["b_sample_id"])))
        found.setdefault(r["modality"], {})[key] = r["kind"]
    out = {"rows": corpus.rows, "modalities": {}}
    false_rows = set()
    for m in MODALITIES:
        truth = found_m = None
        truth = corpus.truth(m)
        found_m = found.get(m, {})
        res = {}
        for kind in ("exact", "near"):
            want = [k for k, v in truth.items() if v == kind]
            got = [k for k in want if found_m.get(k) == kind]
            res[f"{kind}_pairs"] = len(want)
            res[f"{kind}_recall"] = len(got) / len(want) if want else 1.0
            res[f"{kind}_missed"] = sorted(sorted(map(list, k)) for k in want if found_m.get(k) != kind)
        false = [k for k in found_m if k not in truth]
        res["false_pairs"] = len(false)
        res["false"] = sorted(sorted(map(list, k)) for k in false)
        false_rows.update(x for k in false for x in k)
        out["modalities"][m] = res
    out["rows_in_false_pairs"] = len(false_rows)
    out["false_row_fraction"] = len(false_rows) / max(1, corpus.rows)
    return out
