"""Hostile media are bounded: long multichannel audio, huge files, unstorable values, endless text.

The hostile FLAC is made here: 30 minutes of 8-channel 48 kHz silence, 0.7 MB on disk (silence
compresses to almost nothing), 691 M samples (2.8 GB of float32) when decoded whole. The "valid header
followed by gigabytes" file is sparse: a real FLAC extended to 3 GiB with a hole (no disk used).
Memory is the peak RSS of a fresh Python process (``VmHWM``), before and after the hostile part.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from corpora_ingest import flac, read_quarantine, read_rows, write
from mmbatch import media
from mmbatch.cli import main
from mmbatch.dedup import signatures
from mmbatch.errors import UsageError
from mmbatch.preprocess.features.audio import decode_clip, resample
from mmbatch.ingest.run import IngestOptions, run_ingest

REPO = Path(__file__).resolve().parent.parent
HOSTILE_SECONDS, HOSTILE_RATE, HOSTILE_CHANNELS = 1800, 48000, 8
SPARSE_BYTES = 3 * 2**30
GB = 2**30


def write_silent_flac(path: Path, seconds: int, rate: int, channels: int) -> Path:
    """Silence written a minute at a time (the whole array would be 1.4 GB of int16)."""
    block = np.zeros((rate * 60, channels), np.int16)
    with sf.SoundFile(str(path), "w", rate, channels, "PCM_16", format="FLAC") as f:
        for _ in range(seconds // 60):
            f.write(block)
    return path


def write_sparse(path: Path, head: bytes, size: int) -> Path:
    """``head`` (a valid media file) followed by a hole up to ``size`` bytes."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    p = write_silent_flac(tmp_path_factory.mktemp("hostile") / "long.flac", HOSTILE_SECONDS, HOSTILE_RATE,
                          HOSTILE_CHANNELS)
    assert p.stat().st_size < 2 * 2**20
    return p


def librispeech(root: Path, hostile: Path | None, n: int = 20) -> Path:
    """LibriSpeech layout: ``n`` normal utterances, plus (when ``hostile``) 0098 = a 3 GiB sparse file
    behind a valid FLAC header and 0099 = the 30-minute 8-channel FLAC."""
    base = root / "LibriSpeech"
    d = base / "dev-clean" / "84" / "121"
    write(base / "SPEAKERS.TXT", ";ID|SEX|SUBSET|MINUTES|NAME\n84 | F | dev-clean | 8.0 | A\n")
    lines = [f"84-121-{i:04d} UTTERANCE {i}" for i in range(n)]
    for i in range(n):
        write(d / f"84-121-{i:04d}.flac", flac(seed=i))
    if hostile is not None:
        write_sparse(d / "84-121-0098.flac", flac(seed=98), SPARSE_BYTES)
        shutil.copyfile(hostile, d / "84-121-0099.flac")
        lines += ["84-121-0098 HUGE", "84-121-0099 LONG"]
    write(d / "84-121.trans.txt", "\n".join(lines) + "\n")
    return base


# --- audio: decode only what max_seconds needs --------------------------------------------------
@pytest.mark.slow
def test_hostile_flac_decodes_only_the_clip_or_is_too_long(hostile):
    data = hostile.read_bytes()
    info = media.probe_audio(data)
    assert (info.frames, info.channels) == (HOSTILE_SECONDS * HOSTILE_RATE, HOSTILE_CHANNELS)
    x = decode_clip(data, sample_rate=16000, max_seconds=30.0)
    assert x.shape == (30 * 16000,) and not x.any()
    y, sr = media.decode_audio(data, max_seconds=2.0)
    assert sr == HOSTILE_RATE and len(y) == media.clip_frames(2.0, HOSTILE_RATE) == 2 * 48000 + 2400
    with pytest.raises(media.MediaError) as e:          # no clip length: refused before a sample is read
        media.decode_audio(data)
    assert e.value.reason == "too_long" and "max_seconds" in e.value.detail
    with pytest.raises(media.MediaError, match="too_long"):
        decode_clip(data, sample_rate=16000, max_seconds=None)
    z, sr = signatures.decode_audio(data)             # dedup fingerprints the first minute only
    assert len(z) == media.clip_frames(signatures.AUDIO_MAX_SECONDS, sr)


def _old_decode_clip(data: bytes, sample_rate: int, max_seconds: float) -> np.ndarray:
    """decode_clip as it was: decode everything, then clip (the reference for bit-identity)."""
    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    x = x.mean(axis=1) if x.ndim > 1 else x
    x = resample(np.ascontiguousarray(x, np.float32)[:int(math.ceil(max_seconds * sr)) + sr // 20], sr,
                 sample_rate)
    return x[:int(round(max_seconds * sample_rate))]


def _encode(x: np.ndarray, sr: int, fmt: str, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_partial_decode_is_bit_identical_to_decoding_everything():
    rng = np.random.default_rng(0)
    t = np.arange(int(7.3 * 44100)) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.3 * rng.standard_normal(t.size)], axis=1) * 0.5
    files = [_encode(0.2 * rng.standard_normal(16000 * 5), 16000, "FLAC"),
             _encode(stereo, 44100, "WAV"),
             _encode(0.1 * rng.standard_normal((22050 * 3, 3)), 22050, "WAV", "FLOAT")]
    for data in files:
        for max_seconds in (0.5, 1.234, 2.5, 30.0):
            assert np.array_equal(decode_clip(data, 16000, max_seconds), _old_decode_clip(data, 16000, max_seconds))
    # dedup's log-mel of a clip over a minute: the first minute, as when the whole clip was decoded
    speech = _encode(0.3 * np.sin(2 * np.pi * 300 * np.arange(8000 * 65) / 8000) * rng.random(8000 * 65),
                     8000, "FLAC")
    full, sr = sf.read(io.BytesIO(speech), dtype="float32", always_2d=True)
    assert np.array_equal(signatures.audio_logmel(*signatures.decode_audio(speech)),
                          signatures.audio_logmel(full.mean(axis=1), sr))


# --- memory: a fresh process, peak RSS before and after the hostile part -----------------------
MEMORY_SCRIPT = r"""
import json, sys
from pathlib import Path

def peak():
    # VmHWM: this process's peak RSS (ru_maxrss would start at the forking pytest's RSS: Linux keeps it
    # across exec)
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

from mmbatch.dedup.signatures import decode_audio as dedup_decode
from mmbatch.preprocess.features.audio import decode_clip
from mmbatch.ingest.run import IngestOptions, ingest_shard, plan_ingest, shard_plan

mode, normal, hostile, out = sys.argv[1:5]

def decode(path):
    data = Path(path).read_bytes()
    decode_clip(data, 16000, 30.0)          # what preprocess does (features.audio.max_seconds: 30)
    dedup_decode(data)                      # what dedup does

def ingest(corpus):
    out_dir = Path(out, Path(corpus).parent.name)
    out_dir.mkdir(parents=True)
    opts = IngestOptions()
    plan, samples, _ = plan_ingest("librispeech", corpus, str(out_dir), opts)
    ctx = {"kind": "librispeech", "uri": plan.uri, "root": plan.root, "out": str(out_dir),
           "options": opts.content_options(), "info": plan.info}
    recs = [ingest_shard(t.shard_id, t.fingerprint, t.samples, ctx) for t in shard_plan(plan, samples, opts)]
    return {"rows": sum(r.rows for r in recs), "reasons": [k for r in recs for k in r.reasons]}

run = decode if mode == "decode" else ingest
normal_run = run(normal)
base = peak()
hostile_run = run(hostile)
print(json.dumps({"delta": peak() - base, "base": base, "normal": normal_run, "hostile": hostile_run}))
"""


def peak_rss_delta(mode: str, normal: Path, hostile: Path, out: Path) -> dict:
    """Run MEMORY_SCRIPT in a fresh process: the normal input first, then the hostile one."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode, str(normal), str(hostile), str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{mode}: peak RSS {got['base'] / 2**20:.0f} MiB after the normal input, "
          f"+{got['delta'] / 2**20:.1f} MiB for the hostile one")
    return got


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_memory_of_hostile_files_stays_bounded(hostile, tmp_path):
    normal_flac = tmp_path / "normal.flac"
    normal_flac.write_bytes(flac(seed=0, seconds=5.0))
    got = peak_rss_delta("decode", normal_flac, hostile, tmp_path / "decode")
    assert got["delta"] < GB
    normal = librispeech(tmp_path / "normal", None)
    bad = librispeech(tmp_path / "bad", hostile)
    assert (bad / "dev-clean/84/121/84-121-0098.flac").stat().st_size == SPARSE_BYTES
    got = peak_rss_delta("ingest", normal, bad, tmp_path / "ingest")
    assert got["delta"] < GB
    assert got["normal"] == {"rows": 20, "reasons": []}
    assert got["hostile"] == {"rows": 21, "reasons": ["too_large"]}     # the long FLAC is valid; clipped later


def test_ingest_quarantines_the_huge_file_and_keeps_the_long_one(ray_session, hostile, tmp_path):
    base = librispeech(tmp_path, hostile, n=4)
    out = tmp_path / "out"
    s = run_ingest("librispeech", str(base), str(out), IngestOptions(), echo=False)
    assert s.rows_in == s.ingested + s.quarantined == 6 and s.reasons == {"too_large": 1}
    (q,) = read_quarantine(out)
    assert q["sample_id"] == "84-121-0098" and q["reason"] == "too_large"
    assert "3072.0 MiB" in q["detail"] and "512 MiB" in q["detail"] and "--max-file-mb" in q["detail"]
    long = read_rows(out)["84-121-0099"]
    assert long["duration"] == HOSTILE_SECONDS and long["num_samples"] == HOSTILE_SECONDS * HOSTILE_RATE
    assert json.loads(long["extra"])["channels"] == HOSTILE_CHANNELS


# --- size cap, unstorable rows ------------------------------------------------------------------
def test_manifest_size_cap_and_an_unstorable_value(ray_session, tmp_path):
    root = tmp_path / "m"
    small, big = flac(seed=1, seconds=0.25), flac(seed=2, seconds=3.0)
    cap_mb = 0.03
    assert len(small) < cap_mb * 2**20 < len(big)
    write(root / "a.flac", small)
    write(root / "b.flac", big)
    write(root / "c.flac", small)
    write(root / "manifest.csv", "sample_id,audio_path,text,label\n"
                                 "a,a.flac,first,1\n"
                                 "b,b.flac,second,2\n"
                                 "c,c.flac,third,99999999999999999999\n"     # over int64: Arrow cannot store it
                                 "d,,only text,3\n")
    out = tmp_path / "out"
    s = run_ingest("manifest", str(root), str(out), IngestOptions(max_file_mb=cap_mb), echo=False)
    assert s.rows_in == s.ingested + s.quarantined == 4
    q = {r["sample_id"]: r for r in read_quarantine(out)}
    assert {k: r["reason"] for k, r in q.items()} == {"b": "too_large", "c": "unstorable_row"}
    assert q["c"]["detail"].startswith("column label:") and q["c"]["path"] == "c.flac"
    assert sorted(read_rows(out)) == ["a", "d"]
    # the default cap ingests b: the option is in the fingerprint, so the shards are read again
    s = run_ingest("manifest", str(root), str(out), IngestOptions(), echo=False)
    assert s.shards_skipped == 0 and sorted(read_rows(out)) == ["a", "b", "d"]


def test_hf_inline_and_path_values_over_the_cap(ray_session, tmp_path):
    root = tmp_path / "hf"
    small, big = flac(seed=3, seconds=0.25), flac(seed=4, seconds=3.0)
    write(root / "clips" / "big.flac", big)
    write(root / "clips" / "small.flac", small)
    audio = [{"bytes": small, "path": None}, {"bytes": big, "path": None},
             {"bytes": None, "path": "clips/big.flac"}, {"bytes": None, "path": "clips/small.flac"}]
    audio = pa.array(audio, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"audio": audio, "text": ["a", "b", "c", "d"]}), root / "train-00000-of-00001.parquet")
    out = tmp_path / "out"
    s = run_ingest("hf", str(root), str(out), IngestOptions(max_file_mb=0.03), echo=False)
    assert s.rows_in == s.ingested + s.quarantined == 4
    assert sorted((r["sample_id"], r["reason"]) for r in read_quarantine(out)) == [
        ("train-00000001", "too_large"), ("train-00000002", "too_large")]
    assert sorted(r["text"] for r in read_rows(out).values()) == ["a", "d"]


@pytest.mark.parametrize("value", ["0", "-1", "2048", "nan"])
def test_bad_max_file_mb_names_the_flag(tmp_path, capsys, value):
    write(tmp_path / "m" / "manifest.csv", "sample_id,text\na,hello\n")
    assert main(["ingest", "manifest", str(tmp_path / "m"), "--out", str(tmp_path / "out"),
                 "--max-file-mb", value]) == 2
    err = capsys.readouterr().err
    assert "--max-file-mb must be > 0 and < 2048" in err and value in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="max-file-mb"):
        IngestOptions(max_file_mb=4096).validate()


# --- conversions: text size, tool timeouts --------------------------------------------------------
def test_render_text_refuses_pages_too_tall():
    from mmbatch.convert.text_to_image import MAX_CHARS, MAX_HEIGHT, render_text, text_to_image

    ok = render_text("word " * 2000)                  # ~250 lines: fits
    assert ok.shape[1] == 800 and ok.shape[0] <= MAX_HEIGHT and (ok < 128).any()
    with pytest.raises(ValueError, match=f"at most {MAX_HEIGHT} px"):
        render_text("a" + "\n" * 1000 + "b")          # blank lines count
    with pytest.raises(ValueError, match=f"at most {MAX_CHARS}"):
        text_to_image("x" + "\n" * 400_000)            # the review's 400 KB of newlines: 19 GB asked
    assert render_text("a\nb", max_height=200).shape == (2 * 24 + 2 * 40, 800, 3)
    with pytest.raises(ValueError, match="a page 168 px high"):
        render_text("a\nb\nc", max_height=160)


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract not installed")
def test_tesseract_timeout_is_a_clear_error():
    from mmbatch.convert.image_to_text import ocr_image
    from mmbatch.convert.text_to_image import render_text

    page = render_text("THE QUICK BROWN FOX")
    with pytest.raises(RuntimeError, match=r"tesseract took longer than 0.001 s on a \d+x\d+ page"):
        ocr_image(page, timeout=0.001)
    assert "QUICK" in ocr_image(page)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_espeak_timeout_is_a_clear_error():
    from mmbatch.convert.text_to_speech import synthesize

    with pytest.raises(RuntimeError, match="espeak-ng took longer than 0.001 s"):
        synthesize("hello " * 200, timeout=0.001)
