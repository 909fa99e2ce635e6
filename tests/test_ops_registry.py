"""Model registry (versions, champion alias, history, lock) and the retrain decision logic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import types
import uuid
from pathlib import Path

import pytest

from mmbatch.config import load_workflow, workflow_from_dict
from mmbatch.errors import UsageError
from mmbatch.ops.registry import Registry, RegistryLocked, normalize_version, registry_cli
from mmbatch.ops.retrain import (ALREADY_EVALUATED, KEPT_CHAMPION, NO_NEW_DATA, PROMOTED, conclude_cycle,
                                 decide, run_retrain)


def _model(tmp_path: Path, tag: str = "a") -> Path:
    d = tmp_path / f"model-{tag}-{uuid.uuid4().hex[:6]}"
    (d / "sub").mkdir(parents=True)
    (d / "model.pt").write_bytes(b"weights-" + tag.encode())
    (d / "model.json").write_text(json.dumps({"tag": tag}))
    (d / "sub" / "extra.txt").write_text("x")
    return d


def _wf(reg: str, **retrain):
    return workflow_from_dict({"name": "t", "retrain": {"registry": reg, **retrain}})


# --- versions, champion, history ------------------------------------------------------------
def test_register_copies_model_and_records_metadata(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    assert reg.list() == [] and reg.champion() is None and not reg.exists()
    wf = load_workflow(Path(__file__).resolve().parents[1] / "workflows" / "retrain.yaml")
    v = reg.register(str(_model(tmp_path, "a")), {"accuracy": 0.75, "macro_f1": 0.7},
                     {"features": "f1", "train": "t1"}, wf)
    assert v == "v0001"
    mv = reg.get("1")
    assert mv.version == "v0001" == reg.get("v1").version == reg.get("v0001").version
    assert Path(mv.model_uri, "model.pt").read_bytes() == b"weights-a"
    assert Path(mv.model_uri, "sub", "extra.txt").read_text() == "x"
    assert mv.metrics == {"accuracy": 0.75, "macro_f1": 0.7}
    assert mv.fingerprints == {"features": "f1", "train": "t1"}
    assert mv.workflow_name == wf.name and mv.mmbatch_version and mv.created
    assert load_workflow(Path(mv.uri, "workflow.yaml")).retrain.registry == wf.retrain.registry
    assert Path(mv.model_uri).is_absolute()
    assert reg.register(str(_model(tmp_path, "b")), {"accuracy": 0.8}) == "v0002"
    assert [m.version for m in reg.list()] == ["v0001", "v0002"]
    assert [m.version for m in reg.find(features="f1")] == ["v0001"]
    assert [e["event"] for e in reg.history()] == ["register", "register"]


def test_register_rejects_missing_model_and_unknown_versions(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    with pytest.raises(UsageError, match="does not exist or is empty"):
        reg.register(str(tmp_path / "nope"), {"accuracy": 1.0})
    reg.register(str(_model(tmp_path)), {"accuracy": 1.0})
    with pytest.raises(UsageError, match="no version v0007.*v0001"):
        reg.get("7")
    with pytest.raises(UsageError, match="not a version"):
        normalize_version("latest")
    with pytest.raises(UsageError, match="no champion"):
        reg.get("champion")


def test_uncommitted_version_folder_is_invisible_and_its_number_not_reused(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    (tmp_path / "reg" / "versions" / "v0001" / "model").mkdir(parents=True)   # a crashed register
    assert reg.list() == []
    assert reg.register(str(_model(tmp_path)), {"accuracy": 0.5}) == "v0002"


def test_promote_rollback_lineage_and_history(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    vs = [reg.register(str(_model(tmp_path, t)), {"accuracy": a}) for t, a in (("a", .5), ("b", .6), ("c", .7))]
    for v in vs:
        reg.promote(v, reason=f"test {v}")
    assert reg.champion().version == "v0003"
    assert reg.alias()["lineage"] == ["v0001", "v0002", "v0003"]
    n = len(reg.history())
    assert reg.promote("v0003") == "v0003" and len(reg.history()) == n      # no-op, no event
    assert reg.rollback() == "v0002"
    assert reg.rollback() == "v0001"
    assert reg.champion().version == "v0001"
    with pytest.raises(UsageError, match="nothing to roll back to"):
        reg.rollback()
    events = [(e["event"], e.get("version"), e.get("previous")) for e in reg.history()]
    assert events[-2:] == [("rollback", "v0002", "v0003"), ("rollback", "v0001", "v0002")]
    assert [e["seq"] for e in reg.history()] == list(range(1, len(events) + 1))
    assert ("promote", "v0002", "v0001") in events


def test_champion_alias_update_is_atomic(tmp_path, monkeypatch):
    """A writer that dies mid-update leaves the previous champion.json intact and readable."""
    reg = Registry(str(tmp_path / "reg"))
    v1 = reg.register(str(_model(tmp_path, "a")), {"accuracy": .5})
    v2 = reg.register(str(_model(tmp_path, "b")), {"accuracy": .6})
    reg.promote(v1)
    alias = tmp_path / "reg" / "aliases" / "champion.json"
    before = alias.read_bytes()
    real_replace = os.replace

    def dying_replace(src, dst):
        if str(dst).endswith("champion.json"):
            raise OSError("simulated crash before the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(OSError, match="simulated crash"):
        reg.promote(v2)
    monkeypatch.undo()
    assert alias.read_bytes() == before                       # old alias untouched, still valid JSON
    assert reg.champion().version == v1
    assert [p.name for p in alias.parent.iterdir() if p.is_file()] == ["champion.json"]
    # and the lock was released on the failure
    with reg.lock(timeout=0):
        pass
    reg.promote(v2)
    assert reg.champion().version == v2


def test_object_store_registry_memory_fs(tmp_path):
    uri = f"memory://mmbatch-test-{uuid.uuid4().hex[:8]}/reg"
    reg = Registry(uri)
    v = reg.register(str(_model(tmp_path)), {"accuracy": 0.9}, {"features": "abc"})
    reg.promote(v)
    mv = Registry(uri).champion()
    assert mv.version == v and mv.model_uri.startswith("memory://") and mv.model_uri.endswith("/model")
    import fsspec
    with fsspec.open(mv.model_uri + "/model.pt", "rb") as f:
        assert f.read() == b"weights-a"
    assert reg._read_lock(reg._lock_generations()[-1])["released"]      # released


# --- the lock ------------------------------------------------------------------------------------
def test_lock_is_reentrant_and_excludes_other_writers(tmp_path):
    path = str(tmp_path / "reg")
    a, b = Registry(path), Registry(path, lock_timeout=0.2)
    with a.lock(timeout=0):
        with a.lock(timeout=0):                               # nested: no self-deadlock
            a.register(str(_model(tmp_path)), {"accuracy": 0.5})   # takes the lock again inside
        t0 = time.monotonic()
        with pytest.raises(RegistryLocked, match=rf"locked by pid {os.getpid()} on .*Try again"):
            with b.lock(timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.25
        with pytest.raises(RegistryLocked):
            b.promote("v0001")                                 # writes wait for the lock too
    with b.lock(timeout=0):
        pass


def _holder_script(path: str, hold_s: float, extra: str = "") -> list[str]:
    code = textwrap.dedent(f"""
        import sys, time
        from mmbatch.ops.registry import Registry
        r = Registry({path!r})
        with r.lock(timeout=30):
            print("locked", flush=True)
            {extra}
            time.sleep({hold_s})
    """)
    return [sys.executable, "-c", code]


def test_two_processes_race_for_the_lock(tmp_path, capsys):
    path = str(tmp_path / "reg")
    reg = Registry(path)
    reg.register(str(_model(tmp_path)), {"accuracy": 0.5})
    holder = subprocess.Popen(_holder_script(path, 3.0), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RegistryLocked) as e:
            with reg.lock(timeout=0.2):
                pass
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and path in msg
        # the CLI loser: clear message, exit code 2, no traceback
        from mmbatch.cli import main
        os.environ["MMBATCH_REGISTRY_LOCK_TIMEOUT"] = "0.2"
        try:
            rc = main(["registry", "promote", path, "v1"])
        finally:
            del os.environ["MMBATCH_REGISTRY_LOCK_TIMEOUT"]
        err = capsys.readouterr().err
        assert rc == 2 and "is locked by pid" in err and "Traceback" not in err
        # once the holder is done, the lock is free again (waits for it)
        with reg.lock(timeout=30):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert reg.champion() is None


def test_lock_released_when_holder_process_dies(tmp_path):
    path = str(tmp_path / "reg")
    holder = subprocess.Popen(_holder_script(path, 60), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    with Registry(path).lock(timeout=5):                     # the OS dropped the file lock
        pass


def test_two_processes_registering_at_once_get_distinct_versions(tmp_path):
    path = str(tmp_path / "reg")
    models = [_model(tmp_path, t) for t in "ab"]
    code = ("import sys; from mmbatch.ops.registry import Registry; "
            "print(Registry(sys.argv[1]).register(sys.argv[2], {'accuracy': 0.5}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, path, str(m)], stdout=subprocess.PIPE, text=True)
             for m in models]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert outs == ["v0001", "v0002"]
    reg = Registry(path)
    assert len(reg.list()) == 2 and [e["seq"] for e in reg.history()] == [1, 2]


def test_object_store_lock_excludes_breaks_stale_and_heartbeats(tmp_path):
    uri = f"memory://mmbatch-lock-{uuid.uuid4().hex[:8]}/reg"
    a = Registry(uri, stale_after=0.6)
    b = Registry(uri, stale_after=0.6)
    with a.lock(timeout=0):
        with pytest.raises(RegistryLocked, match=f"pid {os.getpid()}"):
            with b.lock(timeout=0.1):
                pass
        time.sleep(1.2)                                       # > stale_after: heartbeat keeps it fresh
        with pytest.raises(RegistryLocked):
            with b.lock(timeout=0.1):
                pass
    with b.lock(timeout=0):                                  # released
        pass
    # a lock generation left by a dead writer (no heartbeat, never released) is followed once stale
    dead = a._lock_generations()[-1] + 1
    a.fs.pipe_file(a._lock_path(dead), json.dumps({"owner": "dead", "pid": 1, "host": "gone", "created":
                                                    time.time() - 100, "refreshed": time.time() - 100}).encode())
    with b.lock(timeout=0):
        assert b._lock_generations() == [dead + 1]                 # the dead one superseded, then tidied
        assert b._read_lock(dead + 1)["owner"] != "dead" and not b._read_lock(dead + 1).get("released")
    assert b._read_lock(dead + 1)["released"]


def test_object_store_lock_without_exclusive_create_support(tmp_path, monkeypatch):
    """Backends that reject mode "xb" fall back to check-then-write + read-back."""
    uri = f"memory://mmbatch-nox-{uuid.uuid4().hex[:8]}/reg"
    a, b = Registry(uri), Registry(uri)
    real_open = type(a.fs).open

    def no_exclusive(self, path, mode="rb", *args, **kw):
        if "x" in mode:
            raise ValueError(f"unsupported mode {mode}")
        return real_open(self, path, mode, *args, **kw)

    monkeypatch.setattr(type(a.fs), "open", no_exclusive)
    with a.lock(timeout=0):
        with pytest.raises(RegistryLocked):
            with b.lock(timeout=0.1):
                pass
    v = b.register(str(_model(tmp_path)), {"accuracy": 0.5})
    assert v == "v0001" and b._read_lock(b._lock_generations()[-1])["released"]


# --- CLI ---------------------------------------------------------------------------------------------
def test_registry_cli_tables(tmp_path, capsys):
    path = str(tmp_path / "reg")
    with pytest.raises(UsageError, match="no registry at"):
        registry_cli("list", path)
    reg = Registry(path)
    for t, acc in (("a", 0.61), ("b", 0.72)):
        reg.register(str(_model(tmp_path, t)), {"accuracy": acc, "macro_f1": acc - 0.01}, {"features": f"fp{t}"})
    assert registry_cli("promote", path, "v1") == 0
    assert "champion: v0001" in capsys.readouterr().out
    assert registry_cli("promote", path, "2") == 0
    assert "champion: v0002 (was v0001)" in capsys.readouterr().out
    registry_cli("list", path)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["VERSION", "CREATED", "(UTC)", "ACCURACY"]
    assert any(line.startswith("v0002 *") and "0.7200" in line and "fpb" in line for line in lines)
    assert "champion: v0002" in out
    registry_cli("show", path)                                # champion by default
    out = capsys.readouterr().out
    assert "version:   v0002  (champion)" in out and "macro_f1: 0.7100" in out and "promote" in out
    assert registry_cli("rollback", path) == 0
    assert "champion: v0001 (rolled back from v0002)" in capsys.readouterr().out
    with pytest.raises(UsageError, match="needs a version"):
        registry_cli("promote", path)


# --- retrain: the decision and its recording ----------------------------------------------------------
def test_decide_rules():
    assert decide({"accuracy": 0.5}, None, "accuracy", 0.1, has_champion=False).promote
    assert decide({"accuracy": 0.8}, {"accuracy": 0.75}, "accuracy", 0.05, True).promote     # == with floats
    assert decide({"accuracy": 0.7}, {"accuracy": 0.7}, "accuracy", 0.0, True).promote
    d = decide({"accuracy": 0.79}, {"accuracy": 0.75}, "accuracy", 0.05, True)
    assert not d.promote and "< champion 0.7500 + margin 0.05" in d.reason
    assert not decide({"macro_f1": 0.6}, {"macro_f1": 0.7}, "macro_f1", 0.0, True).promote
    d = decide({"accuracy": 0.9}, None, "accuracy", 0.0, True, champion_error="ValueError: dims")
    assert not d.promote and "could not be scored" in d.reason
    with pytest.raises(UsageError, match="no 'macro_f1'"):
        decide({"accuracy": 0.9}, None, "macro_f1", 0.0, False)


def test_conclude_cycle_registers_and_promotes_only_winners(tmp_path):
    path = str(tmp_path / "reg")
    reg = Registry(path)
    wf = _wf(path, margin=0.02, metric="accuracy")
    fp = lambda i: {"features": f"f{i}", "train": "t"}          # noqa: E731

    r1 = conclude_cycle(reg, wf, str(_model(tmp_path, "1")), {"accuracy": 0.70, "macro_f1": 0.6}, None, None, fp(1))
    assert (r1.status, r1.version, r1.champion, r1.previous_champion) == (PROMOTED, "v0001", "v0001", None)

    champ = reg.champion()
    r2 = conclude_cycle(reg, wf, str(_model(tmp_path, "2")), {"accuracy": 0.71}, champ, {"accuracy": 0.70}, fp(2))
    assert (r2.status, r2.version, r2.champion) == (KEPT_CHAMPION, "v0002", "v0001")
    assert reg.champion().version == "v0001"

    r3 = conclude_cycle(reg, wf, str(_model(tmp_path, "3")), {"accuracy": 0.73}, champ, {"accuracy": 0.70}, fp(3))
    assert (r3.status, r3.champion, r3.previous_champion) == (PROMOTED, "v0003", "v0001")
    assert reg.champion().version == "v0003"

    v2 = reg.get("v2")
    assert v2.extra["decision"]["promote"] is False and v2.extra["champion_at_training"] == "v0001"
    assert v2.extra["champion_metrics"] == {"accuracy": 0.70}
    assert reg.last_cycle()["status"] == PROMOTED and reg.last_cycle()["version"] == "v0003"
    promotes = [e for e in reg.history() if e["event"] == "promote"]
    assert [e["version"] for e in promotes] == ["v0001", "v0003"] and "retrain:" in promotes[-1]["reason"]
    registry_cli("list", path)


def _fake_stages(monkeypatch, tmp_path, calls: dict, scores: dict, fingerprint: str = "feat-1"):
    """Stand-ins for preprocess / training / evaluate, following their contracts."""
    def run_preprocess(wf):
        calls["preprocess"] = calls.get("preprocess", 0) + 1
        return types.SimpleNamespace(fingerprint=calls.get("fingerprint", fingerprint), shards_processed=1,
                                     shards_skipped=0, rows_out=10, quarantined=0, out=wf.output.path)

    def run_training(wf, warm_start=None, **kw):
        calls.setdefault("train", []).append(warm_start)
        calls.setdefault("names", []).append(wf.train.name)
        return types.SimpleNamespace(model_dir=str(_model(tmp_path, f"t{len(calls['train'])}")),
                                     metrics={"val_accuracy": 0.9})

    def evaluate_model(model_dir, data_path, split="test", allow_incomplete=False):
        assert split == "test"
        calls.setdefault("eval", []).append(model_dir)
        tag = json.loads(Path(model_dir, "model.json").read_text())["tag"]
        return {"accuracy": scores[tag], "macro_f1": scores[tag], "n": 10}

    # the stand-ins replace the functions in the real modules (retrain also imports helpers beside them)
    monkeypatch.setattr("mmbatch.preprocess.run_preprocess", run_preprocess)
    monkeypatch.setattr("mmbatch.train.run.run_training", run_training)
    monkeypatch.setattr("mmbatch.train.evaluate.evaluate_model", evaluate_model)


def test_run_retrain_cycle_is_idempotent_with_stub_stages(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "reg")
    wf = workflow_from_dict({"name": "t", "output": {"path": str(tmp_path / "feat")},
                             "retrain": {"registry": path, "warm_start": True, "margin": 0.01}})
    calls: dict = {}
    _fake_stages(monkeypatch, tmp_path, calls, {"t1": 0.6, "t2": 0.605, "t3": 0.7})

    r = run_retrain(wf)                                        # first model -> champion
    assert (r.status, r.version, r.champion) == (PROMOTED, "v0001", "v0001")
    assert calls["train"] == [None]                            # nothing to warm-start from
    r = run_retrain(wf)                                        # same features -> nothing to do
    assert r.status == NO_NEW_DATA and len(calls["train"]) == 1
    assert "no new data" in capsys.readouterr().out

    calls["fingerprint"] = "feat-2"                            # new data, candidate within the margin
    r = run_retrain(wf)
    assert (r.status, r.version, r.champion) == (KEPT_CHAMPION, "v0002", "v0001")
    assert calls["train"][-1] == Registry(path).get("v1").model_uri     # warm start from the champion
    assert r.candidate_metrics["accuracy"] == 0.605 and r.champion_metrics["accuracy"] == 0.6
    r = run_retrain(wf)                                        # same data again: not retrained
    assert r.status == ALREADY_EVALUATED and r.version == "v0002" and len(calls["train"]) == 2

    wf.retrain.force_train = True                              # forced: trains, and this one wins
    r = run_retrain(wf)
    assert (r.status, r.version, r.champion, r.previous_champion) == (PROMOTED, "v0003", "v0003", "v0001")
    assert Registry(path).last_cycle()["status"] == PROMOTED
    # one training run per candidate: the same data + settings map to the same run (a crashed
    # cycle resumes it); warm starts and forced runs get their own
    n1, n2, n3 = calls["names"]
    assert n1.startswith("fusion-d") and "from-" not in n1
    assert n2.endswith("-from-v0001") and n2 != n1
    assert n3.startswith(n2) and len(n3) > len(n2)
    assert wf.train.name == "fusion"                           # the caller's workflow is not changed


def test_run_retrain_loser_exits_with_clear_message(tmp_path, monkeypatch):
    path = str(tmp_path / "reg")
    calls: dict = {}
    _fake_stages(monkeypatch, tmp_path, calls, {})
    with Registry(path).lock(timeout=0):
        with pytest.raises(RegistryLocked, match="is locked by pid"):
            run_retrain(_wf(path))
    assert "preprocess" not in calls                           # nothing ran
