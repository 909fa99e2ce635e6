"""The registry lock on S3 under faults: a real moto server on loopback, with a WSGI layer in front of it
that answers chosen requests with 503 or holds them back (a flaky or stalled network, seen from the
client exactly as a real one: botocore's own retries are off, so each 503 reaches mmbatch).

Nothing in mmbatch is patched: the faults are HTTP responses.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmbatch.engine import storage
from mmbatch.engine.commit import call_with_retry
from mmbatch.errors import LockLost
from mmbatch.ops.registry import Registry, RegistryLocked

BUCKET = "mmbatch-lock-test"


@dataclass
class Rule:
    """Requests whose method is ``method`` and whose path + query contains ``part``: the next ``times``
    of them get a 503, or, with ``hold``, wait until that event is set and then go through."""
    method: str
    part: str
    times: float = math.inf
    hold: threading.Event | None = None
    skip_header: str = ""                 # requests carrying this header are left alone
    hits: int = 0


class Faults:
    """WSGI middleware on the moto server."""

    def __init__(self):
        self.rules: list[Rule] = []
        self._mutex = threading.Lock()

    def add(self, rule: Rule) -> Rule:
        with self._mutex:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._mutex:
            self.rules.clear()

    def _match(self, environ) -> Rule | None:
        target = environ.get("PATH_INFO", "") + "?" + environ.get("QUERY_STRING", "")
        with self._mutex:
            for r in self.rules:
                if (r.hits < r.times and environ["REQUEST_METHOD"] == r.method and r.part in target
                        and not (r.skip_header and environ.get(r.skip_header))):
                    r.hits += 1
                    return r
        return None

    def wrap(self, app):
        def faulty(environ, start_response):
            rule = self._match(environ)
            if rule is not None and rule.hold is not None:
                rule.hold.wait(30)
            elif rule is not None:
                n = int(environ.get("CONTENT_LENGTH") or 0)
                if n:
                    environ["wsgi.input"].read(n)            # the connection stays usable
                start_response("503 Service Unavailable", [("Content-Type", "application/xml")])
                return [b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                        b"<Message>injected by the test</Message></Error>"]
            return app(environ, start_response)
        return faulty


@pytest.fixture(scope="module")
def server():
    """(moto endpoint, fault layer, s3fs options) for the module; fsspec's s3 defaults point at it."""
    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    faults = Faults()
    srv._server.app = faults.wrap(srv._server.app)
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "lock-test", "secret": "lock-test",
            "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fsspec.config.conf, "s3", opts)
        mp.setattr(storage, "_OPTIONS", {})      # a workflow's storage options set by an earlier test module
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield f"http://127.0.0.1:{port}", faults, opts
    srv.stop()


@pytest.fixture
def uri(server):
    _, faults, _ = server
    faults.clear()
    yield f"s3://{BUCKET}/reg-{uuid.uuid4().hex[:8]}"
    faults.clear()


def _model(tmp_path: Path, tag: str, files: int = 3) -> Path:
    d = tmp_path / f"model-{tag}"
    d.mkdir()
    for i in range(files):
        (d / f"part{i}.bin").write_bytes(f"{tag}-{i}".encode() * 100)
    return d


def _model_bytes(reg: Registry, version: str) -> dict[str, bytes]:
    mv = reg.get(version)
    root = mv.model_uri.removeprefix("s3://")
    reg.fs.invalidate_cache()
    return {p.rsplit("/", 1)[1]: reg.fs.cat_file(p) for p in reg.fs.find(root)}


def _lock_bytes(reg: Registry, gen: int) -> bytes:
    """A lock object's bytes. Retried: moto (not S3) may answer 500 to a GET that races an overwrite of the
    same key, which the heartbeat does; mmbatch's own reads are retried the same way."""
    return call_with_retry(lambda: reg.fs.cat_file(reg._lock_path(gen)), f"reading lock {gen}")


def _lock_info(reg: Registry, gen: int) -> dict:
    return json.loads(_lock_bytes(reg, gen))


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# --- the heartbeat ------------------------------------------------------------------------------------------
def test_heartbeat_survives_a_burst_of_503s_and_keeps_the_lock(uri, server, tmp_path, caplog):
    """Five refreshes in a row get a 503: a whole beat fails (four tries), the next beat's first try too.
    The heartbeat goes on, so a waiter polling for longer than stale_after never finds the lock stale."""
    _, faults, _ = server
    a, b = Registry(uri, stale_after=4.0), Registry(uri, stale_after=4.0)
    with a.lock(timeout=0):
        gen = a._lock_generations()[-1]
        t_burst = time.time()
        burst = faults.add(Rule("PUT", f"_locks/{gen:010d}.json", times=5, skip_header="HTTP_IF_NONE_MATCH"))
        with pytest.raises(RegistryLocked, match="is locked by"):
            with b.lock(timeout=5.0):                          # polls for longer than stale_after
                pass
        assert burst.hits == 5, "the 503s never fired"
        assert "could not refresh it" in caplog.text           # a beat failed, and the heartbeat went on
        assert _lock_info(a, gen)["refreshed"] > t_burst      # a refresh went through after the 5 failures
        assert a.register(str(_model(tmp_path, "a")), {"accuracy": 0.5}) == "v0001"   # still a's lock
        assert a._lock_generations() == [gen]
    with b.lock(timeout=0):
        pass


# --- a holder whose lock was broken ---------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import json, sys
    import fsspec
    fsspec.config.conf["s3"] = json.loads(sys.argv[1])
    from mmbatch.ops.registry import Registry
    r = Registry(sys.argv[2], stale_after=1.0)
    with r.lock(timeout=10):
        print("locked", flush=True)
        sys.stdin.readline()
        print(r.register(sys.argv[3], {"accuracy": 0.5}), flush=True)
""")


@pytest.mark.slow
def test_a_holder_stalled_past_stale_after_refuses_to_write(uri, server, tmp_path):
    """A holder process is stopped (SIGSTOP) past stale_after; another writer takes the lock. Woken up, the
    holder tries to register: it stops with LockLost before writing anything, and leaves the new lock alone."""
    _, _, opts = server
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(opts), uri, str(_model(tmp_path, "a"))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGSTOP)
        b = Registry(uri, stale_after=10.0)
        with b.lock(timeout=10):                               # waits until the stopped holder's lock is stale (1 s)
            mine = b._lock_generations()[-1]
            lock_bytes = _lock_bytes(b, mine)
            os.kill(holder.pid, signal.SIGCONT)
            out, err = holder.communicate("go\n", timeout=60)
            assert holder.returncode == 1 and out == ""
            last = err.strip().splitlines()[-1]
            assert last.startswith("mmbatch.errors.LockLost: registry s3://") and "taken over" in last, err
            assert "stopped before creating v0001" in last
            assert b._names(b._p("versions")) == []             # nothing written
            assert b._lock_generations()[-1] == mine and not _lock_info(b, mine).get("released")
            with pytest.raises(RegistryLocked):                 # b's lock is intact
                with Registry(uri).lock(timeout=0.2):
                    pass
            assert b.register(str(_model(tmp_path, "b")), {"accuracy": 0.6}) == "v0001"
            assert _lock_info(b, mine)["owner"] == json.loads(lock_bytes)["owner"]
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.wait()
    assert [m.version for m in b.list()] == ["v0001"]
    assert set(_model_bytes(b, "v0001").values()) == {f"b-{i}".encode() * 100 for i in range(3)}


# --- release and breaking ---------------------------------------------------------------------------------------
def test_release_never_touches_the_lock_of_the_writer_that_took_over(uri, server, tmp_path):
    """a cannot refresh (every refresh PUT gets a 503: a network partition); b takes the lock over; a's release
    leaves b's lock as it was: b still holds it, a third writer is refused."""
    _, faults, _ = server
    a, b, c = Registry(uri, stale_after=1.0), Registry(uri, stale_after=10.0), Registry(uri, stale_after=10.0)
    a_lock = a.lock(timeout=0)
    a_lock.__enter__()
    gen = a._lock_generations()[-1]
    cut = faults.add(Rule("PUT", f"_locks/{gen:010d}.json"))
    with b.lock(timeout=10):
        assert b._lock_generations()[-1] == gen + 1
        assert cut.hits > 0, "a's refreshes never failed"
        with pytest.raises(LockLost, match="taken over by another writer.*stopped before creating v0001"):
            a.register(str(_model(tmp_path, "a")), {"accuracy": 0.5})
        assert b._names(b._p("versions")) == []
        assert b.register(str(_model(tmp_path, "b")), {"accuracy": 0.5}) == "v0001"
        with pytest.raises(LockLost, match="stopped before promoting v0001"):
            a.promote("v0001")
        faults.clear()
        taken = _lock_bytes(b, gen + 1)
        a_lock.__exit__(None, None, None)                       # a leaves its with-block: its release
        assert _lock_bytes(b, gen + 1) == taken and not json.loads(taken).get("released")
        with pytest.raises(RegistryLocked, match="is locked by"):
            with c.lock(timeout=0.3):
                pass
        b.promote("v0001")
    assert c.champion().version == "v0001" and [e["event"] for e in c.history()] == ["register", "promote"]


def test_writers_breaking_one_stale_lock_together_exactly_one_gets_it(uri, server):
    """A dead writer's lock, stale; four writers break it at the same instant: one holds the lock, the
    others are refused, and no one deletes the winner's lock."""
    probe = Registry(uri, stale_after=10.0)
    probe.fs.pipe_file(probe._lock_path(7), json.dumps({"owner": "dead", "pid": 1, "host": "gone", "created": 0,
                                                        "refreshed": time.time() - 100}).encode())
    start, results = threading.Barrier(4), []

    def race():
        r = Registry(uri, stale_after=10.0)
        start.wait()
        try:
            with r.lock(timeout=0):
                results.append(("held", r._held.gen))
                _wait(lambda: len(results) == 4, 30)           # the others try while it is held
        except RegistryLocked:
            results.append(("refused", None))

    threads = [threading.Thread(target=race) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [("held", 8)] + [("refused", None)] * 3
    assert probe._lock_generations() == [8] and _lock_info(probe, 8)["released"]


# --- versions --------------------------------------------------------------------------------------------------
def test_a_stalled_writer_and_the_one_that_took_over_never_write_the_same_version(uri, server, tmp_path):
    """a checks its lock, then its claim of v0001 stalls in the network; its lock goes stale, b takes it and
    registers v0001. When a's claim arrives, the server refuses it (put-if-absent): a stops with LockLost and
    never writes into b's v0001."""
    _, faults, _ = server
    a, b = Registry(uri, stale_after=1.0), Registry(uri, stale_after=10.0)
    faults.add(Rule("PUT", "_locks/0000000001.json", skip_header="HTTP_IF_NONE_MATCH"))   # a cannot refresh
    go = threading.Event()
    stalled = faults.add(Rule("PUT", "versions/v0001/_writer.json", times=1, hold=go))
    errors: list[BaseException] = []

    def write_a():
        try:
            a.register(str(_model(tmp_path, "a")), {"accuracy": 0.5})
        except BaseException as e:                              # noqa: BLE001 - checked below
            errors.append(e)

    t = threading.Thread(target=write_a)
    t.start()
    try:
        _wait(lambda: stalled.hits == 1)                       # a passed its lock check and sent its claim
        assert b.register(str(_model(tmp_path, "b")), {"accuracy": 0.6}, {"features": "b"}) == "v0001"
    finally:
        go.set()
        t.join(60)
    assert len(errors) == 1 and isinstance(errors[0], LockLost), errors
    assert "another writer created v0001" in str(errors[0])
    assert [m.version for m in b.list()] == ["v0001"] and b.get("v0001").fingerprints == {"features": "b"}
    assert set(_model_bytes(b, "v0001").values()) == {f"b-{i}".encode() * 100 for i in range(3)}
    assert [e["version"] for e in b.history()] == ["v0001"]


def test_concurrent_writers_on_s3_get_distinct_complete_versions(uri, server, tmp_path):
    writers = [(Registry(uri, lock_timeout=60), _model(tmp_path, t)) for t in "abc"]
    got: dict[str, str] = {}

    def write(reg, model):
        for _ in range(2):
            got[reg.register(str(model), {"accuracy": 0.5}, {"features": model.name})] = model.name

    threads = [threading.Thread(target=write, args=w) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    reg = Registry(uri)
    assert sorted(got) == [f"v{i:04d}" for i in range(1, 7)]
    assert [m.version for m in reg.list()] == sorted(got)
    for v, name in got.items():
        tag = name.removeprefix("model-")
        assert reg.get(v).fingerprints == {"features": name}
        assert set(_model_bytes(reg, v).values()) == {f"{tag}-{i}".encode() * 100 for i in range(3)}
    assert [e["seq"] for e in reg.history()] == list(range(1, 7))
