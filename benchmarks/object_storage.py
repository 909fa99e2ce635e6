"""S3 against local disk: the same preprocess job reading canonical Parquet from, and writing fused Parquet
to, a local folder or a local S3-compatible server (moto's ThreadedMotoServer, in this process).

    python -m benchmarks.object_storage --samples 400 --repeat 2

The corpus is the large-item one of ``benchmarks.run`` (500x375 JPEG + 10-15 s FLAC + transcript),
ingested once on disk and uploaded as is. Each run is a child process with its own embedded Ray
(``benchmarks.run.Monitor``: wall time, peak PSS of the whole tree); a sampler thread also records
each Ray worker's peak RSS (the unit workers read, decode, embed and write). Local and S3 alternate
round by round; the table gives the paired S3/local ratios. moto is a single-threaded Python
server on the same cores: its absolute speed means little, the ratio is an upper bound for a real
store's overhead on this machine. Writes JSON + Markdown under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
from pathlib import Path

BUCKET = "mmbatch-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerPeaks(threading.Thread):
    """Peak RSS of each Ray worker process (``ray::`` command lines) of this process tree."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.peaks, self._halt = interval, {}, threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._halt.wait(self.interval):
            for p in me.children(recursive=True):
                try:
                    cmd = p.cmdline()
                    if cmd and cmd[0].startswith("ray::") and "IDLE" not in cmd[0]:
                        self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    pass

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return self.peaks


def child(where: str, canon: str, out: str, cores: int) -> dict:
    from benchmarks.run import Monitor, run_mmbatch
    from mmbatch.engine.runtime import init_ray

    init_ray(num_cpus=cores)
    peaks = WorkerPeaks()
    peaks.start()
    with Monitor() as mon:
        res = run_mmbatch(canon, out)
    worker = peaks.stop()
    return {"where": where, "seconds": round(mon.seconds, 2), "rows_out": res["rows_out"],
            "tree_peak_pss_mb": round(mon.peak / 2**20, 1),
            "worker_peak_rss_mb": round(max(worker.values()) / 2**20, 1) if worker else None,
            "read_busy_s": res["stages"].get("read", {}).get("busy_seconds"),
            "write_busy_s": res["stages"].get("write", {}).get("busy_seconds")}


def spawn(where: str, canon: str, out: str, cores: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.object_storage", "--child", where, "--canon", canon,
           "--target", out, "--cores", str(cores)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{where} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=2, help="rounds; local and S3 alternate, first one flips")
    ap.add_argument("--data", default="/tmp/mmbatch-bench")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--child", choices=["local", "s3"])
    ap.add_argument("--canon")
    ap.add_argument("--target")
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.canon, a.target, a.cores)), flush=True)
        return

    import logging
    import shutil

    from moto.server import ThreadedMotoServer

    from benchmarks.run import prepare

    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    data = prepare(a.samples, a.data, a.cores)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import s3fs
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    fs.put(str(data / "canonical"), f"{BUCKET}/canonical", recursive=True)
    canon = {"local": str(data / "canonical"), "s3": f"s3://{BUCKET}/canonical"}
    runs: list[dict] = []
    try:
        for r in range(a.repeat):
            for where in (("local", "s3") if r % 2 == 0 else ("s3", "local")):
                target = f"s3://{BUCKET}/out-{r}" if where == "s3" else str(data / f"out-local-{r}")
                shutil.rmtree(target, ignore_errors=True)
                res = spawn(where, canon[where], target, a.cores)
                res["round"] = r
                runs.append(res)
                print(json.dumps(res), flush=True)
    finally:
        server.stop()
    ratios = {}
    for key in ("seconds", "worker_peak_rss_mb", "tree_peak_pss_mb"):
        per_round = [next(x[key] for x in runs if x["round"] == r and x["where"] == "s3")
                     / next(x[key] for x in runs if x["round"] == r and x["where"] == "local")
                     for r in range(a.repeat)]
        ratios[key] = {"median": round(statistics.median(per_round), 3), "per_round": [round(x, 3) for x in per_round]}
    result = {"samples": a.samples, "cores": a.cores, "runs": runs, "s3_over_local": ratios,
              "note": "moto (single-threaded Python server) on the same machine; shared, loaded VM unless stated"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"object-storage-{a.samples}.json").write_text(json.dumps(result, indent=2))
    md = [f"# S3 (moto on loopback) against local disk: preprocess of {a.samples} large items, {a.cores} cores", "",
          "| round | where | seconds | samples/s | worker peak RSS MB | tree peak PSS MB |", "|---|---|---|---|---|---|"]
    for x in runs:
        md.append(f"| {x['round']} | {x['where']} | {x['seconds']} | {x['rows_out'] / x['seconds']:.1f} | "
                  f"{x['worker_peak_rss_mb']} | {x['tree_peak_pss_mb']} |")
    md += ["", "S3 / local (median of paired rounds): " + ", ".join(
        f"{k} {v['median']} ({v['per_round']})" for k, v in ratios.items())]
    (out / f"object-storage-{a.samples}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
