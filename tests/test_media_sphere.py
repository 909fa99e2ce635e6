"""NIST SPHERE through libsndfile: the same samples as the hand-written reader it replaced, both byte orders."""
from __future__ import annotations

import numpy as np
import pytest

from mmbatch import media
from mmbatch.media import MediaError
from mmbatch.ingest.sources import sphere


# --- the oracle: mmbatch's own SPHERE reader before it was replaced by libsndfile (commit 9a7281b),
# kept verbatim (minus its error class) so a change in what libsndfile returns shows up here.
def oracle_parse_header(data: bytes) -> dict:
    header_size = int(data[8:16].strip())
    fields: dict = {"header_size": header_size}
    for raw in data[16:header_size].split(b"\n"):
        line = raw.decode("ascii", "replace").strip()
        if not line:
            continue
        if line == "end_head":
            break
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        name, typ, value = parts
        if typ == "-i":
            fields[name] = int(value)
        elif typ == "-r":
            fields[name] = float(value)
        else:
            fields[name] = value
    return fields


def oracle_decode(data: bytes) -> tuple[np.ndarray, int]:
    h = oracle_parse_header(data)
    nbytes = int(h.get("sample_n_bytes", 2))
    channels = int(h.get("channel_count", 1))
    rate = int(h.get("sample_rate", 16000))
    order = str(h.get("sample_byte_format", "01"))
    endian = ">" if order == "10" else "<"
    dtype = np.dtype(f"{endian}i{nbytes}")
    body = data[h["header_size"]:]
    count = h.get("sample_count")
    usable = len(body) // (nbytes * channels)
    n = int(count) if count is not None else usable
    samples = np.frombuffer(body[: n * nbytes * channels], dtype=dtype).astype(np.float32)
    samples /= float(2 ** (8 * nbytes - 1))
    if channels > 1:
        samples = samples.reshape(-1, channels)
    return samples, rate


def timit_header(n: int, byte_format: str, channels: int = 1, rate: int = 16000) -> bytes:
    """A header laid out like an LDC TIMIT file's (no sample_coding field), padded to 1024 bytes."""
    lines = ["NIST_1A", "   1024", "database_id -s5 TIMIT", "database_version -s3 1.0",
             "utterance_id -s8 aks0_sa1", f"channel_count -i {channels}", f"sample_count -i {n}",
             f"sample_rate -i {rate}", "sample_min -i -32768", "sample_max -i 32767", "sample_n_bytes -i 2",
             f"sample_byte_format -s2 {byte_format}", "sample_sig_bits -i 16", "end_head"]
    return ("\n".join(lines) + "\n").encode("ascii").ljust(1024, b" ")


def full_range_pcm(n: int, channels: int = 1) -> np.ndarray:
    """int16 samples covering the whole range, both extremes included."""
    rng = np.random.default_rng(7)
    x = rng.integers(-32768, 32768, size=n * channels, dtype=np.int64)
    x[:4] = [-32768, 32767, 0, -1]
    return x.astype(np.int16).reshape(n, channels) if channels > 1 else x.astype(np.int16)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("byte_format", ["01", "10"])
def test_libsndfile_samples_equal_the_old_reader(byte_format, channels):
    pcm = full_range_pcm(3001, channels)
    dtype = ">i2" if byte_format == "10" else "<i2"
    data = timit_header(3001, byte_format, channels) + pcm.astype(dtype).tobytes()

    want, want_sr = oracle_decode(data)
    info = media.probe_audio(data)
    assert (info.sample_rate, info.frames, info.channels, info.format) == (16000, 3001, channels, "SPHERE")
    import io

    import soundfile as sf
    got, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    assert sr == want_sr == 16000 and got.dtype == want.dtype == np.float32
    assert np.array_equal(got, want)                                   # bit for bit, both byte orders
    assert np.array_equal(got, pcm.astype(np.float32) / 32768)         # and the known samples
    assert got.min() == -1.0 and got.max() == np.float32(32767 / 32768)

    # media.decode_audio (what features use): the same samples, channels averaged to mono
    mono, sr = media.decode_audio(data)
    want_mono = want if channels == 1 else want.mean(axis=1)
    assert sr == 16000 and np.array_equal(mono, want_mono.astype(np.float32))


@pytest.mark.parametrize("byte_format", ["01", "10"])
def test_the_demo_writer_round_trips(byte_format):
    x = np.sin(np.linspace(0, 60, 1600)).astype(np.float32) * 0.9
    data = sphere.encode(x, 16000, byte_format=byte_format)
    assert media.is_sphere(data) and media.sphere_header(data)["sample_byte_format"] == byte_format
    got, sr = media.decode_audio(data)
    assert sr == 16000 and np.array_equal(got, oracle_decode(data)[0])
    assert np.abs(got - x).max() < 1e-4                                # written x32767, read /32768


def test_shorten_truncated_and_bad_headers_keep_their_reasons():
    x = np.zeros(800, np.float32)
    shorten = sphere.encode(x, sample_coding="pcm,embedded-shorten-v2.00")
    cut = sphere.encode(x)[:1024 + 400]                                # 200 of 800 samples
    bad_size = b"NIST_1A\n   abcd\n" + sphere.encode(x)[16:]
    for data, reason in ((shorten, "sphere_shorten"), (cut, "truncated"), (bad_size, "bad_header"),
                         (b"NIST_1A\n   1024\nend_head\n", "truncated")):
        for fn in (media.probe_audio, media.decode_audio):
            with pytest.raises(MediaError) as e:
                fn(data)
            assert e.value.reason == reason, (fn.__name__, reason)
