"""A lost node at different moments of a job, on Ray's fake autoscaling cluster (issue #33).

Starts the fake autoscaling cluster of tests/test_autoscale.py (0-CPU head on port 6379, cpu2 x3, gpu1 x2),
then runs one preprocess job per kill moment through a driver connected to it; while the job runs, this
process SIGKILLs one worker node's raylet (as a lost spot instance: the GCS finds out only from missed
heartbeats) at the moment named, and checks the job ends with exit 0 and output equal to an undisturbed
local run. Prints one line per run and a tally. The cluster is stopped by killing its own processes.

    PYTHONPATH=$PWD python -m benchmarks.node_loss [--moments gpu-node,actor-start,m1,...] [--out DIR]

Moments: ``node`` (a worker node of the job's kind has just joined, before its actors start),
``actor`` (a _PoolActor process has just started on it), ``actor+1s``, ``mN`` (N units committed).
``hog:`` in front (``hog:m2``) runs the HOG extractor and kills a CPU node instead of the CNN on a GPU node;
``ingest:`` runs the ingest of the corpus (a CPU node killed; compared row for row with the local ingest).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from faults import assert_same_output, child_pids, cmdline  # noqa: E402
from test_autoscale import cluster_pids, start_fake_cluster  # noqa: E402

DEFAULT = "node,actor,actor+1s,m1,m2,m3,m4,m6,m8,hog:node,hog:m1,hog:m3"

PREPARE = r"""
import json, pathlib, sys
from mmbatch.engine.runtime import init_ray
init_ray(num_cpus=2)
from mmbatch.config import workflow_from_dict
from mmbatch.demo.corpus import write_imagenet
from mmbatch.ingest.run import IngestOptions, run_ingest
from mmbatch.preprocess import run_preprocess
root = sys.argv[1]
run_ingest("imagenet", str(write_imagenet(pathlib.Path(root) / "corpus", per_class=12)), root + "/canon",
           IngestOptions(shard_rows=4), echo=False)
for ext in ("cnn", "hog"):
    run_preprocess(workflow_from_dict(json.loads(sys.argv[2].replace("EXT", ext).replace("OUT", root + "/ref-" + ext))),
                   progress=False)
"""

DRIVER = r"""
import json, sys
from mmbatch.engine.runtime import init_ray
init_ray()
from mmbatch.config import workflow_from_dict
from mmbatch.preprocess import run_preprocess
wf = json.loads(sys.argv[1])
if "ingest" in wf:
    from mmbatch.ingest.run import IngestOptions, run_ingest
    run_ingest("imagenet", wf["ingest"], wf["output"]["path"], IngestOptions(shard_rows=4), echo=False)
else:
    s = run_preprocess(workflow_from_dict(wf), progress=False)
print("RESULT", flush=True)
"""


def same_rows(got: Path, want: Path) -> None:
    """The same rows, whatever the files (an ingest's shard plan may follow the CPUs it sees)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def rows(root):
        return pa.concat_tables(pq.read_table(p) for p in sorted(root.glob("*.parquet"))).sort_by("sample_id")
    assert rows(got).equals(rows(want)), f"{got}: rows differ from {want}"


def workflow(canon: str, out: str, extractor: str) -> dict:
    # batch_size == shard rows: every actor call gets the same rows in any run (bit-identical floats)
    return {"datasets": [{"name": "images", "path": canon, "modalities": ["image"]}],
            "features": {"image": {"extractor": extractor, "size": 32, "batch_size": 4}},
            "output": {"path": out}}


def raylets(sid: int, gpu: bool) -> list[int]:
    """The worker nodes' raylets of the cluster, GPU nodes' or CPU-only nodes'."""
    out = []
    for pid in cluster_pids(sid):
        cmd = cmdline(pid)
        if "/raylet " in cmd and "static_resource_list=" in cmd and ",CPU,2," in cmd and (",GPU," in cmd) == gpu:
            out.append(pid)
    return out


def actors_on(raylet: int, old: frozenset = frozenset()) -> int:
    return sum("_PoolActor" in cmdline(p) for p in child_pids(raylet) if p not in old)


def pool_actors() -> frozenset:
    return frozenset(int(d) for d in os.listdir("/proc") if d.isdigit() and "_PoolActor" in cmdline(int(d)))


def wait_and_kill(moment: str, sid: int, out: str, gpu: bool, proc: subprocess.Popen, before: set[int]) -> dict:
    """Wait for ``moment``, SIGKILL the chosen raylet; what was killed when."""
    t0, old = time.time(), pool_actors()
    while proc.poll() is None:
        nodes = raylets(sid, gpu)
        markers = len(glob.glob(out + "/_shards/*.json"))
        victim = None
        if moment == "node":
            fresh = [r for r in nodes if r not in before]
            victim = fresh[0] if fresh else (nodes[0] if nodes and time.time() - t0 > 20 else None)
        elif moment.startswith("actor"):
            hosting = [r for r in nodes if actors_on(r, old)]
            if hosting:
                if moment == "actor+1s":
                    time.sleep(1)
                victim = hosting[0]
        elif markers >= int(moment[1:]):
            victim = max(nodes, key=actors_on) if nodes else None
        if victim:
            info = {"at_s": round(time.time() - t0, 1), "markers": markers, "actors": actors_on(victim, old),
                    "fresh_node": victim not in before}
            os.kill(victim, signal.SIGKILL)
            return info
        time.sleep(0.05)
    return {"missed": True}


def run_one(client: dict, sid: int, root: str, spec: str, n: int) -> dict:
    extractor, moment = spec.split(":") if ":" in spec else ("cnn", spec)
    out = f"{root}/run{n}-{extractor}-{moment}"
    env = {**client, "PYTHONPATH": str(TESTS.parent)}
    before = set(raylets(sid, extractor == "cnn"))
    wf = (workflow(root + "/canon", out, extractor) if extractor != "ingest" else
          {"ingest": root + "/corpus/imagenet", "output": {"path": out}})
    t0 = time.time()
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(wf)],
                                env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        kill = wait_and_kill(moment, sid, out, extractor == "cnn", proc, before)
        stdout, _ = proc.communicate(timeout=600)
    res = {"spec": spec, "rc": proc.returncode, "wall_s": round(time.time() - t0, 1), **kill}
    try:
        if extractor == "ingest":
            same_rows(Path(out), Path(f"{root}/canon"))
        else:
            assert_same_output(Path(out), Path(f"{root}/ref-{extractor}"))
        res["same_output"] = True
    except AssertionError as e:
        res["same_output"] = str(e)[:200]
    err = Path(out + ".log").read_text()
    res["traceback"] = "Traceback" in err
    res["reruns"] = [ln for ln in err.splitlines() if "running them again" in ln or "lost" in ln][:4]
    res["log_lines"] = len([ln for ln in err.splitlines() if ln.strip()])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--moments", default=DEFAULT)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    root = a.out or tempfile.mkdtemp(prefix="mmnl", dir="/tmp")
    if not os.path.exists(root + "/ref-hog"):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(PYTHONPATH=str(TESTS.parent), RAY_TMPDIR=tempfile.mkdtemp(prefix="mmnp", dir="/tmp"))
        subprocess.run([sys.executable, "-c", PREPARE, root, json.dumps(workflow("CANON", "OUT", "EXT"))
                        .replace("CANON", root + "/canon")], env=env, check=True)
    results = []
    with start_fake_cluster() as (client, info):
        for n, spec in enumerate(a.moments.split(",")):
            res = run_one(client, info["sid"], root, spec, n)
            results.append(res)
            print(json.dumps(res), flush=True)
    ok = [r for r in results if r["rc"] == 0 and r["same_output"] is True and not r.get("missed")]
    print(f"TALLY {len(ok)}/{len(results)} passed (exit 0, same output as an undisturbed run); folder {root}")


if __name__ == "__main__":
    main()
