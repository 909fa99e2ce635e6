"""Ctrl-C during a long command: one clear line, exit 130 within 5 s, no Ray process left, rerun resumes.

The real ``mmbatch preprocess`` runs as a subprocess in its own session; the test waits until the
first shard is committed, then sends SIGINT to the whole process group, as a terminal's Ctrl-C does
(Ray's daemons and workers are in that group too). Before the fix the command took ~60 s to stop,
exited 1 and left Ray processes behind.
"""
from __future__ import annotations

import fcntl
import os
import pty
import re
import shlex
import threading
import signal
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import mmbatch
from mmbatch.demo.corpus import write_imagenet
from mmbatch.ingest.run import IngestOptions, run_ingest

PACKAGE_ROOT = Path(mmbatch.__file__).resolve().parents[1]
MMBATCH_SCRIPT = Path(sys.executable).parent / "mmbatch"
INTERRUPTED_LINE = re.compile(r"interrupted; (\d+) units? committed, rerun the same command to resume")


def ray_processes(session_id: int, ray_tmp: str) -> list[str]:
    """Processes of that session, or mentioning that Ray temp folder (raylet, gcs_server, workers...)."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    found = []
    for line in ps.splitlines():
        pid, sid, args = line.split(None, 2) if len(line.split(None, 2)) == 3 else (*line.split(None, 1), "")
        if int(pid) == os.getpid() or "ps -eo" in args:
            continue
        if int(sid) == session_id or ray_tmp in args:
            found.append(line.strip())
    return found


def committed_markers(out: Path) -> list[Path]:
    return sorted(out.rglob("_shards/*.json"))


def fused_rows(out: Path) -> dict:
    rows = {}
    for f in sorted(out.glob("*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows[r["sample_id"]] = r
    return rows


@pytest.fixture(scope="module")
def workflow_env(ray_session, tmp_path_factory):
    base = tmp_path_factory.mktemp("interrupt")
    corpus = write_imagenet(base / "corpus", per_class=40)
    canonical = base / "canonical"
    run_ingest("imagenet", str(corpus), str(canonical), IngestOptions(shard_rows=4), echo=False)

    def workflow(out: Path) -> Path:
        wf = base / f"{out.name}.yaml"
        wf.write_text(yaml.safe_dump({
            "datasets": [{"name": "images", "path": str(canonical)}],
            "features": {"image": {"extractor": "hog", "size": 128}},
            "output": {"path": str(out)}, "ray": {"num_cpus": 2}}))
        return wf
    return base, workflow


def start(args: list[str], ray_tmp: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
    return subprocess.Popen([str(MMBATCH_SCRIPT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.mark.slow
def test_ctrl_c_during_preprocess_stops_fast_and_a_rerun_resumes(workflow_env):
    base, workflow = workflow_env
    out = base / "features"
    wf = workflow(out)
    ray_tmp = tempfile.mkdtemp(prefix="rayint", dir="/tmp")      # short: Ray's socket paths must fit 107 bytes

    proc = start(["preprocess", str(wf)], ray_tmp)
    deadline = time.time() + 240
    while not committed_markers(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "preprocess finished before it could be interrupted: make the corpus bigger"
    assert committed_markers(out), "no shard was committed within 240 s"

    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)                 # what Ctrl-C in a terminal does
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped_s = time.time() - t0
    assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
    print(f"stopped {stopped_s:.2f} s after SIGINT, exit {proc.returncode}")
    assert stopped_s <= 5.0, f"took {stopped_s:.1f} s to stop"
    lines = [ln for ln in stderr.splitlines() if INTERRUPTED_LINE.search(ln)]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    n_committed = len(committed_markers(out))
    assert n_committed >= 1
    # the count in the line is what the driver committed: every marker on disk, no more
    assert int(INTERRUPTED_LINE.search(lines[0]).group(1)) == n_committed, (lines[0], n_committed)

    time.sleep(5)
    left = ray_processes(proc.pid, ray_tmp)
    assert not left, "processes left 5 s after the interrupt:\n" + "\n".join(left)

    # the same command again completes the job, and gives what an undisturbed run gives
    rerun = start(["preprocess", str(wf)], ray_tmp)
    r_out, r_err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, r_err[-3000:]
    assert re.search(r"units: \d+ processed, [1-9]\d* already committed", r_out), r_out[-2000:]
    reference_out = base / "reference"
    ref = start(["preprocess", str(workflow(reference_out))], ray_tmp)
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]
    resumed, undisturbed = fused_rows(out), fused_rows(reference_out)
    assert sorted(resumed) == sorted(undisturbed) and len(resumed) == 160
    for sid, row in undisturbed.items():
        assert resumed[sid]["fused"] == row["fused"] and resumed[sid]["label"] == row["label"]


def drain(fd: int, into: list) -> None:
    """Read a pty's master side (what a terminal shows) until it closes."""
    try:
        while chunk := os.read(fd, 4096):
            into.append(chunk)
    except OSError:
        pass


def interrupt_a_pipeline(workflow, out: Path, tmp_path: Path, redirect: str, **popen) -> tuple[list, str]:
    """Run ``mmbatch preprocess WF REDIRECT | tee log`` in bash on a pty (``popen`` says how the pty is
    attached), Ctrl-C the process group once a unit is committed; returns (the exit codes of mmbatch and
    tee, what the terminal showed). Also asserts that no Ray process is left 5 s later."""
    ray_tmp = tempfile.mkdtemp(prefix="raypipe", dir="/tmp")
    rc = tmp_path / "rc"
    pipeline = (f"{shlex.quote(str(MMBATCH_SCRIPT))} preprocess {shlex.quote(str(workflow(out)))} {redirect}"
                f"| tee {shlex.quote(str(tmp_path / 'log'))} >/dev/null; "
                f"echo ${{PIPESTATUS[0]}} ${{PIPESTATUS[1]}} >{shlex.quote(str(rc))}")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
    master, tty = pty.openpty()
    shell = subprocess.Popen(["bash", "-c", pipeline], env=env, stdin=tty,
                             **{k: (tty if v == "tty" else v) for k, v in popen.items()})
    os.close(tty)
    screen: list = []
    threading.Thread(target=drain, args=(master, screen), daemon=True).start()
    deadline = time.time() + 240
    while not committed_markers(out) and shell.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert shell.poll() is None and committed_markers(out), "no unit committed while the job ran"

    os.killpg(shell.pid, signal.SIGINT)          # Ctrl-C: the driver, its Ray, and tee, which dies at once
    try:
        shell.wait(timeout=60)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
    time.sleep(6)
    left = ray_processes(shell.pid, ray_tmp)
    assert not left, "processes left 5 s after the interrupt:\n" + "\n".join(left)
    return rc.read_text().split(), b"".join(screen).decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.slow
def test_ctrl_c_with_stdout_to_a_pipe_exits_130_and_leaves_no_ray(workflow_env, tmp_path):
    """`mmbatch preprocess wf | tee log`, then Ctrl-C: the terminal's SIGINT reaches tee too, so the
    driver's stdout is a pipe with no reader. Exit 130, the line on stderr, no Ray process left."""
    base, workflow = workflow_env
    # a shell pipeline in its own session: bash, mmbatch and tee share its process group, as in a terminal
    codes, stderr = interrupt_a_pipeline(workflow, tmp_path / "piped", tmp_path, "", start_new_session=True,
                                         stderr="tty")
    assert codes[1] == str(128 + signal.SIGINT), codes          # tee died of the Ctrl-C: a pipe without reader
    assert codes[0] == "130", (codes, stderr[-3000:])
    assert len([ln for ln in stderr.splitlines() if INTERRUPTED_LINE.search(ln)]) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]


def _controlling_terminal() -> None:
    """In the child: a new session whose controlling terminal is stdin (the pty), as a login shell has."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.slow
def test_ctrl_c_with_stdout_and_stderr_to_a_pipe_exits_130_and_tells_the_terminal(workflow_env, tmp_path):
    """`mmbatch preprocess wf 2>&1 | tee log`, then Ctrl-C: tee dies, so the interrupted line written to
    stderr hits a pipe without reader (EPIPE). It used to exit 1 with a BrokenPipeError and the line was lost;
    now exit 130 and the line reaches the terminal (/dev/tty), once."""
    base, workflow = workflow_env
    codes, terminal = interrupt_a_pipeline(workflow, tmp_path / "piped2", tmp_path, "2>&1 ",
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           preexec_fn=_controlling_terminal)
    assert codes[1] == str(128 + signal.SIGINT), codes          # tee died of the Ctrl-C: a pipe without reader
    assert codes[0] == "130", (codes, terminal[-3000:])
    assert len([ln for ln in terminal.splitlines() if INTERRUPTED_LINE.search(ln)]) == 1, terminal[-3000:]
    assert "Traceback" not in terminal and "BrokenPipeError" not in terminal, terminal[-3000:]
