"""Audio decode, frame features against librosa, logmel_stats backends and the audio CNN."""
from __future__ import annotations

import io
import logging
import warnings

import librosa
import numpy as np
import pytest
import soundfile as sf

from mmbatch.config import AudioFeatures
from mmbatch.preprocess.features.audio import (BACKEND_RTOL, AudioCNNExtractor, FrameParams, LogMelStatsExtractor,
                                    TorchFrontend, decode_clip, logmel, logmel_stats, mfcc)
from mmbatch.preprocess.features.registry import build_extractor, embedding_dim
from mmbatch.ingest.sources import sphere

SR = 16000


def _tone(freq: float, seconds: float, sr: int, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _speechlike(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    x = sum(_tone(f, seconds, sr, a) for f, a in ((220, 0.2), (660, 0.1), (1800, 0.05)))
    env = np.abs(np.sin(np.linspace(0, 7, len(x))))
    return (x * env + 0.01 * rng.randn(len(x))).astype(np.float32)


def _encode(x: np.ndarray, sr: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _librosa_logmel(x, p: FrameParams):
    S = librosa.feature.melspectrogram(y=x, sr=p.sample_rate, n_fft=p.n_fft, hop_length=p.hop_length,
                                       win_length=p.win_length, window="hann", center=True,
                                       pad_mode="constant", power=2.0, n_mels=p.n_mels, fmin=p.fmin, fmax=p.fmax)
    return librosa.power_to_db(S, ref=1.0, amin=1e-10, top_db=None)


# --- frame features vs librosa --------------------------------------------------------
@pytest.mark.parametrize("p", [FrameParams(),
                               FrameParams.from_ms(8000, 32.0, 8.0, n_mels=40, n_mfcc=20, fmin=50.0, fmax=3800.0)])
def test_logmel_and_mfcc_match_librosa(p):
    x = _speechlike(1.3, p.sample_rate)
    ref = _librosa_logmel(x, p)
    L = logmel(x, p)
    assert L.shape == ref.shape == (p.n_mels, 1 + len(x) // p.hop_length) and L.dtype == np.float32
    assert np.abs(L - ref).max() < 1e-3                                     # dB
    ref_m = librosa.feature.mfcc(S=ref, n_mfcc=p.n_mfcc, dct_type=2, norm="ortho", lifter=0)
    M = mfcc(x, p)
    assert M.shape == ref_m.shape
    assert np.abs(M - ref_m).max() < 1e-3 * max(1.0, np.abs(ref_m).max())


def test_stated_frame_parameters():
    p = FrameParams.from_config(AudioFeatures())
    assert (p.win_length, p.hop_length, p.n_fft, p.n_mels, p.n_mfcc) == (400, 160, 400, 80, 13)
    assert p.center and p.window == "hann_periodic" and p.amin == 1e-10
    ex = LogMelStatsExtractor()
    assert ex.dim == 186 == embedding_dim("audio", AudioFeatures())
    prm = ex.params()
    for k in ("n_fft", "hop_length", "win_length", "n_mels", "n_mfcc", "center", "window", "resample",
              "max_seconds", "backend", "sample_rate", "fmin", "fmax"):
        assert k in prm


# --- backends ------------------------------------------------------------------------
def test_torch_backend_agrees_with_numpy_on_a_ragged_batch():
    clips = [_speechlike(1.0), _speechlike(0.37, seed=1), np.zeros(400, np.float32),
             _speechlike(2.2, seed=2) * 3, _tone(3000, 0.05, SR)]
    lib = LogMelStatsExtractor(backend="numpy").encode(clips)
    tor = LogMelStatsExtractor(backend="torch", batch_size=4).encode(clips)
    assert lib.shape == tor.shape == (5, 186)
    assert np.isfinite(lib).all() and np.isfinite(tor).all()
    err = np.abs(lib - tor).max() / max(1.0, np.abs(lib).max())
    assert err < BACKEND_RTOL, err
    # per-clip frame masks: a clip alone gives its batched result
    alone = LogMelStatsExtractor(backend="torch").encode(clips[1:2])
    assert np.abs(alone[0] - tor[1]).max() / np.abs(lib).max() < 1e-5
    # and the embedding is [mean, std] of log-mel, then of MFCC
    L = logmel(clips[0])
    assert np.allclose(lib[0, :80], L.mean(1), atol=1e-4) and np.allclose(lib[0, 80:160], L.std(1), atol=1e-4)
    assert np.array_equal(lib, LogMelStatsExtractor(backend="numpy").encode(clips))
    assert np.array_equal(tor, LogMelStatsExtractor(backend="torch", batch_size=4).encode(clips))


def test_frontend_frame_count_matches_librosa():
    front = TorchFrontend()
    X, frames = front.pad_batch([np.zeros(1000, np.float32), np.zeros(16000, np.float32)])
    assert frames.tolist() == [1 + 1000 // 160, 101]
    assert front.logmel(X).shape == (2, 80, 101)


# --- decode ------------------------------------------------------------------------------
@pytest.mark.parametrize("sr,fmt", [(8000, "WAV"), (44100, "FLAC"), (16000, "FLAC")])
def test_decode_resamples_to_target_rate(sr, fmt):
    data = _encode(_tone(440.0, 1.0, sr), sr, fmt)
    x = decode_clip(data, sample_rate=SR, max_seconds=30.0)
    assert x.dtype == np.float32 and abs(len(x) - SR) <= 1
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    assert abs(np.argmax(spec) * SR / len(x) - 440.0) < 2.0
    assert 0.25 < np.abs(x[1000:-1000]).max() < 0.35
    ex = LogMelStatsExtractor()
    feats, errors = ex.extract([data])
    assert errors == [None] and np.isfinite(feats).all()


def test_resampled_features_close_to_native():
    x16 = _speechlike(1.0, SR)
    x441 = librosa.resample(x16, orig_sr=SR, target_sr=44100)
    ex = LogMelStatsExtractor()
    a = ex.extract([_encode(x16, SR, "FLAC")])[0][0]
    b = ex.extract([_encode(x441, 44100, "FLAC")])[0][0]
    assert np.abs(a[:80] - b[:80]).mean() < 1.0          # mean log-mel within 1 dB on average


def test_clip_short_and_silent_audio():
    long = _encode(_speechlike(3.0), SR, "FLAC")
    assert len(decode_clip(long, SR, max_seconds=1.0)) == SR
    short = decode_clip(_encode(_tone(500, 0.004, SR), SR, "WAV"), SR, 30.0)     # 64 samples
    assert len(short) == 400 and not short[64:].any()
    ex = LogMelStatsExtractor()
    zeros = _encode(np.zeros(8000, np.float32), SR, "FLAC")
    feats, errors = ex.extract([zeros, _encode(_tone(500, 0.004, SR), SR, "WAV")])
    assert errors == [None, None] and np.isfinite(feats).all()
    assert np.allclose(feats[0, :80], -100.0) and not feats[0, 80:160].any()   # log10(1e-10) dB, std 0
    tor = LogMelStatsExtractor(backend="torch").extract([zeros])[0]
    assert np.isfinite(tor).all()
    assert ex.params()["max_seconds"] == 30.0


def test_corrupt_and_empty_audio_are_row_errors():
    data = _encode(_speechlike(2.0), SR, "FLAC")
    ex = LogMelStatsExtractor()
    feats, errors = ex.extract([data[: len(data) // 2], b"", None, b"RIFF not really", data])
    reasons = [e[0] if e else None for e in errors]
    assert reasons[:4] == ["corrupt_audio", "empty_file", "empty_file", "corrupt_audio"] and reasons[4] is None
    assert not feats[:4].any() and feats[4].any()


@pytest.mark.parametrize("byte_format", ["10", "01"])
def test_sphere_decodes_both_byte_orders(byte_format):
    x = _speechlike(0.5)
    data = sphere.encode(x, SR, byte_format=byte_format)
    y = decode_clip({"bytes": data, "path": "SA1.WAV"}, SR, 30.0)
    assert len(y) == len(x) and np.abs(y - x).max() < 1.0 / 16000
    shorten = sphere.encode(x, SR, sample_coding="pcm,embedded-shorten-v2.00")
    errors = LogMelStatsExtractor().decode([shorten]).errors
    assert errors[0][0] == "sphere_shorten"


# --- cnn -------------------------------------------------------------------------------
def test_audio_cnn_dims_determinism_batching_and_weights(tmp_path):
    import torch

    clips = [_speechlike(0.8), _speechlike(0.3, seed=3), np.zeros(400, np.float32)]
    ex = AudioCNNExtractor(embedding_dim=32, batch_size=8)
    assert ex.needs_model and ex.dim == 32
    with pytest.warns(RuntimeWarning, match="RANDOM weights"):
        a = ex.encode(clips)
    assert a.shape == (3, 32) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, ex.encode(clips))
    alone = np.concatenate([ex.encode([c]) for c in clips])
    assert np.abs(alone - a).max() < 1e-4 * max(1.0, np.abs(a).max())    # padding is masked out
    path = tmp_path / "audio_cnn.pt"
    torch.save({"state_dict": ex._model.state_dict()}, path)
    loaded = AudioCNNExtractor(embedding_dim=32, batch_size=8, weights=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(loaded.encode(clips), a)
    assert len(loaded.params()["weights_sha256"]) == 64


def test_old_backend_name_librosa_is_numpy_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mmbatch.config"):
        cfg = AudioFeatures(backend="librosa")
    assert cfg.backend == "numpy"
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == [
        "features.audio.backend: 'librosa' is deprecated, it is now called 'numpy' (the same computation)"]
    clips = [_speechlike(0.5)]
    ex = build_extractor("audio", cfg)
    assert np.array_equal(ex.encode(clips), LogMelStatsExtractor(backend="numpy").encode(clips))
    assert ex.params()["backend"] == "librosa"          # outputs record the name they always did


def test_registry_audio():
    ex = build_extractor("audio", AudioFeatures(backend="torch", n_mels=40, n_mfcc=10))
    assert isinstance(ex, LogMelStatsExtractor) and ex.backend == "torch" and ex.dim == 100
    cnn = build_extractor("audio", AudioFeatures(extractor="cnn", embedding_dim=64))
    assert isinstance(cnn, AudioCNNExtractor) and cnn.dim == 64
    assert embedding_dim("audio", AudioFeatures(extractor="cnn", embedding_dim=64)) == 64
    assert ex.describe()["name"] == "logmel_stats" and cnn.describe()["modality"] == "audio"


def test_logmel_stats_function_matches_extractor():
    x = _speechlike(0.5)
    assert np.array_equal(logmel_stats(x), LogMelStatsExtractor().encode([x])[0])


# --- the numpy front end equals the librosa computation it replaced -------------------
def _librosa_logmel_stats(x: np.ndarray, p: FrameParams) -> np.ndarray:
    """The oracle: logmel_stats exactly as mmbatch computed it with librosa before the
    numpy front end (librosa.stft per clip, librosa.filters.mel, scipy's DCT-II)."""
    import scipy.fft

    S = librosa.stft(np.asarray(x, dtype=np.float32), n_fft=p.n_fft, hop_length=p.hop_length,
                     win_length=p.win_length, window="hann", center=p.center, pad_mode=p.pad_mode)
    power = (S.real * S.real + S.imag * S.imag).astype(np.float32, copy=False)
    fb = librosa.filters.mel(sr=p.sample_rate, n_fft=p.n_fft, n_mels=p.n_mels, fmin=p.fmin, fmax=p.fmax,
                             htk=p.mel_htk, norm=p.mel_norm, dtype=np.float32)
    L = (10.0 * np.log10(np.maximum(fb @ power, p.amin))).astype(np.float32, copy=False)
    parts = [L.mean(axis=1), L.std(axis=1)]
    if p.n_mfcc:
        D = scipy.fft.dct(np.eye(p.n_mels, dtype=np.float64), type=2, norm="ortho", axis=0)[:p.n_mfcc]
        M = D.astype(np.float32) @ L
        parts += [M.mean(axis=1), M.std(axis=1)]
    return np.concatenate(parts).astype(np.float32)


def _real_clips() -> dict[str, bytes]:
    """Encoded FLAC/WAV files of several lengths, rates and contents, incl. edge cases."""
    rng = np.random.default_rng(7)
    return {
        "speech_1s": _encode(_speechlike(1.0), SR, "FLAC"),
        "speech_0.37s": _encode(_speechlike(0.37, seed=1), SR, "FLAC"),
        "speech_12.3s": _encode(_speechlike(12.3, seed=2), SR, "FLAC"),
        "noise_loud_2s": _encode(np.clip(rng.normal(0, 0.6, 2 * SR), -1, 1).astype(np.float32), SR, "FLAC"),
        "tone_100_samples": _encode(_tone(700, 100 / SR, SR), SR, "FLAC"),     # < one window: padded
        "one_window_plus_one": _encode(_speechlike(401 / SR, seed=3), SR, "FLAC"),
        "silence_0.5s": _encode(np.zeros(SR // 2, np.float32), SR, "FLAC"),
        "near_silence_1s": _encode((rng.integers(-1, 2, SR) / 32768.0).astype(np.float32), SR, "FLAC"),
        "speech_44k1_1.5s": _encode(_speechlike(1.5, 44100, seed=4), 44100, "FLAC"),   # resampled
        "stereo_wav_0.8s": _encode(np.stack([_speechlike(0.8, seed=5), _tone(300, 0.8, SR)], 1), SR, "WAV"),
    }


# float32 log-mel values are stored with a relative precision of 6e-8 (|values| up to
# ~100 dB: one float32 step is 7.6e-6 there), so 1e-5 relative to max(1, |value|) allows
# a rounding difference of about one step and fails on any change in the computation
# (a window, padding, filterbank or dB-floor change moves values by 1e-3 or more).
EQUALITY_RTOL = 1e-5


@pytest.mark.parametrize("frames", [
    {},                                                          # the workflow defaults
    dict(sample_rate=8000, win_ms=32.0, hop_ms=8.0, n_mels=40, n_mfcc=20, fmin=50.0, fmax=3800.0),
])
def test_logmel_stats_equal_to_the_librosa_computation_on_real_files(frames):
    ex = LogMelStatsExtractor(**frames)
    clips = _real_clips()
    feats, errors = ex.extract(list(clips.values()))
    assert errors == [None] * len(clips)
    decoded = ex.decode(list(clips.values())).values
    for i, (name, x) in enumerate(zip(clips, decoded)):
        ref = _librosa_logmel_stats(x, ex.p)
        err = np.abs(feats[i] - ref) / np.maximum(1.0, np.abs(ref))
        assert err.max() <= EQUALITY_RTOL, (name, float(err.max()))
        assert np.isfinite(feats[i]).all()
    # the silent file: every band at the -100 dB floor, no spread
    silent = feats[list(clips).index("silence_0.5s")]
    assert np.allclose(silent[:ex.p.n_mels], -100.0, atol=1e-4) and not silent[ex.p.n_mels:2 * ex.p.n_mels].any()


@pytest.mark.parametrize("p", [
    FrameParams(),
    FrameParams.from_ms(8000, 32.0, 8.0, n_mels=40, n_mfcc=20, fmin=50.0, fmax=3800.0),
    FrameParams.from_ms(22050, 46.4, 11.6, n_mels=128, n_mfcc=13, fmin=20.0),
    FrameParams(sample_rate=16000, win_length=400, hop_length=160, n_fft=512, n_mels=64, mel_htk=True),
])
def test_window_filterbank_and_dct_equal_librosa_and_scipy(p):
    import scipy.fft
    import scipy.signal

    from mmbatch.preprocess.features.audio import analysis_window, dct_matrix, mel_basis

    ref_fb = librosa.filters.mel(sr=p.sample_rate, n_fft=p.n_fft, n_mels=p.n_mels, fmin=p.fmin, fmax=p.fmax,
                                 htk=p.mel_htk, norm=p.mel_norm, dtype=np.float32)
    fb = mel_basis(p)
    assert fb.shape == ref_fb.shape and fb.dtype == np.float32
    assert np.abs(fb - ref_fb).max() <= 1e-7 * np.abs(ref_fb).max()
    ref_win = librosa.util.pad_center(scipy.signal.get_window("hann", p.win_length, fftbins=True), size=p.n_fft)
    assert np.abs(analysis_window(p) - ref_win).max() < 1e-15
    ref_dct = scipy.fft.dct(np.eye(p.n_mels), type=2, norm="ortho", axis=0)[:p.n_mfcc].astype(np.float32)
    assert np.abs(dct_matrix(p.n_mfcc, p.n_mels) - ref_dct).max() <= 1e-7
    # and the power spectrum of a clip, frame by frame, for a window shorter than n_fft too
    x = _speechlike(0.9, p.sample_rate)
    S = librosa.stft(x, n_fft=p.n_fft, hop_length=p.hop_length, win_length=p.win_length, window="hann",
                     center=True, pad_mode="constant")
    from mmbatch.preprocess.features.audio import power_spectrogram
    assert np.array_equal(power_spectrogram(x, p), S.real * S.real + S.imag * S.imag)


def test_logmel_stats_imports_neither_librosa_nor_scipy_nor_torch():
    """A model-free audio worker decodes and extracts without the heavy imports."""
    import subprocess
    import sys

    code = (
        "import io, sys, numpy as np, soundfile as sf\n"
        "from mmbatch.preprocess.features.registry import build_extractor\n"
        "buf = io.BytesIO(); sf.write(buf, np.zeros(16000, np.float32), 16000, format='FLAC')\n"
        "emb, errors = build_extractor('audio').extract([buf.getvalue()])\n"
        "assert errors == [None] and emb.shape == (1, 186)\n"
        "print(sorted(m for m in ('librosa', 'scipy', 'torch', 'cv2') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_zero_copy_column_views_decode_like_bytes():
    """The preprocess unit hands extractors memoryviews into the Parquet column's buffer
    (``raw_items``), which libsndfile reads in place: same features and same row errors as the
    bytes themselves, SPHERE (both byte orders, shorten refused) included."""
    import pyarrow as pa

    from mmbatch.preprocess.unit import raw_items

    x = _speechlike(0.5)
    flac = _encode(_speechlike(2.0), SR, "FLAC")
    values = list(_real_clips().values()) + [
        sphere.encode(x, SR, byte_format="10"), sphere.encode(x, SR, byte_format="01"),
        sphere.encode(x, SR, sample_coding="pcm,embedded-shorten-v2.00"), flac[: len(flac) // 2], b"", None]
    col = pa.array([None if v is None else {"bytes": v, "path": f"wav/{i}"} for i, v in enumerate(values)],
                   pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    items, _ = raw_items(pa.table({"audio": col}), "audio")
    assert all(isinstance(v, memoryview) for v in items[:-1]) and items[-1] is None
    ex = LogMelStatsExtractor()
    f_bytes, e_bytes = ex.extract(values)
    f_view, e_view = ex.extract(items)
    assert e_view == e_bytes
    assert [e[0] if e else None for e in e_view[-4:]] == ["sphere_shorten", "corrupt_audio", "empty_file", "empty_file"]
    assert np.array_equal(f_view, f_bytes) and f_view[:-4].any(axis=1).all()
