"""`mmbatch submit` against a real Ray head started here, with token authentication on.

The head is a separate `ray start --head --block` process with its own ports,
temp dir, HOME and token file, so it neither touches ~/.ray nor collides with
the session Ray of conftest.py (this file does not use ``ray_session``). It is
stopped by signalling its own process (then its process group), never `ray stop`.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmbatch.ops import submit as sub
from mmbatch.ops.submit import (
    AuthToken,
    SubmitError,
    build_entrypoint,
    build_runtime_env,
    exit_code_for,
    local_paths_not_uploaded,
    redact,
    resolve_address,
    resolve_token,
    submit_cli,
)

AUTH_VARS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


# --- pure helpers ----------------------------------------------------------------------------
def test_resolve_token_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    f = tmp_path / "tok"
    f.write_text("  from-file \n")
    assert resolve_token({}, home=home) == AuthToken("from-home", str(home / ".ray" / "auth_token"))
    assert resolve_token({"RAY_AUTH_TOKEN_PATH": str(f)}, home=home).value == "from-file"
    t = resolve_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(f)}, home=home)
    assert (t.value, t.source) == ("from-env", "$RAY_AUTH_TOKEN")
    assert resolve_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}, home=home) is None
    assert resolve_token({}, home=tmp_path / "nohome") is None
    with pytest.raises(SubmitError, match="cannot be read"):
        resolve_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=home)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SubmitError, match="is empty"):
        resolve_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, home=home)


def test_token_never_shows_in_repr_or_redacted_text():
    t = AuthToken("s3cr3t-value", "$RAY_AUTH_TOKEN")
    assert "s3cr3t" not in repr(t) and "s3cr3t" not in str(t)
    assert t.header() == {"Authorization": "Bearer s3cr3t-value"}
    assert redact("bad Bearer s3cr3t-value!", t) == "bad Bearer <redacted-token>!"
    assert redact("text", None) == "text"


def test_entrypoint_runtime_env_address_and_exit_codes(tmp_path, monkeypatch):
    assert build_entrypoint(["preprocess", "wf.yaml", "--set", "output.path=a b"]) == \
        "python -m mmbatch.cli preprocess wf.yaml --set 'output.path=a b'"
    assert build_entrypoint(["inspect", "x; rm -rf /"]).endswith("'x; rm -rf /'")
    with pytest.raises(SubmitError, match="nothing to submit"):
        build_entrypoint([])
    with pytest.raises(SubmitError, match="subcommand only"):
        build_entrypoint(["mmbatch", "preprocess"])
    assert build_runtime_env() is None
    env = build_runtime_env(str(tmp_path), ["mmbatch==0.1.0"])
    assert env["working_dir"] == str(tmp_path) and env["pip"] == ["mmbatch==0.1.0"] and ".git" in env["excludes"]
    assert build_runtime_env("s3://bucket/pkg.zip") == {"working_dir": "s3://bucket/pkg.zip"}
    with pytest.raises(SubmitError, match="no such folder"):
        build_runtime_env(str(tmp_path / "missing"))
    assert resolve_address(None, {}) == "http://127.0.0.1:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:8265/"}) == "http://10.0.0.1:8265"
    assert resolve_address("https://ray.example:443", {"RAY_ADDRESS": "x"}) == "https://ray.example:443"
    assert exit_code_for("SUCCEEDED", 0) == 0
    assert exit_code_for("FAILED", 3) == 3 and exit_code_for("FAILED", 2) == 2
    assert exit_code_for("FAILED", 137) == 1 and exit_code_for("STOPPED", None) == 1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wf.yaml").write_text("name: x\n")
    assert local_paths_not_uploaded(["preprocess", "wf.yaml", "--set", "a=b"], None) == ["wf.yaml"]
    assert local_paths_not_uploaded(["preprocess", "wf.yaml"], ".") == []


def test_unreachable_dashboard_gives_a_clear_message(monkeypatch, capsys):
    for k in AUTH_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-unreachable-123")
    port = _free_ports(1)[0]
    rc = submit_cli(["inspect", "x"], address=f"http://127.0.0.1:{port}")
    err = capsys.readouterr().err
    assert rc == 1 and "cannot reach the Ray dashboard" in err and "ray dashboard cluster.yaml" in err
    assert "tok-unreachable-123" not in err


# --- a real head with token authentication ----------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Head:
    address: str
    token: str
    token_file: Path
    home: Path
    proc: subprocess.Popen


def _stop(proc: subprocess.Popen) -> None:
    """Stop our head only: SIGTERM to `ray start --block` (it shuts its children down), then the group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)                   # stragglers of our own process group
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


@pytest.fixture(scope="module")
def ray_head():
    tmp = Path(tempfile.mkdtemp(prefix="mmr", dir="/tmp"))  # short: Ray's unix socket paths
    home = tmp / "home"
    home.mkdir()
    token = secrets.token_hex(24)
    token_file = tmp / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    (gcs, dash, nm, om, client, agent, agent_grpc, rte, metrics) = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
               RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",   # fast teardown
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={tmp}/r",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={rte}", f"--metrics-export-port={metrics}",
           "--object-store-memory=200000000", "--disable-usage-stats"]
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ray start failed:\n" + (tmp / "head.log").read_text()[-3000:])
            try:
                urllib.request.urlopen(address + "/api/version", timeout=2)
                raise RuntimeError("the head answered without a token: token auth is not on")
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                raise RuntimeError("dashboard did not come up:\n" + (tmp / "head.log").read_text()[-3000:])
            time.sleep(0.5)
        yield Head(address, token, token_file, home, proc)
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def with_token(ray_head, monkeypatch):
    """This process configured like a laptop that has the cluster token in a file."""
    for k in AUTH_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head.token_file))
    return ray_head


def _client(head: Head):
    from ray.job_submission import JobSubmissionClient
    return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})


def _wait_terminal(head: Head, job_id: str, timeout: float = 180):
    client = _client(head)
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish")


def _cli_env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(HOME=str(home), **extra)
    return env


@pytest.mark.slow
def test_submission_without_token_is_refused_clearly(ray_head, tmp_path):
    """A laptop with no token anywhere: refused, told what to do, and no token in sight."""
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    p = subprocess.run([sys.executable, "-m", "mmbatch.cli", "submit", "--address", ray_head.address,
                        "--", "inspect", "/tmp"], env=_cli_env(empty_home), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, p.stderr
    assert "has token authentication on and no token was found" in p.stderr
    assert "RAY_AUTH_TOKEN" in p.stderr and "ray get-auth-token" in p.stderr
    assert "Traceback" not in p.stderr
    assert ray_head.token not in p.stdout + p.stderr


def test_submission_with_wrong_token_is_refused_without_echoing_it(ray_head, monkeypatch, capsys):
    for k in AUTH_VARS:
        monkeypatch.delenv(k, raising=False)
    wrong = "wrong-" + secrets.token_hex(8)
    monkeypatch.setenv("RAY_AUTH_TOKEN", wrong)
    rc = submit_cli(["inspect", "/tmp"], address=ray_head.address)
    out, err = capsys.readouterr()
    assert rc == 1
    assert "rejected the token from $RAY_AUTH_TOKEN" in err
    assert wrong not in out + err and ray_head.token not in out + err


@pytest.mark.slow
def test_submit_uploads_working_dir_and_streams_logs(with_token, tmp_path, capsys, caplog):
    import logging
    caplog.set_level(logging.DEBUG)                            # Ray's client logs too: no token there
    wd = tmp_path / "wd"
    (wd / "data").mkdir(parents=True)
    pq.write_table(pa.table({"sample_id": [f"s{i}" for i in range(7)], "split": ["train"] * 5 + ["test"] * 2}),
                   wd / "data" / "part-0.parquet")
    rc = submit_cli(["inspect", "data", "--json"], address=with_token.address, wait=True, working_dir=str(wd))
    out, err = capsys.readouterr()
    assert rc == 0, err
    job_id = out.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    info = json.loads(out[out.index("{"):out.rindex("}") + 1])   # the job's stdout, streamed back
    assert info["rows"] == 7 and info["counts"]["split"] == {"test": 2, "train": 5}
    assert f"job {job_id} SUCCEEDED" in err
    assert with_token.token not in out + err + caplog.text
    assert sub.resolve_token().value == with_token.token      # it was configured, just never shown


def test_submit_without_wait_prints_id_and_follow_command(with_token, capsys):
    job_id = f"mmbatch-test-{uuid.uuid4().hex[:8]}"
    rc = submit_cli(["--help"], address=with_token.address, job_id=job_id)
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip() == job_id
    assert f"RAY_AUTH_MODE=token ray job logs --follow {job_id} --address {with_token.address}" in err
    assert f"ray job stop {job_id}" in err
    info = _wait_terminal(with_token, job_id)
    assert info.status == "SUCCEEDED" and info.entrypoint == "python -m mmbatch.cli --help"
    assert info.metadata["tool"] == "mmbatch"


@pytest.mark.slow
def test_failed_job_keeps_mmbatchs_exit_code(with_token, capsys):
    rc = submit_cli(["inspect", "/nonexistent/mmbatch-nothing-here"], address=with_token.address, wait=True)
    out, err = capsys.readouterr()
    assert rc == 2                                             # UsageError in the job -> 2, not just "failed"
    assert "does not exist" in out and "FAILED (exit code 2)" in err


@pytest.mark.slow
def test_submit_ingest_imagenet_runs_on_the_cluster(ray_head, tmp_path):
    """The real path: `mmbatch submit --wait -- ingest imagenet ...` as a user runs it, token from a file."""
    from mmbatch.demo.corpus import write_imagenet

    corpus = write_imagenet(tmp_path / "corpus", per_class=3)
    out_dir = tmp_path / "canonical"
    p = subprocess.run([sys.executable, "-m", "mmbatch.cli", "submit", "--address", ray_head.address, "--wait",
                        "--", "ingest", "imagenet", str(corpus), "--out", str(out_dir)],
                       env=_cli_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(ray_head.token_file)),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "SUCCEEDED" in p.stderr
    assert ray_head.token not in p.stdout + p.stderr
    assert (out_dir / "_manifest.json").exists()
    from mmbatch.ops.describe import describe
    info = describe(str(out_dir))
    assert info["rows"] == 3 * 4                               # 4 classes x 3 images
    assert info["counts"]["split"] == {"train": 8, "validation": 4}

