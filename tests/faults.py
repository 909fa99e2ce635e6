"""Helpers for the reliability tests: killing things, watching outputs, hostile media bytes."""
from __future__ import annotations

import io
import os
import re
import signal
import struct
import subprocess
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TAG_ENV = "MMBATCH_RELIABILITY_TAG"      # set on a subprocess; every process it starts inherits it
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


# --- output folders ------------------------------------------------------------------------
def visible_parquet(root: Path) -> list[Path]:
    """Parquet files a reader may see: none of their folders (below ``root``) starts with ``_``."""
    out = []
    for p in Path(root).rglob("*.parquet"):
        rel = p.relative_to(root).parts
        if not any(part.startswith(("_", ".")) for part in rel):
            out.append(p)
    return sorted(out)


def committed_parquet(root: Path) -> list[Path]:
    """Every Parquet file outside a ``_tmp`` folder (staged pieces and committed features included)."""
    return sorted(p for p in Path(root).rglob("*.parquet") if "_tmp" not in p.relative_to(root).parts)


def read_tables(root: Path) -> dict[str, pa.Table]:
    """{file name: table} of the committed data files directly under ``root``."""
    return {p.name: pq.read_table(p) for p in sorted(Path(root).glob("*.parquet")) if not p.name.startswith("_")}


def assert_same_output(got: Path, want: Path) -> None:
    a, b = read_tables(got), read_tables(want)
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for name in a:
        assert a[name].equals(b[name]), f"{name} differs from the undisturbed run"


class ReadableWatcher(threading.Thread):
    """Polls ``root`` while a job runs: every Parquet file that ``files(root)`` lists must read whole.

    A file that vanishes between listing and reading (a commit removing staged pieces) is fine; one
    that exists but does not parse is a partial file visible to readers, which the protocol forbids.
    """

    def __init__(self, root: Path, files=committed_parquet, interval: float = 0.02):
        super().__init__(daemon=True)
        self.root, self.files, self.interval = Path(root), files, interval
        self.checked: set[str] = set()
        self.bad: list[str] = []
        self._seen: set[tuple] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.scan()
            time.sleep(self.interval)
        self.scan()

    def scan(self) -> None:
        try:
            paths = self.files(self.root) if self.root.exists() else []
        except FileNotFoundError:   # a folder removed while walking
            return
        for p in paths:
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns)   # committed files never change in place
            if key in self._seen:
                continue
            try:
                pq.read_table(p)
                self._seen.add(key)
                self.checked.add(str(p.relative_to(self.root)))
            except Exception as e:  # noqa: BLE001 - any read failure of a still-present file is a finding
                if p.exists():
                    self.bad.append(f"{p}: {type(e).__name__}: {e}")

    def stop(self) -> "ReadableWatcher":
        self._halt.set()
        self.join(timeout=30)
        return self


# --- processes -------------------------------------------------------------------------------
def tagged_pids(tag: str) -> list[int]:
    """Live processes (any state but zombie) whose environment carries ``TAG_ENV=tag``."""
    needle = f"{TAG_ENV}={tag}".encode()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            pids.append(int(d))
    return pids


def child_pids(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def mmbatch_exe() -> list[str]:
    """The `mmbatch` command of this interpreter's environment (or `python -m mmbatch.cli`)."""
    import sys

    exe = Path(sys.executable).with_name("mmbatch")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mmbatch.cli"]


def private_ray_tmpdir() -> str:
    """A short private RAY_TMPDIR (unix socket paths must stay < 108 bytes).

    Subprocess Rays keep their sessions, and above all their ``ray_current_cluster`` file
    (``ray.cluster_utils.Cluster`` writes one), out of the shared /tmp/ray: a ``ray.init()``
    elsewhere on the machine would otherwise attach to our, possibly dead, cluster.
    """
    import tempfile

    return tempfile.mkdtemp(prefix="mmrel-", dir="/tmp")


def subprocess_env(tag: str | None = None, **extra: str) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", RAY_DEDUP_LOGS="0", **extra)
    env.pop("RAY_ADDRESS", None)          # the subprocess starts its own Ray
    if "RAY_TMPDIR" not in env:
        env["RAY_TMPDIR"] = private_ray_tmpdir()
    if tag:
        env[TAG_ENV] = tag
    return env


def kill_when(cmd: list[str], ready, log: Path, timeout: float = 300, tag: str | None = None, **env: str) -> dict:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` returns something truthy; reap leftovers.

    Returns {"killed": bool, "rc": ..., "ready": what ready() returned, "processes": how many processes
    carried the tag at the kill, "leftover": the killed job's processes (its embedded Ray) other than Ray's
    agents still alive 30 s after the kill (SIGKILLed then), "agents_reaped": agents SIGKILLed}.
    """
    tag = tag or uuid.uuid4().hex
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=subprocess_env(tag, **env))
        t0, got, n_tagged = time.time(), None, 0
        try:
            while proc.poll() is None and time.time() - t0 < timeout:
                got = ready()
                if got:
                    n_tagged = len(tagged_pids(tag))
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.01)
        finally:
            if proc.poll() is None and not got:
                proc.kill()
            rc = proc.wait(timeout=60)
    # Everything the job started must die with it: Ray fate-shares gcs/raylet with the driver
    # (PR_SET_PDEATHSIG) and workers exit when their raylet goes. Ray's per-node agents
    # (DashboardAgent, RuntimeEnvAgent) notice too but first try to report to the dead GCS,
    # which takes them about a minute: they are reaped here and reported apart.
    leftover: list[int] = []
    deadline = time.time() + 30
    while time.time() < deadline:
        leftover = [p for p in tagged_pids(tag) if not cmdline(p).startswith(RAY_AGENTS)]
        if not leftover:
            break
        time.sleep(0.5)
    leftover_cmds = [f"{pid}: {cmdline(pid)[:200].strip()}" for pid in leftover]
    agents = [pid for pid in tagged_pids(tag) if pid not in leftover]
    for pid in leftover + agents:         # processes this test started: never leave them running
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"killed": bool(got), "rc": rc, "ready": got, "processes": n_tagged, "leftover": leftover_cmds,
            "agents_reaped": len(agents)}


def run_cmd(cmd: list[str], timeout: float = 400, **env) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion; afterwards SIGKILL anything it started that is still alive (a Ray it
    failed to stop on a timeout or an error, Ray's slow-exiting agents)."""
    tag = uuid.uuid4().hex
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(tag, **env))
    finally:
        for pid in tagged_pids(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- hostile media bytes ----------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, idat: bytes) -> bytes:
    """A PNG with a valid 8-bit RGB header declaring width x height and the given IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_bytes(arr: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def cmyk_jpeg(seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(48, 64, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="CMYK").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def wav_bytes(x: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def summary_counts(text: str) -> dict:
    """Counts from a printed preprocess/ingest summary."""
    out = {}
    m = re.search(r"units: (\d+) processed, (\d+) already committed", text)
    if m:
        out["processed"], out["skipped"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"shards (\d+) \((\d+) already committed, skipped\)", text)
    if m:
        out["total"], out["skipped"] = int(m.group(1)), int(m.group(2))
    return out
