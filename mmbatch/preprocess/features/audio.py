"""Audio features: decode (bytes -> mono float32 at one rate) and two extractors.

Decode (CPU, :func:`decode_clip`): :func:`mmbatch.media.decode_audio` (FLAC,
WAV, SPHERE, ... -> float32 mono), resampling with soxr (``HQ``) to
``sample_rate`` when the file's rate differs, clipping to ``max_seconds``, and
zero-padding audio shorter than one analysis window to one window (such a clip
is not an error). All-zero audio gives finite features (``log(max(mel, amin))``).

Frame features (:class:`FrameParams`; the choices stated here are recorded in
``params()``):

- window ``win_ms`` (25 ms = 400 samples at 16 kHz), hop ``hop_ms`` (10 ms = 160),
  ``n_fft = window length`` (no zero-padding to a power of two; 201 bins at 16 kHz),
  periodic Hann window, ``center=True`` with zero (``constant``) padding, so a
  clip of N samples has ``1 + N // hop`` frames (librosa's defaults);
- power spectrum -> ``n_mels`` Slaney-normalised mel filters (``librosa.filters.mel``'s
  formulas, ``htk=False``, ``fmin``..``fmax``, fmax None = Nyquist; built in numpy,
  equal to librosa's matrix -- tested -- without importing librosa/scipy in the workers);
- log-mel = ``10 * log10(max(mel, 1e-10))`` (= ``librosa.power_to_db(S, ref=1.0,
  amin=1e-10, top_db=None)``, no per-clip top_db clipping);
- MFCC = first ``n_mfcc`` coefficients of the orthonormal DCT-II of the log-mel
  over the mel axis, no lifter (= ``librosa.feature.mfcc(S=logmel, n_mfcc, dct_type=2,
  norm="ortho")``).

Extractors:

- ``logmel_stats`` (no model): [mean, std over time of log-mel, mean, std of MFCC]
  -> ``2 * n_mels + 2 * n_mfcc`` (186 by default). Backend ``numpy`` (called
  ``librosa`` before; outputs still record that name, see :data:`RECORDED_BACKEND`):
  librosa's computation (``librosa.stft`` and ``librosa.feature.melspectrogram``'s mel
  matmul, same float64 FFT and float32 rounding) done one clip at a time in numpy
  by :class:`NumpyFrontend`, with window, filterbank and DCT built once, without
  librosa's per-call set-up; tests hold it equal to the librosa calls to 1e-5. Or
  ``torch`` (``torch.stft`` over a zero-padded batch of clips grouped by length,
  per-clip frame masks for the statistics; runs on GPU after ``to("cuda")``). The
  two agree to :data:`BACKEND_RTOL` (tested). numpy runs on CPU only; torch is for GPUs
  (docs/performance.md compares them).
- ``cnn``: a small 2-D conv encoder over the log-mel (:class:`AudioCNN`) with
  masked global pooling over time -> ``embedding_dim``.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

from mmbatch import media
from mmbatch.engine import storage
from mmbatch.preprocess.features.base import Decoded, Error, Extractor
from mmbatch.engine.runtime import pin_threads

log = logging.getLogger("mmbatch.preprocess.features.audio")

# The torch and numpy backends of logmel_stats agree to within this, as
# max |torch - numpy| / max(1, max |numpy|) over a batch of embeddings.
BACKEND_RTOL = 1e-4
# The backend name each logmel_stats output records in its params. The numpy backend was
# named "librosa" (after the computation it reproduces) and records that name still, so its
# files (rows and metadata) are the bytes they were before the rename.
RECORDED_BACKEND = {"numpy": "librosa", "torch": "torch"}

RESAMPLER = "soxr HQ"


@dataclass(frozen=True)
class FrameParams:
    """Frame-level feature settings (samples, not ms). Build with :meth:`from_ms`."""
    sample_rate: int = 16000
    win_length: int = 400
    hop_length: int = 160
    n_fft: int = 400
    n_mels: int = 80
    n_mfcc: int = 13
    fmin: float = 0.0
    fmax: Optional[float] = None
    window: str = "hann_periodic"
    center: bool = True
    pad_mode: str = "constant"
    amin: float = 1e-10
    mel_norm: str = "slaney"
    mel_htk: bool = False

    @classmethod
    def from_ms(cls, sample_rate: int = 16000, win_ms: float = 25.0, hop_ms: float = 10.0,
                n_mels: int = 80, n_mfcc: int = 13, fmin: float = 0.0,
                fmax: Optional[float] = None) -> "FrameParams":
        win = int(round(sample_rate * win_ms / 1000.0))
        hop = int(round(sample_rate * hop_ms / 1000.0))
        if win < 2 or hop < 1:
            raise ValueError(f"window {win_ms} ms / hop {hop_ms} ms at {sample_rate} Hz is too short")
        if n_mfcc > n_mels:
            raise ValueError(f"n_mfcc ({n_mfcc}) cannot exceed n_mels ({n_mels})")
        if fmax is not None and fmax > sample_rate / 2:
            raise ValueError(f"fmax {fmax} is above Nyquist ({sample_rate / 2})")
        return cls(sample_rate=int(sample_rate), win_length=win, hop_length=hop, n_fft=win,
                   n_mels=int(n_mels), n_mfcc=int(n_mfcc), fmin=float(fmin),
                   fmax=None if fmax is None else float(fmax))

    @classmethod
    def from_config(cls, cfg) -> "FrameParams":
        return cls.from_ms(cfg.sample_rate, cfg.win_ms, cfg.hop_ms, cfg.n_mels, cfg.n_mfcc, cfg.fmin, cfg.fmax)

    def as_dict(self) -> dict:
        return asdict(self)

    def num_frames(self, num_samples: int) -> int:
        if self.center:
            return 1 + num_samples // self.hop_length
        return 1 + max(0, num_samples - self.n_fft) // self.hop_length


DEFAULT_FRAMES = FrameParams()


# --- filterbank, window, DCT (numpy only: no librosa/scipy import in the workers) ------
# librosa.filters pulls in scipy.signal and scipy.stats, a CPU cost per fresh worker process
# (docs/performance.md), for a matrix computed once. These are librosa's formulas (0.11), written out
# in numpy; tests/test_features_audio.py checks them against librosa and scipy.
def _hz_to_mel(hz: np.ndarray, htk: bool) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0     # Slaney's Auditory Toolbox
    mel = hz / f_sp
    log_part = hz >= min_log_hz
    mel[log_part] = min_log_hz / f_sp + np.log(hz[log_part] / min_log_hz) / logstep
    return mel


def _mel_to_hz(mel: np.ndarray, htk: bool) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    hz = f_sp * mel
    log_part = mel >= min_log_hz / f_sp
    hz[log_part] = min_log_hz * np.exp(logstep * (mel[log_part] - min_log_hz / f_sp))
    return hz


@functools.lru_cache(maxsize=16)
def mel_basis(p: FrameParams) -> np.ndarray:
    """float32 [n_mels, n_fft // 2 + 1] triangular mel filters, = ``librosa.filters.mel(..., dtype=float32)``."""
    if p.mel_norm not in ("slaney", None):
        raise ValueError(f"mel_norm must be 'slaney' or None, got {p.mel_norm!r}")
    fmax = p.sample_rate / 2.0 if p.fmax is None else p.fmax
    fft_hz = np.fft.rfftfreq(p.n_fft, d=1.0 / p.sample_rate)
    mel_edges = np.array([p.fmin, fmax], dtype=np.float64)
    band_hz = _mel_to_hz(np.linspace(*_hz_to_mel(mel_edges, p.mel_htk), p.n_mels + 2), p.mel_htk)
    width = np.diff(band_hz)
    ramps = band_hz[:, None] - fft_hz[None, :]
    weights = np.zeros((p.n_mels, len(fft_hz)), dtype=np.float32)
    for i in range(p.n_mels):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / width[i], ramps[i + 2] / width[i + 1]))
    if p.mel_norm == "slaney":       # constant energy per band
        weights *= (2.0 / (band_hz[2:] - band_hz[:-2]))[:, None]
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=16)
def dct_matrix(n_mfcc: int, n_mels: int) -> np.ndarray:
    """float32 [n_mfcc, n_mels] orthonormal DCT-II: ``D @ x == scipy.fft.dct(x, 2, norm='ortho')[:n_mfcc]``."""
    k = np.arange(n_mfcc, dtype=np.float64)[:, None]
    n = np.arange(n_mels, dtype=np.float64)[None, :]
    D = np.cos(np.pi * k * (2.0 * n + 1.0) / (2.0 * n_mels)) * np.sqrt(2.0 / n_mels)
    D[0] /= np.sqrt(2.0)
    D = D.astype(np.float32)
    D.setflags(write=False)
    return D


@functools.lru_cache(maxsize=16)
def analysis_window(p: FrameParams) -> np.ndarray:
    """float64 [n_fft] periodic Hann of ``win_length``, zero-padded to ``n_fft`` at both ends (centred)."""
    if p.window != "hann_periodic":
        raise ValueError(f"window must be 'hann_periodic', got {p.window!r}")
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(p.win_length) / p.win_length)
    left = (p.n_fft - p.win_length) // 2
    w = np.pad(w, (left, p.n_fft - p.win_length - left))
    w.setflags(write=False)
    return w


class NumpyFrontend:
    """Per-clip log-mel / MFCC statistics in numpy: librosa's computation without its per-call set-up.

    ``librosa.stft`` + the mel matrix, step by step: frames of the (``center``:
    zero-padded) signal, times the float64 window, float64 ``numpy.fft.rfft``
    rounded to complex64, power in float32, float32 mel matmul with the same
    memory layout -- so the result equals today's librosa path to float32
    rounding (tested). Window, filterbank and DCT are built once per frontend.
    The FFT runs over 64 frames at a time, so the float64 frames and spectra
    stay in the CPU cache; clips are not batched (docs/performance.md).
    """

    FRAMES_PER_FFT = 64

    def __init__(self, p: FrameParams = DEFAULT_FRAMES):
        self.p = p
        self.window = analysis_window(p)
        self.fb = mel_basis(p)
        self.dct = dct_matrix(p.n_mfcc, p.n_mels) if p.n_mfcc else None

    def power(self, x: np.ndarray) -> np.ndarray:
        """float32 [frames, n_fft // 2 + 1] power spectrum (time-major)."""
        p = self.p
        x = np.asarray(x, dtype=np.float32)
        if p.center:
            x = np.pad(x, p.n_fft // 2, mode=p.pad_mode)
        elif len(x) < p.n_fft:
            raise ValueError(f"uncentred analysis needs >= n_fft ({p.n_fft}) samples, got {len(x)}")
        n_frames = 1 + (len(x) - p.n_fft) // p.hop_length
        step = x.strides[0]
        frames = np.lib.stride_tricks.as_strided(x, (n_frames, p.n_fft), (step * p.hop_length, step),
                                                 writeable=False)
        P = np.empty((n_frames, p.n_fft // 2 + 1), dtype=np.float32)
        for a in range(0, n_frames, self.FRAMES_PER_FFT):
            S = np.fft.rfft(frames[a:a + self.FRAMES_PER_FFT] * self.window, axis=1).astype(np.complex64)
            out = P[a:a + self.FRAMES_PER_FFT]
            np.multiply(S.real, S.real, out=out)
            out += S.imag * S.imag
        return P

    def logmel(self, x: np.ndarray) -> np.ndarray:
        """float32 [n_mels, frames] log-mel (dB)."""
        mel = self.fb @ self.power(x).T
        return 10.0 * np.log10(np.maximum(mel, self.p.amin))

    def stats(self, x: np.ndarray) -> np.ndarray:
        """float32 [2*n_mels + 2*n_mfcc]: mean, std (ddof 0) over time of log-mel, then of MFCC."""
        L = self.logmel(x)
        parts = [L.mean(axis=1), L.std(axis=1)]
        if self.dct is not None:
            M = self.dct @ L
            parts += [M.mean(axis=1), M.std(axis=1)]
        return np.concatenate(parts).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=16)
def numpy_frontend(p: FrameParams) -> NumpyFrontend:
    return NumpyFrontend(p)


def power_spectrogram(x: np.ndarray, p: FrameParams = DEFAULT_FRAMES) -> np.ndarray:
    """float32 [n_fft // 2 + 1, frames] power spectrum (= ``|librosa.stft(x, ...)|**2``)."""
    return numpy_frontend(p).power(x).T


def logmel(x: np.ndarray, p: FrameParams = DEFAULT_FRAMES) -> np.ndarray:
    """float32 [n_mels, frames] log-mel (dB) of mono samples ``x`` at ``p.sample_rate``."""
    return numpy_frontend(p).logmel(x)


def mfcc_from_logmel(L: np.ndarray, n_mfcc: int) -> np.ndarray:
    """[n_mfcc, frames] MFCC from a [n_mels, frames] log-mel (DCT-II ortho, no lifter)."""
    return dct_matrix(n_mfcc, L.shape[0]) @ L


def mfcc(x: np.ndarray, p: FrameParams = DEFAULT_FRAMES) -> np.ndarray:
    """float32 [n_mfcc, frames] MFCC of mono samples ``x``."""
    return mfcc_from_logmel(logmel(x, p), p.n_mfcc)


def stats_dim(p: FrameParams) -> int:
    return 2 * p.n_mels + 2 * p.n_mfcc


def logmel_stats(x: np.ndarray, p: FrameParams = DEFAULT_FRAMES) -> np.ndarray:
    """float32 [2*n_mels + 2*n_mfcc]: mean, std (ddof 0) over time of log-mel, then of MFCC."""
    return numpy_frontend(p).stats(x)


# --- torch front end -----------------------------------------------------------------
class TorchFrontend:
    """Batched log-mel / MFCC with ``torch.stft`` (CPU or GPU); same conventions as :func:`logmel`."""

    def __init__(self, p: FrameParams = DEFAULT_FRAMES, device: str = "cpu"):
        self.p = p
        self.to(device)

    def to(self, device: str) -> "TorchFrontend":
        import torch

        pin_threads()
        self.device = torch.device(device)
        self.window = torch.hann_window(self.p.win_length, periodic=True, dtype=torch.float32,
                                        device=self.device)
        fb = torch.tensor(mel_basis(self.p))                            # [n_mels, F] (a copy)
        # [2F, n_mels]: each row twice, to apply to interleaved (re, im)^2 -- the sum
        # re^2 + im^2 then happens inside the matmul, on contiguous memory
        self.fb2 = fb.T.repeat_interleave(2, dim=0).contiguous().to(self.device)
        self.dct_t = torch.tensor(dct_matrix(self.p.n_mfcc, self.p.n_mels)).T.contiguous() \
            .to(self.device) if self.p.n_mfcc else None                 # [n_mels, n_mfcc]
        return self

    def pad_batch(self, clips: Sequence[np.ndarray]):
        """(float32 [B, max_len] zero-padded tensor on device, frames per clip as int64 [B])."""
        import torch

        lengths = [len(c) for c in clips]
        X = np.zeros((len(clips), max(lengths)), dtype=np.float32)
        for i, c in enumerate(clips):
            X[i, :len(c)] = c
        frames = torch.tensor([self.p.num_frames(n) for n in lengths], dtype=torch.int64, device=self.device)
        return torch.from_numpy(X).to(self.device, non_blocking=True), frames

    def logmel_tm(self, X):
        """float32 [B, samples] -> [B, frames, n_mels] log-mel (dB), time-major."""
        import torch

        p = self.p
        S = torch.stft(X, n_fft=p.n_fft, hop_length=p.hop_length, win_length=p.win_length,
                       window=self.window, center=p.center, pad_mode=p.pad_mode, return_complex=True)
        # S is [B, F, T] laid out frequency-fastest: its transpose is contiguous
        V = torch.view_as_real(S.transpose(1, 2))                      # [B, T, F, 2]
        V = V.reshape(V.shape[0], V.shape[1], -1)                      # [B, T, 2F] (re, im, re, im, ...)
        mel = torch.matmul(V.square(), self.fb2)                       # [B, T, n_mels] power mel
        return 10.0 * torch.log10(torch.clamp(mel, min=p.amin))

    def logmel(self, X):
        """float32 [B, samples] -> [B, n_mels, frames] log-mel (dB), as :func:`logmel` per clip."""
        return self.logmel_tm(X).transpose(1, 2)

    def mfcc_tm(self, L_tm):
        """[B, T, n_mels] log-mel -> [B, T, n_mfcc]."""
        import torch

        return torch.matmul(L_tm, self.dct_t)

    @staticmethod
    def frame_mask(frames, T: int):
        import torch

        return (torch.arange(T, device=frames.device)[None, :] < frames[:, None]).to(torch.float32)

    @staticmethod
    def masked_mean_std(F, mask):
        """F [B, T, C], mask [B, T] -> (mean, std) [B, C], population std over the masked frames."""
        m = mask[:, :, None]
        n = mask.sum(dim=1)[:, None]
        mean = (F * m).sum(dim=1) / n
        var = ((F - mean[:, None, :]).square() * m).sum(dim=1) / n
        return mean, var.sqrt()

    def stats(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            X, frames = self.pad_batch(clips)
            L = self.logmel_tm(X)
            mask = self.frame_mask(frames, L.shape[1])
            parts = list(self.masked_mean_std(L, mask))
            if self.dct_t is not None:
                parts += list(self.masked_mean_std(self.mfcc_tm(L), mask))
            return torch.cat(parts, dim=1).float().cpu().numpy()


# --- decode -----------------------------------------------------------------------------
def _audio_bytes(item: Any) -> Optional[bytes | memoryview]:
    if item is None:
        return None
    if isinstance(item, dict):
        item = item.get("bytes")
        if item is None:
            return None
    if isinstance(item, (bytes, memoryview)):
        return item               # a memoryview is decoded in place (media.decode_audio)
    if isinstance(item, bytearray):
        return bytes(item)
    raise media.MediaError("not_audio", f"expected audio bytes, got {type(item).__name__}")


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return x
    import soxr

    return np.ascontiguousarray(soxr.resample(x, sr_in, sr_out, quality="HQ"), dtype=np.float32)


def decode_clip(item: Any, sample_rate: int = 16000, max_seconds: Optional[float] = None,
                min_samples: int = 400) -> np.ndarray:
    """Bytes -> float32 mono at ``sample_rate``, clipped to ``max_seconds``, >= ``min_samples``.

    Raises :class:`mmbatch.media.MediaError` (``empty_file``, ``corrupt_audio``, ``too_long`` when
    ``max_seconds`` is None and the file is over :data:`mmbatch.media.MAX_DECODE_SAMPLES`, ...).
    """
    # with max_seconds, decode only the clip plus a margin at the source rate (media.clip_frames), so
    # the resampler sees the same neighbourhood at the cut as for the full file; exact cut after resampling
    x, sr = media.decode_audio(_audio_bytes(item), max_seconds)
    x = resample(x, sr, sample_rate)
    if max_seconds is not None:
        x = x[:int(round(max_seconds * sample_rate))]
    if len(x) < min_samples:
        x = np.pad(x, (0, min_samples - len(x)))
    return np.ascontiguousarray(x, dtype=np.float32)


class AudioExtractor(Extractor):
    """Common decode for audio extractors: rows -> float32 mono clips or errors."""
    modality = "audio"

    def __init__(self, frames: FrameParams, max_seconds: Optional[float]):
        self.p = frames
        self.max_seconds = None if max_seconds is None else float(max_seconds)

    def decode(self, items: Sequence[Any]) -> Decoded:
        values: list[Any] = []
        errors: list[Error] = []
        for item in items:
            try:
                values.append(decode_clip(item, self.p.sample_rate, self.max_seconds, self.p.win_length))
                errors.append(None)
            except media.MediaError as e:
                values.append(None)
                errors.append((e.reason, e.detail))
        return Decoded(values, errors)

    def decode_params(self) -> dict:
        return {"mono": "mean_of_channels", "resample": RESAMPLER, "max_seconds": self.max_seconds,
                "short_audio": "zero_pad_to_one_window", **self.p.as_dict()}

    # frame-level access, same conventions as the embeddings
    def logmel(self, x: np.ndarray) -> np.ndarray:
        return logmel(x, self.p)

    def mfcc(self, x: np.ndarray) -> np.ndarray:
        return mfcc(x, self.p)


class LogMelStatsExtractor(AudioExtractor):
    """[mean, std of log-mel over time, mean, std of MFCC] -> 2*n_mels + 2*n_mfcc (186)."""
    name = "logmel_stats"
    version = "1"
    needs_model = False

    def __init__(self, sample_rate: int = 16000, win_ms: float = 25.0, hop_ms: float = 10.0,
                 n_mels: int = 80, n_mfcc: int = 13, fmin: float = 0.0, fmax: Optional[float] = None,
                 max_seconds: Optional[float] = 30.0, backend: str = "numpy", batch_size: int = 32,
                 device: str = "cpu"):
        pin_threads()
        if backend not in RECORDED_BACKEND:
            raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
        super().__init__(FrameParams.from_ms(sample_rate, win_ms, hop_ms, n_mels, n_mfcc, fmin, fmax),
                         max_seconds)
        self.backend = backend
        # the torch backend runs where a model would: on the worker's GPU when it has one
        self.needs_model = backend == "torch"
        self.batch_size = int(batch_size)
        self.dim = stats_dim(self.p)
        self.device = str(device)
        self._front: Optional[TorchFrontend] = None

    def params(self) -> dict:
        # the backend is recorded: outputs agree only to BACKEND_RTOL
        return {**self.decode_params(), "backend": RECORDED_BACKEND[self.backend],
                "stats": ["logmel_mean", "logmel_std", "mfcc_mean", "mfcc_std"], "std_ddof": 0}

    def to(self, device: str) -> "LogMelStatsExtractor":
        self.device = str(device)
        if self.backend == "torch":
            self._frontend().to(self.device)
        elif not self.device.startswith("cpu"):
            log.warning("audio logmel_stats: backend 'numpy' runs on CPU; set backend: torch to use %s",
                        self.device)
        return self

    def _frontend(self) -> TorchFrontend:
        if self._front is None:
            self._front = TorchFrontend(self.p, self.device)
        return self._front

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        out = np.empty((len(values), self.dim), dtype=np.float32)
        if self.backend == "numpy":
            front = numpy_frontend(self.p)
            for i, x in enumerate(values):
                out[i] = front.stats(x)
            return out
        front = self._frontend()
        # batch clips of similar length together (less zero-padding); results return
        # in input order and do not depend on the grouping beyond float rounding
        order = np.argsort([len(v) for v in values], kind="stable")
        for i in range(0, len(values), self.batch_size):
            idx = order[i:i + self.batch_size]
            out[idx] = front.stats([values[j] for j in idx])
        return out


# --- cnn ---------------------------------------------------------------------------------
LOGMEL_CENTER_DB = -50.0    # the CNN sees (log-mel - center) / scale
LOGMEL_SCALE_DB = 25.0


def _audio_cnn_class():
    import torch
    from torch import nn

    class AudioCNN(nn.Module):
        """4 conv blocks (3x3 conv, BN, ReLU; 2x2 max-pool after the first three) over
        [n_mels, frames], then masked mean over time and mean over frequency.

        Frames past a clip's end are zeroed after every block, so a clip gets the
        same embedding alone or zero-padded in a batch (up to float rounding).
        """

        def __init__(self, embedding_dim: int = 128, channels: Sequence[int] = (32, 64, 128)):
            super().__init__()
            chans = [1, *channels, embedding_dim]
            self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False)
                                       for i in range(len(chans) - 1))
            self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in chans[1:])
            self.pool = nn.MaxPool2d(2, ceil_mode=True)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, L, frames):
            """L [B, n_mels, T] log-mel dB, frames [B] valid frames -> [B, embedding_dim]."""
            x = ((L - LOGMEL_CENTER_DB) / LOGMEL_SCALE_DB).unsqueeze(1)
            n = frames.clone()
            mask = (torch.arange(x.shape[-1], device=x.device)[None, :] < n[:, None]).to(x.dtype)
            x = x * mask[:, None, None, :]
            last = len(self.convs) - 1
            for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
                x = torch.relu(bn(conv(x)))
                x = x * mask[:, None, None, :]
                if i < last:
                    x = self.pool(x)         # values >= 0, so zeroed frames never win a max
                    n = torch.div(n + 1, 2, rounding_mode="floor")
                    mask = (torch.arange(x.shape[-1], device=x.device)[None, :] < n[:, None]).to(x.dtype)
            x = x.mean(dim=2)                                        # over frequency
            return (x * mask[:, None, :]).sum(dim=2) / n[:, None].to(x.dtype)

    return AudioCNN


def build_audio_cnn(embedding_dim: int = 128):
    return _audio_cnn_class()(embedding_dim)


class AudioCNNExtractor(AudioExtractor):
    """Small 2-D conv encoder over the log-mel -> ``embedding_dim`` (global pooling over time).

    Weights from ``weights`` (local path or fsspec URI; a ``state_dict`` of
    :class:`AudioCNN`, read with ``torch.load(weights_only=True)``) or a seeded
    random initialisation (with a loud warning).
    """
    name = "cnn"
    version = "1"
    needs_model = True

    def __init__(self, sample_rate: int = 16000, win_ms: float = 25.0, hop_ms: float = 10.0,
                 n_mels: int = 80, fmin: float = 0.0, fmax: Optional[float] = None,
                 max_seconds: Optional[float] = 30.0, embedding_dim: int = 128,
                 weights: Optional[str] = None, batch_size: int = 32, seed: int = 0, device: str = "cpu"):
        import torch  # noqa: F401  (imported first so that pin_threads also pins torch)

        pin_threads()
        super().__init__(FrameParams.from_ms(sample_rate, win_ms, hop_ms, n_mels, 0, fmin, fmax), max_seconds)
        self.embedding_dim = self.dim = int(embedding_dim)
        self.weights, self.seed = weights, int(seed)
        self.batch_size = int(batch_size)
        self.device = str(device)
        self._model = None
        self._front: Optional[TorchFrontend] = None
        self._weights_sha256: Optional[str] = None

    def params(self) -> dict:
        p = {**self.decode_params(), "arch": "AudioCNN(32,64,128,emb)", "embedding_dim": self.embedding_dim,
             "input_norm": [LOGMEL_CENTER_DB, LOGMEL_SCALE_DB], "pool": "masked_mean_time,mean_freq",
             "weights": self.weights}
        if self.weights is None:
            p["init"] = f"random(seed={self.seed})"
        else:
            if self._weights_sha256 is None:
                self._weights_sha256 = hashlib.sha256(storage.read_bytes(self.weights)).hexdigest()
            p["weights_sha256"] = self._weights_sha256
        return p

    def build_model(self):
        from mmbatch.preprocess.features.resnet import build_or_load

        model, sha = build_or_load(
            lambda: build_audio_cnn(self.embedding_dim), self.weights, self.seed,
            f"audio cnn extractor: no weights given; using RANDOM weights (seed {self.seed}). "
            "Features will carry little signal; set features.audio.weights.")
        if sha is not None:
            self._weights_sha256 = sha
        return model

    def _get(self):
        if self._model is None:
            self._model = self.build_model().to(self.device)
            self._front = TorchFrontend(self.p, self.device)
        return self._model, self._front

    def to(self, device: str) -> "AudioCNNExtractor":
        self.device = str(device)
        if self._model is None:
            self._get()
        else:
            self._model = self._model.to(self.device)
            self._front.to(self.device)
        return self

    def encode(self, values: Sequence[Any]) -> np.ndarray:
        import torch

        out = np.empty((len(values), self.dim), dtype=np.float32)
        if not len(values):
            return out
        model, front = self._get()
        order = np.argsort([len(v) for v in values], kind="stable")     # similar lengths together
        with torch.inference_mode():
            for i in range(0, len(values), self.batch_size):
                idx = order[i:i + self.batch_size]
                X, frames = front.pad_batch([values[j] for j in idx])
                out[idx] = model(front.logmel(X), frames).float().cpu().numpy()
        return out
