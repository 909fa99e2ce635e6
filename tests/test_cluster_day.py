"""A cluster user's day (issue #33) on real Ray, apart from the fake autoscaling cluster (tests/test_autoscale.py):

1. training where the GPU workers have no usable CUDA (fake GPUs: Ray's GPU is a resource name; this machine's torch
   has no CUDA): ``train.use_gpu: auto`` trains on CPUs with gloo and says so once; ``true`` stops with one line
   naming the fix, exit 2, no traceback (through ``mmbatch train``);
2. a worker node lost as a spot instance is: its raylet SIGKILLed (the GCS finds out from missed health checks, not
   from a clean ``remove_node``) while its unit actors run, on a ``ray.cluster_utils.Cluster``; the job ends with exit
   0 and the output of an undisturbed run;
3. which Ray errors count as a lost worker (pure).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from faults import assert_same_output, private_ray_tmpdir, run_cmd
from fused_data import write_fused

from mmbatch.engine.units import lost_worker
from mmbatch.errors import UsageError
from mmbatch.train.run import RankPlacement, usable_gpus

GPU_RANKS = RankPlacement(2, True, {"CPU": 1.0, "GPU": 1.0}, note="asking the autoscaler for 2 more GPU(s)")


# --- 1. GPU ranks without CUDA ----------------------------------------------------------------------
def test_gpu_ranks_without_cuda_fall_back_to_cpu_or_stop_with_the_fix(caplog):
    from mmbatch.train import run

    run._gpu_probe.clear()
    assert usable_gpus(GPU_RANKS, "auto", lambda: "") is GPU_RANKS                  # CUDA there: unchanged
    cpu = RankPlacement(2, False, {"CPU": 1.0})
    assert usable_gpus(cpu, "auto", lambda: "no usable CUDA") is cpu                # no GPU asked: no probe
    with caplog.at_level("WARNING", logger="mmbatch"):
        for _ in range(2):                                                           # baselines, a retrain: said once
            got = usable_gpus(GPU_RANKS, "auto", lambda: "no usable CUDA (torch 2.x+cpu)")
            assert (got.num_workers, got.use_gpu, got.resources_per_worker) == (2, False, {"CPU": 1.0})
    said = [r.getMessage() for r in caplog.records if "gloo" in r.getMessage()]
    assert said == ["the cluster's GPU workers have no usable CUDA (torch 2.x+cpu): training on CPUs (gloo) instead"]
    with pytest.raises(UsageError, match=r"train.use_gpu: true, .*install a CUDA build of torch .*use_gpu: auto"):
        usable_gpus(GPU_RANKS, True, lambda: "a torch without NCCL")
    run._gpu_probe.clear()


@pytest.mark.slow
def test_training_on_fake_gpus_falls_back_once_or_names_the_fix(tmp_path):
    """``mmbatch train`` with an embedded Ray of 2 CPUs and 1 fake GPU (``ray.num_gpus: 1``)."""
    data = write_fused(str(tmp_path / "fused"), n=200, seed=0)

    def train(use_gpu):
        wf = {"ray": {"num_cpus": 2, "num_gpus": 1}, "splits": {"seed": 0},
              "train": {"data": data, "out": str(tmp_path / "runs"), "name": f"gpu-{use_gpu}", "epochs": 2,
                        "hidden": 16, "batch_size": 64, "num_workers": 1, "schedule": "none", "seed": 0,
                        "use_gpu": use_gpu}}
        path = tmp_path / f"wf-{use_gpu}.yaml"
        path.write_text(yaml.safe_dump(wf))
        return run_cmd([sys.executable, "-m", "mmbatch.cli", "train", str(path)], timeout=400)

    auto = train("auto")
    assert auto.returncode == 0, auto.stdout[-2000:] + auto.stderr[-4000:]
    err = auto.stdout + auto.stderr
    assert "Traceback" not in err and "NCCL" not in err.replace("without NCCL", ""), err[-4000:]
    assert err.count("training on CPUs (gloo) instead") == 1, err[-4000:]
    assert (tmp_path / "runs" / "gpu-auto" / "model" / "model.json").exists()

    true = train(True)
    assert true.returncode == 2, true.stdout[-2000:] + true.stderr[-4000:]
    lines = [ln for ln in true.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in true.stderr, true.stderr[-4000:]
    assert len(lines) == 1 and "train.use_gpu: true" in lines[0] and "CUDA build of torch" in lines[0], lines


# --- 2. a node lost as in life -----------------------------------------------------------------------
def test_only_lost_workers_count_as_lost():
    import ray.exceptions as rex

    assert lost_worker(rex.ActorDiedError())
    assert lost_worker(rex.NodeDiedError("gone"))
    wrapped = rex.RayTaskError("f", "tb", rex.ActorDiedError())
    assert lost_worker(wrapped)
    try:
        try:
            raise rex.ActorUnavailableError("x", b"\0" * 16)
        except rex.ActorUnavailableError as e:
            raise RuntimeError("execution failed") from e
    except RuntimeError as outer:
        assert lost_worker(outer)
    assert not lost_worker(ValueError("a bug"))
    assert not lost_worker(rex.RayTaskError("f", "tb", ValueError("a bug in a unit")))


KILL_SCRIPT = r"""
import faulthandler, glob, json, os, signal, sys, threading, time
faulthandler.dump_traceback_later(400, exit=True)   # a hang shows its stacks in the test's failure
sys.path.insert(0, sys.argv[3])
from faults import child_pids, cmdline
from ray.cluster_utils import Cluster
from ray._private import ray_constants

# head (driver only, no CPUs) + two 2-CPU worker nodes: the units of the lost one go to the other
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
cluster.wait_for_nodes()
from mmbatch.engine.runtime import init_ray
init_ray(address=cluster.address)
import ray
from mmbatch.config import workflow_from_dict
from mmbatch.preprocess import run_preprocess

wf, out, moment = json.loads(sys.argv[1]), sys.argv[2], sys.argv[4]
state = {}

def raylet(node):
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

def actors_on(node):
    return sum("_PoolActor" in cmdline(p) for p in child_pids(raylet(node)))

def kill_a_raylet():
    while True:
        markers = len(glob.glob(out + "/_shards/*.json"))
        hosts = [actors_on(n) for n in workers]
        if (moment == "actor" and max(hosts)) or (moment != "actor" and markers >= int(moment)):
            break
        time.sleep(0.01)
    state.update(markers_before=markers, actors_on_victim=max(hosts))
    victim = workers[max(range(2), key=lambda i: hosts[i])]
    os.kill(raylet(victim), signal.SIGKILL)              # no clean removal: the GCS must miss its health checks
    state["killed"] = True

threading.Thread(target=kill_a_raylet, daemon=True).start()
s = run_preprocess(workflow_from_dict(wf), progress=False)
print("RESULT", json.dumps({**state, "rows_out": s.rows_out, "processed": s.shards_processed}), flush=True)
os._exit(0)             # the killed raylet's node cannot shut down cleanly; the test reaps what is left
"""


@pytest.fixture(scope="module")
def canon_and_reference(ray_session, tmp_path_factory):
    """48 demo images in 4-row shards (12-13 units) and an undisturbed HOG run on the shared Ray."""
    from mmbatch.config import workflow_from_dict
    from mmbatch.demo.corpus import write_imagenet
    from mmbatch.ingest.run import IngestOptions, run_ingest
    from mmbatch.preprocess import run_preprocess

    root = tmp_path_factory.mktemp("nodeloss")
    run_ingest("imagenet", str(write_imagenet(root / "corpus", per_class=12)), str(root / "canon"),
               IngestOptions(shard_rows=4), echo=False)
    run_preprocess(workflow_from_dict(hog_workflow(root / "canon", root / "ref")), progress=False)
    return root / "canon", root / "ref"


def hog_workflow(canon: Path, out: Path) -> dict:
    return {"datasets": [{"name": "images", "path": str(canon), "modalities": ["image"]}],
            "features": {"image": {"extractor": "hog", "size": 32, "batch_size": 4}}, "output": {"path": str(out)}}


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["actor", "2"])       # as its actors start; after 2 units were committed
def test_a_raylet_killed_mid_job_costs_only_its_units(canon_and_reference, tmp_path, moment):
    canon, reference = canon_and_reference
    out = tmp_path / "out"
    proc = run_cmd([sys.executable, "-c", KILL_SCRIPT, json.dumps(hog_workflow(canon, out)), str(out),
                    str(Path(__file__).parent), moment], timeout=500, RAY_TMPDIR=private_ray_tmpdir())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert res.get("killed") and res["actors_on_victim"] >= 1, res
    assert res["rows_out"] == 48, res
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert_same_output(out, reference)


# --- 4. the job's log -----------------------------------------------------------------------------------
def test_ray_noise_stays_off_the_terminal_and_in_rays_log_files():
    """Ray Data's per-block errors, actor replacements and experimental warnings are filtered from its console
    handler only (its session log file keeps them); the autoscaler's and raylet's lines are not printed."""
    import logging

    from mmbatch.engine import runtime

    console = runtime._RayDataConsole()

    def record(level, msg):
        return logging.LogRecord("ray.data._internal.x", level, "f.py", 1, msg, None, None)
    for noise in ('An exception was raised from a task of operator "MapBatches". Ignoring this exception with '
                  "remaining max_errored_blocks=-1.",
                  "MapBatches(_PoolActor): an actor died during initialization and will be replaced (1 consecutive)",
                  "Specifying both num_cpus and num_gpus for map tasks is experimental, and may result in ...",
                  "Cluster resources are not enough to run any task from ActorPoolMapOperator[MapBatches]."):
        assert not console.filter(record(logging.ERROR, noise)), noise
    assert not console.filter(record(logging.INFO, "Execution plan of Dataset ..."))
    assert console.filter(record(logging.WARNING, "Failed to read s3://bucket/x.parquet"))
    assert set(runtime.NOISE_SOURCES) >= {"autoscaler", "raylet"}
    # a worker whose raylet was SIGKILLed (seen on the fake cluster): its C++ fatal check and stack, not printed
    dump = ["[2026-12-07 21:17:52,953 C 15711 16255] core_worker.cc:515:  An unexpected system state has occurred.",
            "*** StackTrace Information ***",
            "/work/main/.venv/lib/python3.11/site-packages/ray/_raylet.so(+0x1812b9a) [0x7fc29ec12b9a] ray::operator<<",
            "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0(Py_RunMain+0x830) [0x7fa3e7eb9c60] Py_RunMain",
            "ray::MapWorker(MapBatches(_PoolActor))(_start+0x21) [0x5632b020d081] _start", ""]
    assert all(runtime.NOISE_PATTERN.search(ln) for ln in dump)
    for kept in ("image cnn extractor: no weights given for resnet18", "[2026-12-07 21:17:52,953 W 1 2] x.cc:1: slow",
                 "ValueError: bad value (0x1f)"):
        assert not runtime.NOISE_PATTERN.search(kept), kept


def test_quiet_mode_filters_ray_datas_console_not_its_log_file(ray_session):
    import logging

    from mmbatch.engine import runtime

    runtime._quiet_ray_data(True)
    handlers = logging.getLogger("ray.data").handlers
    consoles = [h for h in handlers if any(isinstance(f, runtime._RayDataConsole) for f in h.filters)]
    files = [h for h in handlers if type(h).__name__ == "SessionFileHandler"]
    assert consoles and files, handlers
    assert not any(isinstance(f, runtime._RayDataConsole) for h in files for f in h.filters)
    assert logging.getLogger("ray.data").getEffectiveLevel() < logging.WARNING     # the file gets INFO/DEBUG
