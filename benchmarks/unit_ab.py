"""Per-sample CPU of mmbatch's preprocess unit against the Pool script's chunk function.

    python -m benchmarks.unit_ab --samples 2000 --rounds 4

One Ray actor per core, all busy the whole time (the load of a real job), each running the
same row groups alternately through mmbatch's ``UnitWorker`` (read, decode + embed, fuse, write
the final file) and through ``benchmarks.run._pool_chunk`` (read, decode + embed, return the
embeddings), unit by unit, the order flipping every pair. Both see the same load and the same
drifts of the VM's speed, which whole-job comparisons do not. Prints the cumulative CPU ms per
sample of each after every round (the process, and its computing thread alone).

The job and its units are taken from ``run_preprocess`` itself (its call to the actor pool is
intercepted before any actor starts), so the unit is exactly what a real run executes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")


class _Captured(Exception):
    pass


def capture_job(canon: Path, out: Path) -> tuple:
    """(make_worker, job, units) of a preprocess of ``canon``, without running it."""
    import mmbatch.engine.units as pool
    from mmbatch.config import workflow_from_dict
    from mmbatch.preprocess import run_preprocess

    got = {}

    def intercept(make_worker, job, units, on_result, **kw):
        got.update(make_worker=make_worker, job=job, units=list(units))
        raise _Captured

    saved = pool.run_units
    pool.run_units = intercept
    shutil.rmtree(out, ignore_errors=True)
    try:
        run_preprocess(workflow_from_dict({"datasets": [{"name": "bench", "path": str(canon)}],
                                           "output": {"path": str(out)}}), progress=False)
    except _Captured:
        pass
    finally:
        pool.run_units = saved
    return got["make_worker"], got["job"], got["units"]


class Both:
    """An actor holding both ways of doing a unit."""

    def __init__(self, make_worker, job):
        from benchmarks import run as bench

        self.chunk, self.unit = bench._pool_chunk, make_worker(job)

    def run(self, unit, way: str) -> tuple[str, int, float, float]:
        p0, t0 = time.process_time(), time.thread_time()
        n = self.unit(unit).rows_in if way == "unit" else len(self.chunk((unit.path, unit.row_group))[0])
        return way, n, time.process_time() - p0, time.thread_time() - t0


def main() -> None:
    import ray

    from benchmarks.run import prepare
    from mmbatch.engine.runtime import init_ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--small", action="store_true", help="the AV-MNIST-shaped corpus")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--data", default="/tmp/mmbatch-bench")
    ap.add_argument("--out", help="write the final figures here as JSON")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    data = prepare(args.samples, args.data, cores, "small" if args.small else "large")
    make_worker, job, units = capture_job(data / "canonical", data / "out-unit-ab")
    init_ray(num_cpus=cores)
    actors = [ray.remote(num_cpus=1)(Both).remote(make_worker, job) for _ in range(cores)]
    ray.get([a.run.remote(units[0], w) for a in actors for w in ("unit", "chunk")])     # warm both
    total = {w: {"rows": 0, "process_s": 0.0, "thread_s": 0.0} for w in ("unit", "chunk")}
    per_sample = {}
    for rnd in range(args.rounds):
        refs = []
        for i, u in enumerate(units):
            ways = ("unit", "chunk") if (i // cores + rnd) % 2 == 0 else ("chunk", "unit")
            refs += [actors[i % cores].run.remote(u, w) for w in ways]
        for way, n, p, t in ray.get(refs):
            total[way]["rows"] += n
            total[way]["process_s"] += p
            total[way]["thread_s"] += t
        per_sample = {w: {"process_ms": round(1000 * v["process_s"] / v["rows"], 3),
                          "thread_ms": round(1000 * v["thread_s"] / v["rows"], 3)} for w, v in total.items()}
        print(f"round {rnd + 1}: CPU ms per sample, cumulative: {json.dumps(per_sample)}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"samples": args.samples, "rounds": args.rounds,
                                              "units": len(units), "per_sample": per_sample}, indent=2))


if __name__ == "__main__":
    main()
