"""Preprocess on Ray's fake autoscaling cluster: the job grows the cluster and starts its GPU nodes.

The cluster is built here, apart from the session's shared Ray: ``RAY_FAKE_CLUSTER=1 ray start --head
--num-cpus=0 --port=6379 --autoscaling-config=CONFIG`` (the config written whole: the Ray wheel lacks
fake_multi_node/example.yaml), token auth on as in any Ray >= 2.52 head. Node types: 2 CPUs (min 0,
max 3) and 2 CPUs + 1 GPU (min 0, max 2); each fake node is a local raylet, its GPU only logical.
The driver runs in a subprocess connected to that cluster. The cluster is stopped by killing its own
processes (its session), never with ``ray stop``, which would stop every Ray on the machine.

(a) a HOG job of 12-13 units from a bare head grows the cluster past one node (peak >= 4 CPUs) and
    starts no GPU node; its output equals a local run's; (b) a CNN job whose workflow does not mention
    GPUs starts GPU nodes and its units run there, the commit records name the node, and the summary
    says the model fell back to CPU (no CUDA behind a fake GPU); (c) each driver ends cleanly, with no
    actor or placement group of its job left on a worker node; (d) the cluster then scales back to the
    head alone within its idle timeout.

This autoscaler (v1, as `ray start --autoscaling-config` and the cluster launcher run it) does not
report its node types to the GCS. As `ray up` does, the config is at ~/ray_bootstrap_config.yaml of
the head node, where the drivers run (HOME is the cluster's own folder here); the job reads its node
types there (mmbatch.engine.capacity.launcher_types): the pool is sized from them and the CNN asks for a GPU
share unasked. (The v2 monitor, which reports them to the GCS, cannot run the fake provider from the
Ray 2.60 wheel, which lacks its example.yaml.)
"""
from __future__ import annotations

import contextlib
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
from pathlib import Path

import pytest
from faults import assert_same_output

from mmbatch.config import workflow_from_dict
from mmbatch.preprocess import run_preprocess

pytestmark = pytest.mark.slow

PORT = 6379                   # the fake provider points its nodes at this GCS port
AUTH_VARS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
LAUNCHER_KEYS = ("file_mounts", "cluster_synced_files", "initialization_commands", "setup_commands",
                 "head_setup_commands", "worker_setup_commands")


IDLE_MINUTES = 1              # an idle worker node goes after a minute (5 in `ray up`'s default)


def autoscaling_config(idle_timeout_minutes: float = IDLE_MINUTES) -> dict:
    def node(resources: dict, max_workers: int) -> dict:
        return {"resources": {**resources, "object_store_memory": 200 * 2**20}, "node_config": {},
                "min_workers": 0, "max_workers": max_workers}
    return {
        "cluster_name": "mmbatch-fake", "max_workers": 5, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {}, "docker": {}, **{k: ([] if k.endswith("commands") else {}) for k in LAUNCHER_KEYS},
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu2": node({"CPU": 2}, 3),
            "gpu1": node({"CPU": 2, "GPU": 1}, 2),
        },
    }


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return {}


def cluster_pids(sid: int) -> list[int]:
    """Every live process of the cluster: its session (the head was started in a new one), and the
    workers of its raylets, which Ray starts in process groups and sessions of their own (found by
    the RAY_RAYLET_PID in their environment)."""
    pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    ours = set()
    for pid in pids:
        try:
            if os.getsid(pid) == sid:
                ours.add(pid)
        except (ProcessLookupError, PermissionError):
            continue
    raylets = {str(p).encode() for p in ours}
    ours |= {p for p in pids if _environ(p).get(b"RAY_RAYLET_PID") in raylets}
    return sorted(ours)


def stop_cluster(proc: subprocess.Popen) -> list[int]:
    """Kill this cluster's processes, SIGTERM then SIGKILL; returns those left (none)."""
    sid = proc.pid
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        for pid in cluster_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while cluster_pids(sid) and time.time() < deadline:
            time.sleep(0.2)
    proc.wait(timeout=10)
    return cluster_pids(sid)


@contextlib.contextmanager
def start_fake_cluster(wait_s: float = 600):
    """Start the fake autoscaling cluster (its own session, HOME, temp dir and token); yield
    ``(client_env, info)``, ``info`` with its ``tmp`` folder and ``sid``; stop it on exit by killing only
    its own processes (:func:`stop_cluster`)."""
    deadline = time.time() + wait_s
    while not port_free(PORT):          # another engineer's or test's Ray: wait for it, never stop it
        if time.time() > deadline:
            raise RuntimeError(f"port {PORT} stayed busy for {wait_s:.0f} s (the fake provider needs it)")
        time.sleep(5)
    tmp = Path(tempfile.mkdtemp(prefix="mmfc", dir="/tmp"))     # short: Ray's unix socket paths
    (tmp / "home").mkdir()
    token = tmp / "token"
    token.write_text(secrets.token_hex(24))
    token.chmod(0o600)
    config = tmp / "home" / "ray_bootstrap_config.yaml"       # JSON is YAML
    config.write_text(json.dumps(autoscaling_config()))
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(HOME=str(tmp / "home"), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=str(tmp), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--num-cpus=0", f"--port={PORT}", f"--autoscaling-config={config}",
                             f"--temp-dir={tmp}/r", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = {**{k: v for k, v in env.items() if k != "RAY_FAKE_CLUSTER"},
              "RAY_ADDRESS": f"127.0.0.1:{PORT}", "PYTHONWARNINGS": "ignore"}
    try:
        while port_free(PORT):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("ray start failed:\n" + (tmp / "head.log").read_text()[-3000:])
            time.sleep(0.5)
        yield client, {"tmp": tmp, "sid": proc.pid}
    finally:
        left = stop_cluster(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
        assert left == [], f"processes of the fake cluster left running: {left}"


@pytest.fixture(scope="module")
def fake_cluster():
    try:
        with start_fake_cluster() as (client, _):
            yield client
    except RuntimeError as e:
        pytest.fail(str(e))


DRIVER = r"""
import glob, json, sys, threading, time
import ray
from mmbatch.engine.runtime import init_ray
init_ray()                                         # RAY_ADDRESS: the fake cluster
from mmbatch.config import workflow_from_dict
from mmbatch.preprocess import run_preprocess
from mmbatch.preprocess.summary import render_summary

start = {k: ray.cluster_resources().get(k, 0.0) for k in ("CPU", "GPU")}
peak, stop = {"CPU": 0.0, "GPU": 0.0, "nodes": 0}, threading.Event()
def watch():
    while not stop.is_set():
        res = ray.cluster_resources()
        alive = [n for n in ray.nodes() if n["Alive"]]
        peak.update(CPU=max(peak["CPU"], res.get("CPU", 0)), GPU=max(peak["GPU"], res.get("GPU", 0)),
                    nodes=max(peak["nodes"], len(alive)))
        time.sleep(0.25)
threading.Thread(target=watch, daemon=True).start()
wf, out = json.loads(sys.argv[1]), sys.argv[2]
s = run_preprocess(workflow_from_dict(wf), progress=False)
stop.set()
gpu_nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU"))
head = ray.get_runtime_context().get_node_id()
# what this job still holds on a worker node once it is done: live actors, placement groups
held = sorted(a["ActorClassName"] for a in ray._private.state.actors().values()
              if a["State"] in ("ALIVE", "PENDING_CREATION", "RESTARTING") and a["Address"]["NodeID"] != head)
groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
nodes = [json.load(open(f))["node"] for f in sorted(glob.glob(out + "/_shards/*.json"))]
print("RESULT", json.dumps({"start": start, "peak": peak, "gpu_nodes": gpu_nodes, "held": held, "groups": len(groups), "record_nodes": nodes, "rows": s.rows_out,
                            "processed": s.shards_processed, "summary": render_summary(s),
                            "placement": {m: {k: (sorted(v) if isinstance(v, set) else v) for k, v in p.items()}
                                          for m, p in s.placement.items()}}), flush=True)
"""


def drive(client_env: dict, wf: dict, out: Path) -> dict:
    env = {**client_env, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                       os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(wf), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]        # (c) a clean end ...
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]                     # ... with nothing failing
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


@pytest.fixture(scope="module")
def canon(ray_session, tmp_path_factory):
    """48 demo images in 4-row shards: 12-13 units (the shard plan cuts by content)."""
    from mmbatch.demo.corpus import write_imagenet
    from mmbatch.ingest.run import IngestOptions, run_ingest

    root = tmp_path_factory.mktemp("autoscale")
    out = root / "canon"
    run_ingest("imagenet", str(write_imagenet(root / "corpus", per_class=12)), str(out), IngestOptions(shard_rows=4),
               echo=False)
    return out


def workflow(canon: Path, out: Path, extractor: str, **image) -> dict:
    return {"datasets": [{"name": "images", "path": str(canon), "modalities": ["image"]}],
            "features": {"image": {"extractor": extractor, "size": 32, "batch_size": 4, **image}},
            "output": {"path": str(out)}}


def test_jobs_grow_the_fake_autoscaling_cluster_and_start_its_gpu_nodes(fake_cluster, canon, tmp_path):
    local = tmp_path / "local"
    units = run_preprocess(workflow_from_dict(workflow(canon, local, "hog")), progress=False).shards_processed
    assert units >= 10

    # (a) HOG from a bare head: one one-CPU worker per CPU of the CPU-only node types (3 x 2), pending demand that
    # starts CPU nodes and no GPU node (the GPU nodes' CPUs are not counted on); same output as a local run
    res = drive(fake_cluster, workflow(canon, tmp_path / "hog", "hog"), tmp_path / "hog")
    print("hog:", res["peak"], "units on", len(set(res["record_nodes"])), "nodes")
    assert res["start"] == {"CPU": 0.0, "GPU": 0.0}, res                          # only the head at the start
    assert res["peak"]["GPU"] == 0 and not res["gpu_nodes"], res                 # no GPU node started for it
    assert 4 <= res["peak"]["CPU"] <= 6 and res["peak"]["nodes"] >= 3, res["peak"]   # head + 2-3 CPU nodes
    assert (res["rows"], res["processed"]) == (48, units)
    assert (res["held"], res["groups"]) == ([], 0), res                           # nothing left holding a node
    assert_same_output(tmp_path / "hog", local)

    # (b) CNN, no GPU asked and no GPU node at the start: the gpu1 node type's share (1 GPU / 2 CPUs) per worker; GPU
    # nodes start and run every unit; the model falls back to CPU
    res = drive(fake_cluster, workflow(canon, tmp_path / "cnn", "cnn"), tmp_path / "cnn")
    assert res["start"]["GPU"] == 0.0, res
    print("cnn:", res["peak"], "units on", len(set(res["record_nodes"])), "GPU nodes")
    assert res["peak"]["GPU"] >= 1 and res["gpu_nodes"], res
    assert len(res["record_nodes"]) == units and set(res["record_nodes"]) <= set(res["gpu_nodes"]), res
    img = res["placement"]["image"]
    assert img["device"] == "gpu" and img["num_gpus"] == 0.5 and img["devices"] == ["cpu"], img
    assert "fell back to CPU" in res["summary"], res["summary"]
    assert img["workers"] == 4, img        # the node types' 2 GPUs / 0.5 (no config known: one per unit)
    assert (res["rows"], res["processed"]) == (48, units)
    assert (res["held"], res["groups"]) == ([], 0), res


def test_training_asks_for_the_gpu_nodes_and_falls_back_to_cpu_without_cuda(fake_cluster, tmp_path):
    """``mmbatch train`` (``use_gpu: auto``) on the fake cluster: the capacity code reads the GPU node types from
    the launcher file, so the ranks would get GPUs; the fake GPUs have no CUDA, so it trains on CPUs with gloo and
    says so once; ``use_gpu: true`` stops with one line naming the fix."""
    import yaml
    from fused_data import write_fused

    data = write_fused(str(tmp_path / "fused"), n=200, seed=0)
    env = {**fake_cluster, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                       os.environ.get("PYTHONPATH")]))}

    def train(use_gpu):
        wf = tmp_path / f"wf-{use_gpu}.yaml"
        wf.write_text(yaml.safe_dump({"train": {
            "data": data, "out": str(tmp_path / "runs"), "name": f"gpu-{use_gpu}", "epochs": 2, "hidden": 16,
            "batch_size": 64, "num_workers": 2, "schedule": "none", "seed": 0, "use_gpu": use_gpu},
            "splits": {"seed": 0}}))
        return subprocess.run([sys.executable, "-m", "mmbatch.cli", "train", str(wf)], env=env, capture_output=True,
                              text=True, timeout=900)

    auto = train("auto")
    err = auto.stdout + auto.stderr
    assert auto.returncode == 0 and "Traceback" not in err, err[-5000:]
    assert err.count("training on CPUs (gloo) instead") == 1 and "no usable CUDA" in err, err[-5000:]
    assert (tmp_path / "runs" / "gpu-auto" / "model" / "model.json").exists()
    true = train(True)
    lines = [ln for ln in true.stderr.splitlines() if ln.strip()]
    assert true.returncode == 2 and len(lines) == 1 and "CUDA build of torch" in lines[0], true.stderr[-5000:]


def test_the_cluster_scales_back_to_the_head_alone(fake_cluster):
    """After the jobs above, nothing of mmbatch holds a node: the autoscaler removes every worker node within its
    idle timeout (IDLE_MINUTES), plus its update interval and a node's shutdown."""
    env = {**fake_cluster, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                       os.environ.get("PYTHONPATH")]))}
    script = ("import time, ray\nray.init()\nt0 = time.time()\n"
              "while len([n for n in ray.nodes() if n['Alive']]) > 1 and time.time() - t0 < %d:\n"
              "    time.sleep(2)\nprint('NODES', len([n for n in ray.nodes() if n['Alive']]), round(time.time() - t0))\n"
              % (IDLE_MINUTES * 60 + 90))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("NODES ")][-1]
    print("scale-down:", line)
    assert line.split()[1] == "1", line                  # the head alone


def test_a_token_cluster_reached_without_token_mode_gives_one_clear_line(fake_cluster, canon, tmp_path):
    """Token auth is on (Ray >= 2.52 `ray start --head`); a client without RAY_AUTH_MODE=token gets one
    line naming the fix and exit 2, not Ray's stream of InvalidAuthToken lines."""
    import yaml

    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump(workflow(canon, tmp_path / "out", "hog")))
    env = {k: v for k, v in fake_cluster.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run([str(Path(sys.executable).with_name("mmbatch")), "preprocess", str(wf)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "InvalidAuthToken" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "RAY_AUTH_MODE=token" in lines[0], proc.stderr[-3000:]
