"""Per-modality signatures and verifiers: pure functions (bytes or text in, arrays out), no Ray.

Each modality has three parts, used in the order candidate -> verify:

* an **exact key**: a content hash of the media bytes (:func:`content_hash`, the
  canonical ``image_hash``/``audio_hash`` columns when ingest wrote them) or of
  the normalised text (:func:`text_key`);
* a **candidate embedding**: a short, L2-normalised float vector (images, audio)
  or a MinHash (text) that an index searches without comparing all pairs;
* a **verify payload** and a verifier that scores one candidate pair with a
  stronger check, so that look-alikes are not flagged.

Measured on the look-alike corpus of ``benchmarks/dedup_corpus.py``
(docs/duplicates.md has the figures): a perceptual hash or an embedding alone
puts different objects on the same background within the distance of
re-encoded copies; the block-wise verifiers separate them.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

from mmbatch.schema import HASH_NAME, content_hash  # noqa: F401 (the exact key of every modality)

# ---------------------------------------------------------------------------------------------
# exact
# ---------------------------------------------------------------------------------------------
# the exact key: the content hash ingest writes into every canonical row (mmbatch.schema)
_PUNCT = re.compile(r"[^\w\s]+", re.UNICODE)
_SPACE = re.compile(r"\s+", re.UNICODE)


def normalize_text(text: str | None) -> str:
    """Case, punctuation and whitespace folded: ``"Hello,  World!"`` -> ``"hello world"``."""
    if not text:
        return ""
    t = unicodedata.normalize("NFKC", str(text)).casefold()
    t = _PUNCT.sub(" ", t)
    return _SPACE.sub(" ", t).strip()


def text_key(text: str | None) -> str | None:
    """Exact key of a text: the hash of its normalised form (None when nothing is left)."""
    n = normalize_text(text)
    return content_hash(n.encode("utf-8")) if n else None


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
THUMB = 32           # grey thumbnail side (the verify payload, float16: 2 KB an image)
IMAGE_DCT = 5        # low-frequency DCT block -> 24-dim candidate embedding (DC dropped)
IMAGE_BLOCK = 4      # verify: local correlation in 4x4-pixel blocks of the thumbnail
IMAGE_WORST = 0.1    # ... averaged over the least-correlated blocks holding a tenth of the energy
CHROMA = 16          # colour payload: CIELAB a*, b* on a 16 x 16 grid (float16: 1 KB an image)
CHROMA_TOP = 0.05    # colour: the mean chroma difference of the 5 % of cells that differ most
CHROMA_SCALE = 100.0  # ... in CIELAB units / 100: colour = 1 - that
COLOUR_WEIGHT = 0.5  # score = structure - COLOUR_WEIGHT x (1 - colour)
IMAGE_THRESHOLD = 0.92     # tuned on the shapes corpus (benchmarks/duplicates.py --accuracy)


def decode_colour(data: bytes) -> np.ndarray:
    """Image bytes (JPEG, PNG, ...) -> uint8 BGR array; ValueError when undecodable."""
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ValueError("undecodable image")
    return arr


def decode_grey(data: bytes) -> np.ndarray:
    """Image bytes (JPEG, PNG, ...) -> float32 grey array; ValueError when undecodable."""
    import cv2

    return cv2.cvtColor(decode_colour(data), cv2.COLOR_BGR2GRAY).astype(np.float32)


def image_signature(data: bytes) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """(candidate embedding float32[24], verify payload (grey thumbnail float16[32, 32], chroma
    float16[16, 16, 2])) of one image.

    The embedding is pHash's first step (imagehash.phash: grey 32x32, 2-D DCT,
    the low frequencies; we keep 5x5 of them) without its last one (thresholding at the median into
    64 bits). We keep the real values because the candidate index is a
    nearest-neighbour search (faiss), which ranks a re-encoded copy above a
    look-alike more reliably than Hamming distance on the binarised bits. The
    thumbnail is z-normalised, so brightness and contrast shifts (affine in
    grey level) vanish before either step. The chroma grid is OpenCV's CIELAB
    a*, b* (lightness dropped, so a brightened copy keeps its colours).
    """
    import cv2

    bgr = decode_colour(data)
    g = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
    t = cv2.resize(g, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    t = (t - t.mean()) / (t.std() + 1e-6)
    d = cv2.dct(t)[:IMAGE_DCT, :IMAGE_DCT].ravel()[1:]
    small = cv2.resize(bgr.astype(np.float32) / 255.0, (CHROMA, CHROMA), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small, cv2.COLOR_BGR2Lab)[:, :, 1:]
    return _unit(d), (t.astype(np.float16), lab.astype(np.float16))


def image_similarity(a: np.ndarray, b: np.ndarray, block: int = IMAGE_BLOCK, worst: float = IMAGE_WORST) -> float:
    """Structure: the local (per block) correlations of two grey thumbnails, averaged with the
    blocks' energy as weights over the least-correlated blocks that hold ``worst`` of the energy
    (all blocks: ``worst=1``), in [-1, 1].

    A global correlation is dominated by a shared background: two different
    objects on the same background correlate as high as a brightened copy. Per
    block, the background blocks correlate in both cases, but a block where one
    image has the object (or its texture) and the other has not does not. Averaged
    over every block, a busy background still outweighs the few blocks of the
    object; the least-correlated tenth of the energy is where a look-alike
    differs, while a copy (re-encoded, resized, brightness/contrast shifted, even
    with clipping) keeps every block's structure. Blind to colour: :func:`image_colour`.
    """
    k = a.shape[0] // block

    def blocks(x):
        x = np.asarray(x, np.float32).reshape(k, block, k, block).transpose(0, 2, 1, 3).reshape(k * k, -1)
        return x - x.mean(axis=1, keepdims=True)

    A, B = blocks(a), blocks(b)
    e = np.sqrt((A * A).sum(1) * (B * B).sum(1))
    if e.sum() <= 0:
        return 1.0 if np.allclose(a, b) else 0.0
    c = (A * B).sum(1) / (e + 1e-9)
    order = np.argsort(c)
    mass = np.cumsum(e[order]) / e.sum()
    keep = order[: int(np.searchsorted(mass, worst)) + 1]
    return float((c[keep] * e[keep]).sum() / max(float(e[keep].sum()), 1e-9))


def image_colour(a: np.ndarray, b: np.ndarray) -> float:
    """Colour agreement of two chroma grids, in [0, 1]: 1 - (the mean CIELAB a*b* distance of the
    :data:`CHROMA_TOP` cells that differ most) / :data:`CHROMA_SCALE`.

    The cells that differ most are where an object of another colour stands, however small
    a part of the picture it is; re-encoding, resizing and level shifts move each cell's
    chroma little."""
    d = np.sqrt(((np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2).sum(-1)).ravel()
    k = max(1, int(round(CHROMA_TOP * d.size)))
    top = np.partition(d, d.size - k)[d.size - k:]
    return float(max(0.0, 1.0 - top.mean() / CHROMA_SCALE))


def image_signals(a, b) -> dict:
    """The signals of two image payloads and the score they make: ``structure``, ``colour``,
    ``score`` = structure - COLOUR_WEIGHT x (1 - colour)."""
    s = image_similarity(a[0], b[0])
    c = image_colour(a[1], b[1])
    return {"structure": s, "colour": c, "score": s - COLOUR_WEIGHT * (1.0 - c)}


# ---------------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------------
AUDIO_SR = 8000           # speech content below 4 kHz; any input rate is resampled here
AUDIO_NFFT = 256
AUDIO_HOP = 80            # 10 ms frames
AUDIO_MELS = 40
AUDIO_FLOOR_DB = 35.0     # log-mel floored at max - 35 dB: noise at >= 25 dB SNR stays mostly under it
AUDIO_TRIM_DB = 30.0      # leading/trailing frames quieter than peak - 30 dB are silence
AUDIO_EMB = (8, 6)         # candidate embedding: the log-mel pooled to 8 time x 6 band cells
AUDIO_MAX_LAG = 8         # verify: frames of misalignment tried either way (trim jitter)
AUDIO_THRESHOLD = 0.98     # tuned likewise
AUDIO_MAX_SECONDS = 60.0  # longer clips: the first minute is fingerprinted
_MEL = None


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Audio bytes (FLAC, WAV, OGG, MP3, SPHERE... whatever libsndfile reads) -> mono float32, rate.

    Only the first :data:`AUDIO_MAX_SECONDS` (plus a margin) are decoded: what :func:`audio_logmel`
    uses (a 30-minute 8-channel file costs one minute of samples)."""
    from mmbatch.media import read_audio

    x, sr, _ = read_audio(data, AUDIO_MAX_SECONDS)
    return (x.mean(axis=1) if x.ndim > 1 else x), sr


def _mel() -> np.ndarray:
    global _MEL
    if _MEL is None:
        import librosa

        _MEL = librosa.filters.mel(sr=AUDIO_SR, n_fft=AUDIO_NFFT, n_mels=AUDIO_MELS, fmin=60, fmax=3800)
    return _MEL


def audio_logmel(x: np.ndarray, sr: int) -> np.ndarray:
    """Trimmed, level-independent log-mel (40 x frames, float32) of mono samples.

    Our own fingerprint rather than Chromaprint: Chromaprint's fingerprints are
    built for music (chroma, 12 pitch classes) and need the Debian
    libchromaprint-tools binary on every worker; a log-mel keeps the formant and
    harmonic detail that tells two speakers of the same sentence apart, and the
    verifier below aligns and correlates it. Gain drops out (the floor is
    relative to the clip's maximum), resampling and codecs change little below
    4 kHz, leading/trailing silence is trimmed, and the floor hides noise
    at >= 25 dB SNR (white, pink, brown, hum or babble) in most cells.
    """
    import librosa
    import soxr

    x = np.asarray(x, np.float32)[: int(AUDIO_MAX_SECONDS * sr)]
    if sr != AUDIO_SR:
        x = soxr.resample(x, sr, AUDIO_SR)
    if x.size < AUDIO_NFFT:
        raise ValueError("audio shorter than one analysis frame")
    if float(np.max(np.abs(x))) < 1e-4:
        raise ValueError("audio is silent")
    x, _ = librosa.effects.trim(x, top_db=AUDIO_TRIM_DB, frame_length=AUDIO_NFFT, hop_length=AUDIO_HOP)
    if x.size < AUDIO_NFFT:
        raise ValueError("audio is silent")
    spec = np.abs(librosa.stft(x, n_fft=AUDIO_NFFT, hop_length=AUDIO_HOP, center=False)) ** 2
    m = 10.0 * np.log10(_mel() @ spec + 1e-10)
    return np.maximum(m, m.max() - AUDIO_FLOOR_DB).astype(np.float32)


def audio_signature(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(candidate embedding float32[48], verify log-mel float16[40, frames]) of one clip."""
    import cv2

    m = audio_logmel(*decode_audio(data))
    pooled = cv2.resize(m, AUDIO_EMB, interpolation=cv2.INTER_AREA).ravel()
    return _unit(pooled - pooled.mean()), m.astype(np.float16)


def audio_signals(a: np.ndarray, b: np.ndarray, max_lag: int = AUDIO_MAX_LAG) -> dict:
    """``corr``: the best Pearson correlation of two log-mels over lags of +-``max_lag`` frames,
    ``lag_ms``: that lag, ``score``: corr times the ratio of their lengths (no penalty within
    10 %: trim jitter; a clip is not a copy of one twice its length)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    best, best_lag = -1.0, 0
    for lag in range(-max_lag, max_lag + 1):
        x, y = a[:, max(0, lag):], b[:, max(0, -lag):]
        n = min(x.shape[1], y.shape[1])
        if n < 2:
            continue
        x, y = x[:, :n].ravel(), y[:, :n].ravel()
        x, y = x - x.mean(), y - y.mean()
        den = np.sqrt((x @ x) * (y @ y))
        if den > 0 and x @ y / den > best:
            best, best_lag = float(x @ y / den), lag
    ratio = min(a.shape[1], b.shape[1]) / max(a.shape[1], b.shape[1], 1)
    return {"corr": best, "lag_ms": best_lag * 1000.0 * AUDIO_HOP / AUDIO_SR,
            "score": best * min(1.0, ratio / 0.9)}


def audio_similarity(a: np.ndarray, b: np.ndarray, max_lag: int = AUDIO_MAX_LAG) -> float:
    """The ``score`` of :func:`audio_signals`."""
    return audio_signals(a, b, max_lag)["score"]


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
TEXT_MIN_WORDS = 8
SHINGLE = 2               # word bigrams: one edited word in a 12-word text keeps Jaccard ~0.7
NUM_PERM = 128
TEXT_THRESHOLD = 0.692    # Jaccard of the shingle sets, tuned likewise
THRESHOLDS = {"image": IMAGE_THRESHOLD, "audio": AUDIO_THRESHOLD, "text": TEXT_THRESHOLD}   # the defaults
MINHASH_SCHEME = "affine32"   # datasketch 2's default; stated because rebuilding a MinHash needs it
_PERMS = None


def shingles(text: str | None, k: int = SHINGLE) -> set[str]:
    words = normalize_text(text).split()
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def shingle_hashes(text: str | None) -> np.ndarray | None:
    """Sorted uint32 hashes of the word shingles of a text of >= 8 words (None for shorter)."""
    if len(normalize_text(text).split()) < TEXT_MIN_WORDS:
        return None
    hs = {int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") for s in shingles(text)}
    return np.array(sorted(hs), np.uint32)


def text_minhash(hashes: np.ndarray):
    """datasketch LeanMinHash of shingle hashes (its permutations are fixed by the seed)."""
    from datasketch import LeanMinHash, MinHash

    global _PERMS
    if _PERMS is None:
        _PERMS = MinHash(num_perm=NUM_PERM, seed=1).permutations
    mh = MinHash(num_perm=NUM_PERM, seed=1, permutations=_PERMS, scheme=MINHASH_SCHEME)
    mh.update_batch([int(h).to_bytes(4, "little") for h in hashes])
    return LeanMinHash(mh)


def text_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle-hash arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return inter / union if union else 0.0


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v
