"""Generated multimodal classification tasks for the fusion-quality benchmark.

Every task writes real media bytes (JPEG images, FLAC audio, text) that mmbatch's
default extractors (HOG+colour, log-mel statistics, hashing) turn into the same
embeddings `mmbatch preprocess` would. Each task fixes how informative each
modality is, so fusion can be judged against the best single modality:

- ``strong_audio``  (AV-MNIST-shaped, 10 classes): a spoken-digit-like tone code
  in heavy noise (~90-95 % alone), a half-occluded digit image (~75-85 %), a
  weakly informative sentence (~35-45 %).
- ``useless_text``  (10 classes): a clean-ish digit image (~85-95 %), a noisy tone
  code (~75-85 %), and a sentence with no information about the class (chance).
- ``xor``           (4 classes, the demo corpus): image shows bit a, audio bit b,
  text a xor b; every modality alone is at ~50 %, any two together decide.

Labels are balanced; the split is fixed by position (train / validation / test).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mmbatch.demo import corpus as demo

SR = 16000
DIGIT_WORDS = ["ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE"]
FILLER = demo.FILLER + ["MAYBE", "SOMETHING", "HERE", "THERE", "NUMBER", "SAID", "HEARD", "SAW"]
# telephone keypad tones (DTMF): digit -> (low Hz, high Hz)
DTMF = {1: (697, 1209), 2: (697, 1336), 3: (697, 1477), 4: (770, 1209), 5: (770, 1336), 6: (770, 1477),
        7: (852, 1209), 8: (852, 1336), 9: (852, 1477), 0: (941, 1336)}
FONTS = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
         cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_PLAIN]


@dataclass
class TaskData:
    name: str
    class_names: list[str]
    labels: np.ndarray                       # int64 [n]
    splits: np.ndarray                       # object [n]: train / validation / test
    items: dict[str, list]                   # modality -> raw items (JPEG bytes, FLAC bytes, str)


# --- media ------------------------------------------------------------------------------------
def digit_image(c: int, rng: np.random.Generator, occlude: float, noise: float, size: int = 64) -> bytes:
    """A handwritten-looking digit (random font, scale, slant, position) on a noisy background;
    ``occlude``: share of the glyph's box covered by a random noise patch."""
    img = np.zeros((size, size), np.uint8)
    font = FONTS[int(rng.integers(len(FONTS)))]
    scale = float(rng.uniform(1.4, 2.0)) * (1.6 if font == cv2.FONT_HERSHEY_PLAIN else 1.0)
    thick = int(rng.integers(2, 5))
    (w, h), _ = cv2.getTextSize(str(c), font, scale, thick)
    org = (int((size - w) / 2 + rng.integers(-6, 7)), int((size + h) / 2 + rng.integers(-6, 7)))
    cv2.putText(img, str(c), org, font, scale, 255, thick, cv2.LINE_AA)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), float(rng.uniform(-25, 25)), float(rng.uniform(0.85, 1.15)))
    m[0, 1] += float(rng.uniform(-0.3, 0.3))                                  # shear
    img = cv2.warpAffine(img, m, (size, size)).astype(np.float32) / 255.0
    if occlude > 0:
        side = int(rng.integers(4))
        k = int(round(size * occlude))
        patch = rng.uniform(0, 1, (size, size)).astype(np.float32)
        sl = [(slice(None), slice(0, k)), (slice(None), slice(size - k, size)),
              (slice(0, k), slice(None)), (slice(size - k, size), slice(None))][side]
        img[sl] = patch[sl] * 0.8
    img = np.clip(img + rng.normal(0, noise, img.shape), 0, 1)
    return demo.encode_jpeg(cv2.cvtColor((img * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR), quality=85)


def tone_code(c: int, rng: np.random.Generator, snr_db: tuple[float, float], seconds: float = 0.5) -> bytes:
    """The class's two keypad tones (with a little pitch jitter) in white noise at a random SNR."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    lo, hi = DTMF[c % 10]
    jitter = rng.uniform(0.97, 1.03)
    wave = np.sin(2 * np.pi * lo * jitter * t + rng.uniform(0, 6.3)) + np.sin(2 * np.pi * hi * jitter * t + rng.uniform(0, 6.3))
    on = int(rng.integers(0, n // 4))
    env = np.zeros(n)
    env[on:on + n // 2] = 1.0
    wave = wave * env
    snr = rng.uniform(*snr_db)
    p_signal = np.mean(wave ** 2) + 1e-12
    noise = rng.normal(0, np.sqrt(p_signal / 10 ** (snr / 10)), n)
    x = wave + noise
    x = 0.5 * x / (np.abs(x).max() + 1e-9)
    return demo.encode_flac(x.astype(np.float32))


def sentence(c: int, rng: np.random.Generator, informative: float, n_classes: int = 10) -> str:
    """Filler words plus one digit word: the class's word with probability ``informative``,
    else a random class's word."""
    words = [str(w) for w in rng.choice(FILLER, int(rng.integers(4, 8)))]
    k = c if rng.random() < informative else int(rng.integers(n_classes))
    words.insert(int(rng.integers(len(words) + 1)), DIGIT_WORDS[k])
    return " ".join(words)


# --- tasks --------------------------------------------------------------------------------------
def _splits(n_train: int, n_val: int, n_test: int) -> np.ndarray:
    return np.array(["train"] * n_train + ["validation"] * n_val + ["test"] * n_test, dtype=object)


def _labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def digits_task(name: str, sizes: tuple[int, int, int], seed: int, occlude: float, image_noise: float,
                snr_db: tuple[float, float], text_informative: float) -> TaskData:
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    y = _labels(n, 10, rng)
    items = {"image": [digit_image(int(c), rng, occlude, image_noise) for c in y],
             "audio": [tone_code(int(c), rng, snr_db) for c in y],
             "text": [sentence(int(c), rng, text_informative) for c in y]}
    return TaskData(name, [w.lower() for w in DIGIT_WORDS], y, _splits(*sizes), items)


def xor_task(sizes: tuple[int, int, int], seed: int) -> TaskData:
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    y = _labels(n, demo.NUM_CLASSES, rng)
    items = {"image": [], "audio": [], "text": []}
    for c in y:
        a, b, t = demo.bits(int(c))
        items["image"].append(demo.encode_jpeg(demo.make_image(int(c), rng, width=64, height=64)))
        items["audio"].append(demo.encode_flac(demo.make_audio(b, rng, seconds=0.5)))
        items["text"].append(" ".join(demo.make_sentence(t, rng)))
    return TaskData("xor", list(demo.CLASS_NAMES), y, _splits(*sizes), items)


TASKS = {
    "strong_audio": lambda sizes, seed: digits_task("strong_audio", sizes, seed, occlude=0.3, image_noise=0.1,
                                                    snr_db=(-20, -10), text_informative=0.4),
    "useless_text": lambda sizes, seed: digits_task("useless_text", sizes, seed, occlude=0.0, image_noise=0.05,
                                                    snr_db=(-22, -12), text_informative=0.0),
    "xor": lambda sizes, seed: xor_task(sizes, seed),
}
