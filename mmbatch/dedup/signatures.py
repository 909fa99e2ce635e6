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
IMAGE_THRESHOLD = 0.955


def decode_grey(data: bytes) -> np.ndarray:
    """Image bytes (JPEG, PNG, ...) -> float32 grey array; ValueError when undecodable."""
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise ValueError("undecodable image")
    return arr.astype(np.float32)


def image_signature(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(candidate embedding float32[24], verify thumbnail float16[32, 32]) of one image.

    The embedding is pHash's first step (imagehash.phash: grey 32x32, 2-D DCT,
    the low frequencies; we keep 5x5 of them) without its last one (thresholding at the median into
    64 bits). We keep the real values because the candidate index is a
    nearest-neighbour search (faiss), which ranks a re-encoded copy above a
    look-alike more reliably than Hamming distance on the binarised bits:
    brightening a copy moved up to 10 of pHash's 64 bits on our corpus, as many as
    separate two look-alikes. The thumbnail is z-normalised, so brightness and
    contrast shifts (affine in grey level) vanish before either step.
    """
    import cv2

    g = decode_grey(data)
    t = cv2.resize(g, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    t = (t - t.mean()) / (t.std() + 1e-6)
    d = cv2.dct(t)[:IMAGE_DCT, :IMAGE_DCT].ravel()[1:]
    return _unit(d), t.astype(np.float16)


def image_similarity(a: np.ndarray, b: np.ndarray, block: int = IMAGE_BLOCK) -> float:
    """Energy-weighted mean of the local (per block) correlations of two thumbnails, in [-1, 1].

    A global correlation is dominated by a shared background: two different
    objects on the same background correlate up to 0.995 on our corpus, as
    high as a brightened copy. Per block, the background blocks correlate in
    both cases, but a block where one image has the object and the other has
    not does not, and it carries much of the energy. Re-encoding, resizing and
    brightness/contrast (even with clipping) keep every block's structure.
    Measured: copies >= 0.963, look-alikes <= 0.952 (100 px drawn objects).
    """
    k = a.shape[0] // block

    def blocks(x):
        x = np.asarray(x, np.float32).reshape(k, block, k, block).transpose(0, 2, 1, 3).reshape(k * k, -1)
        return x - x.mean(axis=1, keepdims=True)

    A, B = blocks(a), blocks(b)
    va, vb = (A * A).sum(1), (B * B).sum(1)
    e = np.sqrt(va * vb)
    if e.sum() <= 0:
        return 1.0 if np.allclose(a, b) else 0.0
    c = (A * B).sum(1) / (e + 1e-9)
    return float((c * e).sum() / e.sum())


# ---------------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------------
AUDIO_SR = 8000           # speech content below 4 kHz; any input rate is resampled here
AUDIO_NFFT = 256
AUDIO_HOP = 80            # 10 ms frames
AUDIO_MELS = 40
AUDIO_FLOOR_DB = 50.0     # log-mel floored at max - 50 dB: noise at >= 25 dB SNR only lifts the floor
AUDIO_TRIM_DB = 30.0      # leading/trailing frames quieter than peak - 30 dB are silence
AUDIO_EMB = (8, 6)         # candidate embedding: the log-mel pooled to 8 time x 6 band cells
AUDIO_MAX_LAG = 8         # verify: frames of misalignment tried either way (trim jitter)
AUDIO_THRESHOLD = 0.95
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
    at >= 25 dB SNR.
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


def audio_similarity(a: np.ndarray, b: np.ndarray, max_lag: int = AUDIO_MAX_LAG) -> float:
    """Best Pearson correlation of two log-mels over lags of +-``max_lag`` frames, times the
    ratio of their lengths (a clip is not a copy of one twice its length).

    Measured on espeak-ng sentences: copies (gain, resampling, OGG/MP3, silence,
    25 dB noise) >= 0.98; the same sentence by another voice <= 0.92.
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        x, y = a[:, max(0, lag):], b[:, max(0, -lag):]
        n = min(x.shape[1], y.shape[1])
        if n < 2:
            continue
        x, y = x[:, :n].ravel(), y[:, :n].ravel()
        x, y = x - x.mean(), y - y.mean()
        den = np.sqrt((x @ x) * (y @ y))
        if den > 0:
            best = max(best, float(x @ y / den))
    ratio = min(a.shape[1], b.shape[1]) / max(a.shape[1], b.shape[1], 1)
    return best * min(1.0, ratio / 0.9)       # lengths within 10 %: no penalty (trim jitter)


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
TEXT_MIN_WORDS = 8
SHINGLE = 2               # word bigrams: one edited word in a 12-word text keeps Jaccard ~0.7
NUM_PERM = 128
TEXT_THRESHOLD = 0.5      # Jaccard of the shingle sets
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
