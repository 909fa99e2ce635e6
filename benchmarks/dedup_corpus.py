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
# the copies #35 lists (both corpora plant each alone and all of them combined)
ISSUE_IMAGE = ["jpeg60-80", "resize075", "resize15", "level+12", "level-12", "combined"]
ISSUE_AUDIO = ["gain+6", "gain-6", "wav22k", "lead0-200", "noise30", "combined"]
IMAGE_TRANSFORMS = ["jpeg60", "jpeg95", "to_png", "half", "double", "resize07", "bright12", "dark08",
                    "contrast125", "contrast08", *ISSUE_IMAGE]
AUDIO_TRANSFORMS = ["gain+6", "gain-6", "resample22k", "resample8k", "ogg", "wav", "lead05", "trail05",
                    "noise25", "pad_noise30", "wav22k", "lead0-200", "noise30", "combined"]
TEXT_TRANSFORMS = ["substitute", "insert", "delete", "swap_tail"]
VOICES = [("en+m3", 50, 165), ("en+f2", 65, 160), ("en-us+m1", 40, 150), ("en+f4", 75, 175)]
BABBLE_VOICES = [("en+m2", 45, 170), ("en+f3", 70, 165), ("en-us+m4", 55, 150), ("en+f1", 60, 180)]
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
    splits: dict[tuple[str, str], str] = field(default_factory=dict)         # (dataset, id) -> split

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


def shift_levels(im: np.ndarray, delta: int) -> np.ndarray:
    """Every channel brightened (delta > 0) or darkened by ``delta`` grey levels, clipped."""
    return np.clip(im.astype(np.int16) + int(delta), 0, 255).astype(np.uint8)


def rescale(im: np.ndarray, f: float) -> np.ndarray:
    import cv2

    h, w = im.shape[:2]
    return cv2.resize(im, (int(round(w * f)), int(round(h * f))),
                      interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)


def transform_image(im: np.ndarray, how: str, rng: np.random.Generator | None = None) -> bytes:
    """One copy of ``im``: the names of :data:`IMAGE_TRANSFORMS` (the #35 ones draw their JPEG
    quality in 60-80 and their level shift in 4-12 from ``rng``)."""
    import cv2
    from PIL import Image, ImageEnhance

    rng = rng if rng is not None else np.random.default_rng(0)
    q = int(rng.integers(60, 81))
    d = int(rng.integers(4, 13))
    if how == "jpeg60-80":
        return encode_image(im, "jpg", q)
    if how in ("resize075", "resize15"):
        return encode_image(rescale(im, 0.75 if how == "resize075" else 1.5), "jpg", 90)
    if how in ("level+12", "level-12"):
        return encode_image(shift_levels(im, d if how == "level+12" else -d), "jpg", 90)
    if how == "combined":                 # resized, shifted and re-encoded at once
        f = 0.75 if rng.random() < 0.5 else 1.5
        return encode_image(shift_levels(rescale(im, f), d * (1 if rng.random() < 0.5 else -1)), "jpg", q)
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


def make_noise(kind: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise: ``white``, ``pink`` (1/f), ``brown`` (1/f^2), ``hum`` (50 Hz mains and
    harmonics plus a little hiss) or ``babble`` (four other espeak-ng voices reading other words)."""
    if kind == "white":
        y = rng.normal(size=n)
    elif kind in ("pink", "brown"):
        spec = np.fft.rfft(rng.normal(size=n))
        f = np.fft.rfftfreq(n, 1 / sr)
        spec[1:] /= f[1:] ** (0.5 if kind == "pink" else 1.0)
        spec[0] = 0
        y = np.fft.irfft(spec, n)
    elif kind == "hum":
        t = np.arange(n) / sr
        y = sum(np.sin(2 * np.pi * 50 * h * t + rng.random() * 6.28) / h for h in (1, 2, 3, 5))
        y = y + 0.1 * rng.normal(size=n)
    elif kind == "babble":
        y = np.zeros(n)
        for k in range(4):
            words = " ".join(rng.choice(WORDS, size=12))
            v, vsr = speak(words, BABBLE_VOICES[k % len(BABBLE_VOICES)])
            v = np.resize(v, n) if len(v) < n else v[:n]
            y = y + np.roll(v, int(rng.integers(0, n)))
    else:
        raise ValueError(f"noise kind {kind!r}: one of white, pink, brown, hum, babble")
    y = np.asarray(y, np.float64)
    return (y / (np.sqrt(np.mean(y ** 2)) + 1e-12)).astype(np.float32)


def transform_audio(x: np.ndarray, sr: int, how: str, rng: np.random.Generator, noise_kind: str = "white") -> bytes:
    """One copy of ``x``: the names of :data:`AUDIO_TRANSFORMS`; the #35 ones (``wav22k``,
    ``lead0-200``, ``noise30``, ``combined``) add noise of ``noise_kind``."""
    import soxr

    def noise(y, snr_db, kind="white"):
        p = float(np.mean(x ** 2))
        return y + np.sqrt(p / 10 ** (snr_db / 10)) * make_noise(kind, len(y), sr, rng)

    if how == "wav22k":
        return encode_audio(soxr.resample(x, sr, 22050), 22050, "WAV")
    if how == "lead0-200":
        return encode_audio(np.concatenate([np.zeros(int(sr * rng.uniform(0, 0.2)), np.float32), x]), sr)
    if how == "noise30":
        return encode_audio(np.clip(noise(x, 30.0, noise_kind), -1, 1), sr)
    if how == "combined":        # gain, leading silence, noise, then a 22,050 Hz WAV
        y = x * (2.0 if rng.random() < 0.5 else 0.5)
        y = np.concatenate([np.zeros(int(sr * rng.uniform(0, 0.2)), np.float32), y])
        p = float(np.mean(y ** 2))
        y = y + np.sqrt(p / 1000.0) * make_noise(noise_kind, len(y), sr, rng)
        return encode_audio(soxr.resample(np.clip(y, -1, 1).astype(np.float32), sr, 22050), 22050, "WAV")
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


# --- the held-out generator: other objects, textures, voices, rates, noises and texts -----------------
OBJ_SIZE = 96
PALETTE = {"yellow": (0, 220, 240), "pale blue": (235, 200, 150), "white": (245, 245, 245),
           "blue": (200, 80, 30), "green": (60, 170, 60), "red": (40, 40, 210), "orange": (30, 140, 250),
           "purple": (160, 60, 130), "pink": (190, 150, 250), "brown": (40, 80, 130), "grey": (140, 140, 140),
           "teal": (150, 150, 0)}
OBJ_KINDS = ["star", "cross", "ring", "diamond", "hexagon", "arrow", "crescent", "tee", "ell", "pill"]
TEXTURES = ["solid", "stripes", "checker", "dots"]
SCENES = 6
HELD_VOICES = [("en-gb-scotland", 45, 150), ("en-029", 60, 185), ("en-us-nyc", 35, 135), ("en-gb-x-rp+f3", 70, 170),
               ("en-gb-x-gbclan+m4", 50, 200), ("en-us+f5", 80, 125)]
HELD_NOISES = ["pink", "brown", "hum", "babble"]
HELD_SENTENCES = [
    "open the door", "bring the red cup", "stop here", "take the blue line north",
    "a hot cup of tea", "wait for the green light", "call me at noon", "the dog ran home",
    "the stray cat gave birth to kittens", "the lazy cow lay in the cool grass",
    "lift the square stone over the fence", "the rope will bind the seven books at once",
    "hop over the fence and plunge in", "the friendly gang left the drug store",
    "mesh wire keeps chicks inside", "the frosty air passed through the coat",
    "the crooked maze failed to fool the mouse", "adding fast leads to wrong sums",
    "the show was a flop from the very start", "a saw is a tool used for making boards",
    "the wagon moved on well oiled wheels", "march the soldiers past the next hill",
    "a cup of sugar makes sweet fudge", "place a rosebush near the porch steps",
    "both lost their lives in the raging storm", "we talked of the side show in the circus",
    "use a pencil to write the first draft", "he ran half way to the hardware store",
    "the clock struck to mark the third period", "a small creek cut across the field",
    "cars and busses stalled in snow drifts", "the set of china hit the floor with a crash",
    "this is a grand season for hikes on the road", "the dune rose from the edge of the water",
    "those words were the cue for the actor to leave", "a yacht slid around the point into the bay",
    "the two met while playing on the sand", "the ink stain dried on the finished page",
    "the walled town was seized without a fight", "the lease ran out in sixteen weeks",
]
T_ADJ = "old new red small quiet bright heavy narrow wooden silver broken gentle rusty golden hidden".split()
T_NOUN = ("farmer teacher bridge kettle garden window river ladder pilot harbor basket doctor train "
          "lantern village tower").split()
T_VERB = "painted carried watched repaired followed opened lifted measured cleaned visited".split()
T_PREP = "near behind beside under above across".split()


def _scene(k: int) -> np.ndarray:
    """A textured photo-like background: smooth colour blotches with grain (seeded by ``k``)."""
    import cv2

    r = np.random.default_rng(500 + k)
    low = r.uniform(40, 215, size=(int(r.integers(3, 7)), int(r.integers(3, 7)), 3)).astype(np.float32)
    im = cv2.resize(low, (OBJ_SIZE, OBJ_SIZE), interpolation=cv2.INTER_CUBIC)
    y, x = np.mgrid[0:OBJ_SIZE, 0:OBJ_SIZE].astype(np.float32)
    im += (8 * np.sin((x * np.cos(k) + y * np.sin(k)) / (3 + 2 * (k % 3))))[..., None]      # grain
    im += r.normal(0, 6, im.shape).astype(np.float32)
    return np.clip(im, 0, 255).astype(np.uint8)


def _object_mask(kind: str, cx: int, cy: int, s: int, angle: float) -> np.ndarray:
    import cv2

    m = np.zeros((OBJ_SIZE, OBJ_SIZE), np.uint8)
    ca, sa = np.cos(angle), np.sin(angle)

    def poly(pts):
        p = np.array([[cx + s * (u * ca - v * sa), cy + s * (u * sa + v * ca)] for u, v in pts], np.int32)
        cv2.fillPoly(m, [p], 255)

    if kind == "star":
        poly([(np.cos(t) * (1 if k % 2 == 0 else 0.45), np.sin(t) * (1 if k % 2 == 0 else 0.45))
              for k, t in enumerate(np.linspace(0, 2 * np.pi, 11)[:-1] - np.pi / 2)])
    elif kind == "cross":
        poly([(-0.3, -1), (0.3, -1), (0.3, 1), (-0.3, 1)])
        poly([(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)])
    elif kind == "ring":
        cv2.circle(m, (cx, cy), s, 255, -1)
        cv2.circle(m, (cx, cy), s // 2, 0, -1)
    elif kind == "diamond":
        poly([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)])
    elif kind == "hexagon":
        poly([(np.cos(t), np.sin(t)) for t in np.linspace(0, 2 * np.pi, 7)[:-1]])
    elif kind == "arrow":
        poly([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)])
    elif kind == "crescent":
        cv2.circle(m, (cx, cy), s, 255, -1)
        cv2.circle(m, (int(cx + 0.5 * s * ca), int(cy + 0.5 * s * sa)), s, 0, -1)
    elif kind == "tee":
        poly([(-1, -1), (1, -1), (1, -0.5), (-1, -0.5)])
        poly([(-0.25, -0.5), (0.25, -0.5), (0.25, 1), (-0.25, 1)])
    elif kind == "ell":
        poly([(-0.8, -1), (-0.3, -1), (-0.3, 0.5), (0.8, 0.5), (0.8, 1), (-0.8, 1)])
    else:                                                    # pill
        poly([(-0.6, -0.45), (0.6, -0.45), (0.6, 0.45), (-0.6, 0.45)])
        for u in (-0.6, 0.6):
            cv2.circle(m, (int(cx + s * u * ca), int(cy + s * u * sa)), int(0.45 * s), 255, -1)
    return m


def draw_item(kind: int, scene: int, pose: tuple, colour: str, texture: str) -> np.ndarray:
    """One object of ``OBJ_KINDS[kind]`` on background ``scene`` at ``pose`` (cx, cy, size, angle),
    painted ``PALETTE[colour]`` with a ``texture`` and a soft shading, with a drop shadow."""
    import cv2

    cx, cy, s, angle = pose
    im = _scene(scene).astype(np.float32)
    mask = _object_mask(OBJ_KINDS[kind], cx, cy, s, angle).astype(np.float32) / 255
    shadow = cv2.GaussianBlur(np.roll(mask, (3, 3), (0, 1)), (7, 7), 2)[..., None]
    im *= 1 - 0.35 * shadow
    y, x = np.mgrid[0:OBJ_SIZE, 0:OBJ_SIZE].astype(np.float32)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    pattern = {"solid": np.ones_like(u), "stripes": np.where((u // 4) % 2 == 0, 1.0, 0.55),
               "checker": np.where(((u // 5) + (v // 5)) % 2 == 0, 1.0, 0.6),
               "dots": np.where(((u % 10) - 5) ** 2 + ((v % 10) - 5) ** 2 < 10, 0.5, 1.0)}[texture]
    shade = (0.85 + 0.15 * (-(u + v) / (2 * s))).clip(0.6, 1.1)
    paint = np.array(PALETTE[colour], np.float32)[None, None, :] * (pattern * shade)[..., None]
    im = im * (1 - mask[..., None]) + np.clip(paint, 0, 255) * mask[..., None]
    return np.clip(im, 0, 255).astype(np.uint8)


def held_text(rng: np.random.Generator) -> list[str]:
    """A template sentence of 13 words: many words shared with any other (the, of ...)."""
    c = lambda xs: str(rng.choice(xs))      # noqa: E731
    return ["the", c(T_ADJ), c(T_NOUN), c(T_VERB), "the", c(T_ADJ), c(T_NOUN), c(T_PREP), "the",
            c(T_NOUN), "of", "the", c(T_NOUN)]


# --- the corpora -----------------------------------------------------------------------------------------
GENERATORS = ("shapes", "objects")      # the tuning corpus and the held-out corpus


@dataclass
class _Builder:
    corpus: Corpus
    rows: dict

    def add(self, ds, sid, split, modality, value, origin, kind):
        row = {"sample_id": sid, "source": "manifest", "split": split}
        row[modality] = value if modality == "text" else {"bytes": value, "path": f"{sid}.bin"}
        self.rows[ds].append(row)
        key = (ds, sid, modality)
        self.corpus.origin[key] = origin
        self.corpus.exact_of[key] = text_key(value) if modality == "text" else content_hash(value)
        self.corpus.kinds[key] = kind
        self.corpus.splits[(ds, sid)] = split


def place(i):
    """Copies alternate between alpha/test and beta/test."""
    return ("alpha", "test") if i % 2 == 0 else ("beta", "test")


def _shapes_images(n: int, rng) -> list:
    """(original, look-alikes) of the tuning corpus: drawn shapes on 4 or 8 backgrounds; a look-alike
    is the same kind on the same background at another place, in another colour."""
    cells: dict = {}
    backgrounds = 4 if n <= 64 else 8            # at most 4 instances of a class on the 9-cell grid
    out = []
    for i in range(n):
        bg, shape = i % backgrounds, (i // backgrounds) % 4
        free = cells.setdefault((bg, shape), list(rng.permutation(len(GRID))))
        im = draw_object(bg, shape, free.pop(), rng)
        out.append((im, [("lookalike", draw_object(bg, shape, free.pop(), rng))]))
    return out


def _objects_images(n: int, rng) -> list:
    """(original, look-alikes) of the held-out corpus: 10 kinds of textured objects on 6 scenes; the
    look-alikes keep kind, scene and pose and change the colour (one of them) or the texture."""
    out = []
    names = list(PALETTE)
    for i in range(n):
        kind, scene = i % len(OBJ_KINDS), (i // len(OBJ_KINDS)) % SCENES
        pose = (int(rng.integers(40, 57)), int(rng.integers(40, 57)), int(rng.integers(22, 31)),
                float(rng.uniform(0, np.pi)))
        colour, texture = str(rng.choice(names)), str(rng.choice(TEXTURES))
        other = str(rng.choice([c for c in names if c != colour]))
        other_tex = str(rng.choice([t for t in TEXTURES if t != texture]))
        out.append((draw_item(kind, scene, pose, colour, texture),
                    [(f"lookalike-colour-{other}", draw_item(kind, scene, pose, other, texture)),
                     (f"lookalike-texture-{other_tex}", draw_item(kind, scene, pose, colour, other_tex))]))
    return out


def _images(b: _Builder, gen: str, n: int, rng) -> None:
    items = (_shapes_images if gen == "shapes" else _objects_images)(n, rng)
    transforms = IMAGE_TRANSFORMS if gen == "shapes" else ISSUE_IMAGE
    copies = 2 if gen == "shapes" else 3
    for i, (im, looks) in enumerate(items):
        fmt = "png" if i % 2 == 0 else "jpg"
        orig = encode_image(im, fmt)
        o = f"img{i}"
        b.add("alpha", f"i{i:03d}", "train", "image", orig, o, f"original-{fmt}")
        for j in range(copies):
            how = transforms[(copies * i + j) % len(transforms)]
            b.add(place(i + j)[0], f"i{i:03d}-near{j}", "test", "image", transform_image(im, how, rng), o, how)
        if i % 4 == 0:
            b.add(place(i + 1)[0], f"i{i:03d}-exact", "test", "image", orig, o, "exact")
        for k, (kind, look) in enumerate(looks):        # the first in a test split, the others in train
            ds, split = place(i) if k == 0 else ("alpha", "train")
            b.add(ds, f"i{i:03d}-look{k}", split, "image", encode_image(look, "jpg", 90), f"{o}-look{k}", kind)


def _audio(b: _Builder, gen: str, n: int, rng) -> None:
    sentences, voices = (SENTENCES, VOICES) if gen == "shapes" else (HELD_SENTENCES, HELD_VOICES)
    transforms = AUDIO_TRANSFORMS if gen == "shapes" else ISSUE_AUDIO
    copies = 2 if gen == "shapes" else 3
    if n > len(sentences):
        raise ValueError(f"at most {len(sentences)} audio originals in the {gen} corpus")
    for i in range(n):
        text = sentences[i]
        voice = voices[0] if gen == "shapes" else voices[i % len(voices)]
        x, sr = speak(text, voice)
        orig = encode_audio(x, sr)
        o = f"aud{i}"
        b.add("alpha", f"a{i:03d}", "train", "audio", orig, o, "original-flac")
        # odd originals get the noisy copies (noise30, combined): each noise kind comes round among them
        noise = "white" if gen == "shapes" else HELD_NOISES[(i // 2) % len(HELD_NOISES)]
        for j in range(copies):
            how = transforms[(copies * i + j) % len(transforms)]
            ds, split = place(i + j)
            b.add(ds, f"a{i:03d}-near{j}", split, "audio", transform_audio(x, sr, how, rng, noise), o,
                  how if how not in ISSUE_AUDIO or noise == "white" else f"{how}-{noise}")
        if i % 4 == 0:
            b.add(place(i + 1)[0], f"a{i:03d}-exact", "test", "audio", orig, o, "exact")
        other = [v for v in voices if v != voice][i % (len(voices) - 1)]
        y, sr2 = speak(text, other)                      # the same words from another speaker
        b.add(*place(i)[:1], f"a{i:03d}-look", place(i)[1], "audio", encode_audio(y, sr2), f"{o}-look",
              f"lookalike-{other[0]}")


def _texts(b: _Builder, gen: str, n: int, rng) -> None:
    """Near copies: one word substituted, inserted or deleted, or the last two swapped; exact
    copies re-cased and re-punctuated; look-alikes: two thirds of the words replaced (shapes) or the
    same template with other content words (objects)."""
    for i in range(n):
        words = make_text(rng, int(rng.integers(12, 19))) if gen == "shapes" else held_text(rng)
        o = f"txt{i}"
        b.add("alpha", f"t{i:03d}", "train", "text", " ".join(words), o, "original")
        how = TEXT_TRANSFORMS[i % len(TEXT_TRANSFORMS)]
        b.add(place(i)[0], f"t{i:03d}-near", "test", "text", transform_text(words, how, rng), o, how)
        if i % 4 == 0:
            b.add(place(i + 1)[0], f"t{i:03d}-exact", "test", "text", " ".join(words).upper() + ".", o,
                  "exact-normalised")
        if gen == "shapes":
            look = list(words)
            for k in rng.choice(len(look), size=2 * len(look) // 3, replace=False):
                look[k] = str(rng.choice(WORDS))
        else:
            look = held_text(rng)
        b.add(place(i + 1)[0], f"t{i:03d}-look", "test", "text", " ".join(look), f"{o}-look", "lookalike")
        if i % 8 == 0:          # a short text and a one-word edit of it: below 8 words, never near
            short = words[:5]
            b.add("alpha", f"t{i:03d}-short", "train", "text", " ".join(short), f"{o}-short", "short")
            b.add(place(i)[0], f"t{i:03d}-short2", "test", "text", " ".join(short[:4] + ["zebra"]),
                  f"{o}-short2", "short-edit")


def build_corpus(root, *, images: int = 32, audio: int = 12, texts: int = 40, seed: int = 0,
                 generator: str = "shapes") -> Corpus:
    """Write alpha/ and beta/ (canonical Parquet, two shards each) under ``root``; return the truth.

    ``generator``: ``shapes`` (the tuning corpus: drawn shapes, 4 espeak-ng voices, white noise;
    at most 128 images and 24 sentences) or ``objects`` (held out: textured objects of 10 kinds with
    look-alikes in another colour or texture at the same pose, 6 other voices and rates, pink/brown/
    hum/babble noise, template sentences; at most 40 sentences)."""
    from pathlib import Path

    if generator not in GENERATORS:
        raise ValueError(f"generator {generator!r}: one of {', '.join(GENERATORS)}")
    if generator == "shapes" and images > 128:
        raise ValueError("at most 128 images in the shapes corpus")
    rng = np.random.default_rng(seed)
    b = _Builder(Corpus(paths={d: str(Path(root) / d) for d in ("alpha", "beta")}), {"alpha": [], "beta": []})
    _images(b, generator, images, rng)
    _audio(b, generator, audio, rng)
    _texts(b, generator, texts, rng)
    for ds, rs in b.rows.items():
        Path(b.corpus.paths[ds]).mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rs, schema=with_metadata(CANONICAL, {"stage": "ingest", "kind": "manifest"}))
        half = table.num_rows // 2
        pq.write_table(table.slice(0, half), str(Path(b.corpus.paths[ds]) / "shard-00000.parquet"))
        pq.write_table(table.slice(half), str(Path(b.corpus.paths[ds]) / "shard-00001.parquet"))
    return b.corpus


def score(corpus: Corpus, groups: pa.Table) -> dict:
    """Recall per modality and kind, false pairs and the rows in them, and the leakage quarantine,
    from ``groups`` (groups.parquet): two rows are found as duplicates when they share a group, so
    a false link counts every pair of rows it joins."""
    from mmbatch.dedup.run import leaked_rows

    group_of = {(r["dataset"], r["sample_id"], r["modality"]): r["group"] for r in groups.to_pylist()}
    out = {"rows": corpus.rows, "modalities": {}}
    false_rows = set()
    for m in MODALITIES:
        truth = corpus.truth(m)
        members: dict = {}
        for (d, sid, mm), g in group_of.items():
            if mm == m:
                members.setdefault(g, []).append((d, sid))
        found = {frozenset(p) for rows in members.values() if len(rows) > 1 for p in combinations(sorted(rows), 2)}
        res = {}
        for kind in ("exact", "near"):
            want = [k for k, v in truth.items() if v == kind]
            res[f"{kind}_pairs"] = len(want)
            res[f"{kind}_recall"] = sum(k in found for k in want) / len(want) if want else 1.0
            res[f"{kind}_missed"] = sorted(sorted(map(list, k)) for k in want if k not in found)
        false = [k for k in found if k not in truth]
        res["false_pairs"] = len(false)
        res["false"] = sorted(sorted(map(list, k)) for k in false)
        false_rows.update(x for k in false for x in k)
        out["modalities"][m] = res
    out["rows_in_false_pairs"] = len(false_rows)
    out["false_row_fraction"] = len(false_rows) / max(1, corpus.rows)
    # leakage: the test rows that descend from a train row, against what quarantine would take
    train_origins = {(o, m) for (d, sid, m), o in corpus.origin.items() if split_of(corpus, d, sid) == "train"}
    planted = {(d, sid) for (d, sid, m), o in corpus.origin.items()
               if split_of(corpus, d, sid) == "test" and (o, m) in train_origins}
    taken = set(leaked_rows(groups))
    out["leakage"] = {"planted_test_rows": len(planted), "caught": len(planted & taken),
                      "caught_fraction": len(planted & taken) / max(1, len(planted)),
                      "other_rows_taken": len(taken - planted), "missed": sorted(map(list, planted - taken)),
                      "others": sorted(map(list, taken - planted))}
    return out


def split_of(corpus: Corpus, dataset: str, sample_id: str) -> str:
    return corpus.splits[(dataset, sample_id)]
