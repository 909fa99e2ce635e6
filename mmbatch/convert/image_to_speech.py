"""Image -> speech: sonification in the manner of the vOICe (Meijer, 1992).

The image is turned to grayscale and resized to ``rows`` x ``cols``; the columns
are played left to right over ``seconds`` (``cols_per_second`` columns a second,
so ``cols`` follows from the duration). Each row is a sine at its own frequency
on an exponential scale, the top row highest (``fmax``) and the bottom row
lowest (``fmin``); a pixel's brightness is that sine's amplitude during its
column's time slot. Amplitudes change between columns over a short linear
crossfade so the slot edges do not click.

:func:`sonogram` reads an image back out of a waveform (the magnitude at each
row frequency in each column slot); :func:`waveform_spectrogram` and
:func:`save_spectrogram_png` give the ordinary STFT view.
"""
from __future__ import annotations

import numpy as np

from mmbatch.convert import SR
from mmbatch.plots import no_tex, plain

ROWS = 64                 # pitch resolution (the vOICe's default)
COLS_PER_SECOND = 64      # time resolution: 64 columns in the default 1 s scan
SECONDS = 1.0
FMIN, FMAX = 500.0, 5000.0
CROSSFADE_MS = 2.0
PEAK = 0.9                # output peak level after normalisation
_BLOCK = 1 << 15          # samples synthesised at a time (bounds memory for long scans)


def to_gray(image: np.ndarray) -> np.ndarray:
    """RGB / RGBA / grayscale array (uint8, uint16 or float in [0, 1]) -> float32 gray in [0, 1]."""
    a = np.asarray(image)
    if a.ndim == 3:
        if a.shape[2] == 1:
            a = a[:, :, 0]
        elif a.shape[2] in (3, 4):
            rgb = a[:, :, :3].astype(np.float32)
            a = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)   # ITU-R 601 luma
        else:
            raise ValueError(f"image has {a.shape[2]} channels; expected 1, 3 or 4")
    elif a.ndim != 2:
        raise ValueError(f"expected an [H, W] or [H, W, C] image, got shape {a.shape}")
    if a.size == 0:
        raise ValueError("image is empty")
    dtype = np.asarray(image).dtype
    if dtype == np.uint8:
        g = a.astype(np.float32) / 255.0
    elif dtype == np.uint16:
        g = a.astype(np.float32) / 65535.0
    else:
        g = a.astype(np.float32)
    return np.clip(g, 0.0, 1.0)


def columns_for(seconds: float, cols_per_second: float = COLS_PER_SECOND) -> int:
    return max(1, int(round(seconds * cols_per_second)))


def scan_image(image: np.ndarray, rows: int = ROWS, cols: int | None = None,
               seconds: float = SECONDS) -> np.ndarray:
    """The brightness map that gets played: float32 [rows, cols] in [0, 1], row 0 = top."""
    import cv2

    cols = cols or columns_for(seconds)
    g = to_gray(image)
    interp = cv2.INTER_AREA if (g.shape[0] >= rows and g.shape[1] >= cols) else cv2.INTER_LINEAR
    return cv2.resize(g, (int(cols), int(rows)), interpolation=interp)


def row_frequencies(rows: int = ROWS, fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """Frequency of each row, top row first: exponential from ``fmax`` down to ``fmin``."""
    if rows == 1:
        return np.array([np.sqrt(fmin * fmax)])
    k = np.arange(rows, dtype=np.float64)
    return fmax * (fmin / fmax) ** (k / (rows - 1))


def slot_edges(n_samples: int, cols: int) -> np.ndarray:
    """Sample index where each column's time slot starts (``cols + 1`` edges)."""
    return np.round(np.linspace(0, n_samples, cols + 1)).astype(np.int64)


def image_to_waveform(image: np.ndarray, sr: int = SR, seconds: float = SECONDS, rows: int = ROWS,
                      fmin: float = FMIN, fmax: float = FMAX, *, cols: int | None = None,
                      crossfade_ms: float = CROSSFADE_MS, normalize: bool = True, seed: int = 0) -> np.ndarray:
    """Sonify an image: float32 mono samples, ``round(sr * seconds)`` long.

    ``cols`` defaults to ``COLS_PER_SECOND`` per second of scan. Row phases are
    fixed pseudo-random (``seed``) so the summed sines do not all peak together.
    With ``normalize`` the output peak is scaled to ``PEAK`` (an all-black image
    stays silent).
    """
    if not 0 < fmin < fmax < sr / 2:
        raise ValueError(f"need 0 < fmin < fmax < sr/2; got fmin={fmin}, fmax={fmax}, sr={sr}")
    if seconds <= 0 or rows < 1:
        raise ValueError(f"need seconds > 0 and rows >= 1; got seconds={seconds}, rows={rows}")
    n = int(round(sr * seconds))
    cols = min(cols or columns_for(seconds), n)
    amp = scan_image(image, rows, cols).astype(np.float64)              # [rows, cols]

    # per-sample amplitude of every row: piecewise constant per slot ...
    col_of_sample = np.searchsorted(slot_edges(n, cols), np.arange(n), side="right") - 1
    env = amp[:, np.clip(col_of_sample, 0, cols - 1)]                   # [rows, n]
    # ... with linear ramps of crossfade_ms between slots (moving average = linear crossfade)
    k = int(round(crossfade_ms * sr / 1000.0))
    if k > 1:
        from scipy.ndimage import uniform_filter1d
        env = uniform_filter1d(env, size=k, axis=1, mode="nearest")

    freqs = row_frequencies(rows, fmin, fmax)
    phases = np.random.default_rng(seed).uniform(0.0, 2 * np.pi, rows)
    y = np.empty(n, dtype=np.float64)
    w = 2 * np.pi * freqs[:, None] / sr
    for s in range(0, n, _BLOCK):
        t = np.arange(s, min(n, s + _BLOCK), dtype=np.float64)
        y[s:s + t.size] = np.einsum("rt,rt->t", env[:, s:s + t.size], np.sin(w * t[None, :] + phases[:, None]))
    if normalize:
        peak = float(np.max(np.abs(y))) if n else 0.0
        if peak > 0:
            y *= PEAK / peak
    return y.astype(np.float32)


def sonogram(y: np.ndarray, sr: int = SR, rows: int = ROWS, cols: int | None = None,
             fmin: float = FMIN, fmax: float = FMAX, seconds: float | None = None) -> np.ndarray:
    """Read the image back: magnitude at each row frequency in each column slot, [rows, cols].

    The inverse view of :func:`image_to_waveform` (same slots, same
    frequencies); neighbouring low rows blur together because a slot is short.
    """
    y = np.asarray(y, dtype=np.float64)
    seconds = seconds if seconds is not None else y.size / sr
    cols = min(cols or columns_for(seconds), y.size)
    edges = slot_edges(y.size, cols)
    w = 2 * np.pi * row_frequencies(rows, fmin, fmax) / sr
    out = np.zeros((rows, cols), dtype=np.float64)
    for c in range(cols):
        a, b = edges[c], edges[c + 1]
        if b <= a:
            continue
        t = np.arange(a, b, dtype=np.float64)
        basis = np.exp(-1j * w[:, None] * t[None, :])                   # [rows, slot]
        out[:, c] = np.abs(basis @ y[a:b]) * 2.0 / (b - a)
    return out.astype(np.float32)


def waveform_spectrogram(y: np.ndarray, sr: int = SR, n_fft: int = 512,
                         hop: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """STFT magnitude of a waveform: ``(freqs [F] Hz, times [T] s, magnitude [F, T])``.

    Hann window of ``n_fft`` samples, hop ``n_fft // 4`` by default, frames
    centred on their time stamps.
    """
    from scipy.signal import stft

    y = np.asarray(y, dtype=np.float64)
    hop = hop or n_fft // 4
    freqs, times, z = stft(y, fs=sr, window="hann", nperseg=n_fft, noverlap=n_fft - hop,
                           boundary="zeros", padded=True)
    return freqs, times, np.abs(z).astype(np.float32)


def spectrogram_at(freqs: np.ndarray, times: np.ndarray, mag: np.ndarray,
                   at_freqs: np.ndarray, at_times: np.ndarray) -> np.ndarray:
    """Sample a spectrogram at the nearest bins to ``at_freqs`` x ``at_times`` -> [len(at_freqs), len(at_times)]."""
    fi = np.abs(freqs[:, None] - np.asarray(at_freqs)[None, :]).argmin(axis=0)
    ti = np.abs(times[:, None] - np.asarray(at_times)[None, :]).argmin(axis=0)
    return mag[np.ix_(fi, ti)]


@no_tex
def save_spectrogram_png(y: np.ndarray, path, sr: int = SR, n_fft: int = 512,
                         fmax: float | None = None, title: str | None = None) -> None:
    """Write the dB spectrogram of ``y`` as a PNG (matplotlib, Agg canvas; no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    freqs, times, mag = waveform_spectrogram(y, sr, n_fft=n_fft)
    db = 20 * np.log10(np.maximum(mag, 1e-6))
    top = db.max() if db.size else 0.0
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    mesh = ax.pcolormesh(times, freqs, db, shading="auto", vmin=top - 80, vmax=top, cmap="magma")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")
    ax.set_ylim(0, fmax or sr / 2)
    if title:
        ax.set_title(plain(title))          # a file name: data, not mathtext
    fig.colorbar(mesh, ax=ax, label="dB")
    fig.tight_layout()
    fig.savefig(path, format="png")
