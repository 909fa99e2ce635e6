"""A NIST SPHERE writer (TIMIT ``.WAV`` layout) for the demo corpus and the tests.

Reading SPHERE is libsndfile's job (:func:`mmbatch.media.decode_audio`). This
writes the header the way the LDC TIMIT files have it (``NIST_1A``, a
1024-byte header of ``name -i|-s<n> value`` lines, no ``sample_coding`` unless
asked) so the readers are tested on bytes libsndfile did not write itself.
"""
from __future__ import annotations

import numpy as np


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
