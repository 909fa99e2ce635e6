"""NIST SPHERE (TIMIT ``.WAV``): header parsing, PCM decoding, and a writer.

Layout (REFERENCE.md §3): ``NIST_1A\\n   1024\\n`` then ``name -i|-r|-sN value``
lines until ``end_head``; samples start at the header size (usually 1024).
Shorten-compressed files (``sample_coding`` containing ``shorten``) are refused
with :class:`SphereError` so ingest can quarantine them with a clear reason.
"""
from __future__ import annotations

import numpy as np


class SphereError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def is_sphere(data: bytes) -> bool:
    return data[:8] == b"NIST_1A\n"


def parse_header(data: bytes) -> dict:
    if not is_sphere(data):
        raise SphereError("not_sphere", "missing NIST_1A magic: not a SPHERE file")
    try:
        header_size = int(data[8:16].strip())
    except ValueError:
        raise SphereError("bad_header", "SPHERE header size is not a number") from None
    if header_size < 16 or header_size > len(data):
        raise SphereError("truncated", f"SPHERE header declares {header_size} bytes, file has {len(data)}")
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


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """(float32 samples in [-1, 1] shaped (n,) or (n, channels), sample_rate)."""
    h = parse_header(data)
    coding = str(h.get("sample_coding", "pcm"))
    if "shorten" in coding:
        raise SphereError("sphere_shorten", f"SPHERE sample_coding={coding!r} (shorten-compressed) is not supported; "
                          "decompress with sph2pipe first")
    if coding not in ("pcm", "") and not coding.startswith("pcm"):
        raise SphereError("sphere_coding", f"unsupported SPHERE sample_coding={coding!r}")
    nbytes = int(h.get("sample_n_bytes", 2))
    channels = int(h.get("channel_count", 1))
    rate = int(h.get("sample_rate", 16000))
    order = str(h.get("sample_byte_format", "01"))
    if nbytes not in (1, 2, 4):
        raise SphereError("sphere_coding", f"unsupported sample_n_bytes={nbytes}")
    endian = ">" if order == "10" else "<"
    dtype = np.dtype(f"{endian}i{nbytes}")
    body = data[h["header_size"]:]
    count = h.get("sample_count")
    usable = len(body) // (nbytes * channels)
    if count is not None and int(count) > usable:
        raise SphereError("truncated", f"SPHERE header declares {count} samples, file holds {usable}")
    n = int(count) if count is not None else usable
    samples = np.frombuffer(body[: n * nbytes * channels], dtype=dtype).astype(np.float32)
    samples /= float(2 ** (8 * nbytes - 1))
    if channels > 1:
        samples = samples.reshape(-1, channels)
    return samples, rate


def encode(samples: np.ndarray, sample_rate: int = 16000, byte_format: str = "01",
           sample_coding: str | None = None, extra: dict | None = None) -> bytes:
    """SPHERE bytes of 16-bit PCM (``byte_format`` ``01`` little- or ``10`` big-endian)."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    pcm = np.round(x * 32767).astype(">i2" if byte_format == "10" else "<i2")
    channels = 1 if pcm.ndim == 1 else pcm.shape[1]
    lines = [
        "NIST_1A", "   1024",
        "database_id -s5 TIMIT",
        f"channel_count -i {channels}",
        f"sample_count -i {pcm.shape[0]}",
        f"sample_rate -i {sample_rate}",
        "sample_min -i -32768", "sample_max -i 32767",
        "sample_n_bytes -i 2",
        f"sample_byte_format -s2 {byte_format}",
        "sample_sig_bits -i 16",
    ]
    if sample_coding:
        lines.append(f"sample_coding -s{len(sample_coding)} {sample_coding}")
    for k, v in (extra or {}).items():
        lines.append(f"{k} -s{len(str(v))} {v}")
    lines.append("end_head")
    header = ("\n".join(lines) + "\n").encode("ascii")
    header = header.ljust(1024, b" ")
    return header + pcm.tobytes()
