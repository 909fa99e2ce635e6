"""Reliability on a real local Ray: killed workers, a lost node, killed drivers, hostile input.

1. worker fault: the model actor (image cnn) SIGKILLs itself mid-job -> same output as undisturbed;
2. node fault: a 3-node ``ray.cluster_utils.Cluster`` loses the worker node hosting the model actor;
3. driver fault: ``mmbatch preprocess`` SIGKILLed after a shard commit, rerun -> complete, nothing
   recomputed that was committed, no partial file ever visible;
4. the same for ``mmbatch ingest``;
5. hostile media through ingest + preprocess: every row fused with finite features or quarantined
   with a reason, counts reconcile end to end, exit code 3.

Faults 1, 2 and the killed drivers run in subprocesses with their own Ray (the test session's
shared Ray cannot lose a node or a driver), each with a private RAY_TMPDIR; the undisturbed
references and the reruns after a killed driver run on the shared Ray. Helpers: tests/faults.py.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from corpora_ingest import flac, jpeg, png_bomb, write
from faults import (
    ReadableWatcher,
    assert_same_output,
    cmyk_jpeg,
    kill_when,
    mmbatch_exe,
    png_bytes,
    png_header_only,
    private_ray_tmpdir,
    read_tables,
    run_cmd,
    summary_counts,
    visible_parquet,
    wav_bytes,
)

from mmbatch.engine.manifest import Manifest
from mmbatch.config import workflow_from_dict
from mmbatch.preprocess.fusion import embeddings_to_numpy
from mmbatch.ingest.run import IngestOptions, run_ingest
from mmbatch.preprocess import run_preprocess

pytestmark = pytest.mark.slow          # the fast tier (`pytest -m "not slow"`) skips this module

SHARD_ROWS = 4          # canonical shards of at most 4 rows: 12 or more per 48-row dataset, so kills land between commits
# a killed driver's embedded Ray gets the shared test Ray's 2 CPUs on any machine (ingest shard plans
# depend on the CPU count, and the reruns run on the shared Ray)
TWO_CPUS = {"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2})}


def n_units(*folders: Path) -> int:
    """Preprocess units of canonical folders (their shards here hold one row group each)."""
    return sum(len(list(f.glob("*.parquet"))) for f in folders)


def kill_mid_job(cmd: list[str], markers, out: Path, tmp_path: Path, ray_tmp: str) -> tuple[dict, list]:
    """Run ``cmd`` with its own Ray; SIGKILL it once ``markers()`` finds a commit. Checks that the driver
    and its whole Ray died; returns kill_when's result and the partial files a reader saw meanwhile."""
    watcher = ReadableWatcher(out)
    watcher.start()
    first = kill_when(cmd, markers, tmp_path / "first.log", RAY_TMPDIR=ray_tmp, **TWO_CPUS)
    bad_first = watcher.stop().bad
    assert first["killed"], (tmp_path / "first.log").read_text()[-3000:]
    assert first["processes"] > 3                     # driver + its Ray (gcs, raylet, workers) were tracked ...
    assert first["leftover"] == [], "the killed driver's embedded Ray outlived it"   # ... and died with it
    return first, bad_first


def result_line(stdout: str) -> dict:
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


@pytest.fixture
def ray_tmp():
    """RAY_TMPDIR for the subprocess Rays of one test (see faults.private_ray_tmpdir); removed after."""
    d = private_ray_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def canon(ray_session, tmp_path_factory):
    """Demo ImageNet + LibriSpeech layouts (48 samples each), ingested in 4-row shards."""
    from mmbatch.demo.corpus import write_imagenet, write_librispeech

    root = tmp_path_factory.mktemp("reliability")
    out = root / "canon"
    run_ingest("imagenet", str(write_imagenet(root / "corpus", per_class=12)), str(out / "imagenet"),
               IngestOptions(shard_rows=SHARD_ROWS), echo=False)
    run_ingest("librispeech", str(write_librispeech(root / "corpus", per_class=12)), str(out / "librispeech"),
               IngestOptions(shard_rows=SHARD_ROWS), echo=False)
    return out


def cnn_workflow(canon: Path, out: Path) -> dict:
    # batch_size == shard rows: every actor call gets the same rows in any run, so float results match bit for bit
    return {"datasets": [{"name": "images", "path": str(canon / "imagenet"), "modalities": ["image"]}],
            "features": {"image": {"extractor": "cnn", "size": 32, "batch_size": SHARD_ROWS}},
            "output": {"path": str(out)}}


@pytest.fixture(scope="module")
def cnn_reference(canon, tmp_path_factory):
    """The undisturbed run (shared Ray) every model-actor fault run must reproduce exactly."""
    out = tmp_path_factory.mktemp("cnn_ref")
    s = run_preprocess(workflow_from_dict(cnn_workflow(canon, out)), progress=False)   # actors warn: random init
    assert s.rows_out == 48 and s.shards_processed == n_units(canon / "imagenet")
    return out


# --- 1. node fault ---------------------------------------------------------------------------------
NODE_SCRIPT = r"""
import faulthandler, glob, json, os, sys, threading, time
faulthandler.dump_traceback_later(300, exit=True)   # a hang shows its stacks in the test's failure
sys.path.insert(0, sys.argv[3])
from faults import child_pids, cmdline
from ray.cluster_utils import Cluster
from ray._private import ray_constants

# head (driver only, no CPUs) + two 2-CPU worker nodes: all the work runs on the workers
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
cluster.wait_for_nodes()
from mmbatch.engine.runtime import init_ray
init_ray(address=cluster.address)
import ray
assert ray.cluster_resources()["CPU"] == 4
from mmbatch.config import workflow_from_dict
from mmbatch.preprocess import run_preprocess

wf, out = json.loads(sys.argv[1]), sys.argv[2]
state = {}

def actors_on(node):
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    return sum("_PoolActor" in cmdline(p) for p in child_pids(raylet))

def remove_a_node():
    while not glob.glob(out + "/_shards/*.json"):                  # mid-job: a unit is committed
        time.sleep(0.01)
    state["markers_before"] = len(glob.glob(out + "/_shards/*.json"))
    state["done_before"] = os.path.exists(out + "/_manifest.json")
    hosts = [actors_on(n) for n in workers]
    victim = max(range(2), key=lambda i: hosts[i])                  # the node hosting the model actor(s)
    state["actors_on_victim"] = hosts[victim]
    cluster.remove_node(workers[victim], allow_graceful=False)
    state["removed"] = True

threading.Thread(target=remove_a_node, daemon=True).start()
s = run_preprocess(workflow_from_dict(wf), progress=False)
print("RESULT", json.dumps({**state, "rows_out": s.rows_out, "processed": s.shards_processed,
                            "quarantined": s.quarantined, "reconciles": s.reconciles}), flush=True)
ray.shutdown()          # explicitly: left to atexit, a cluster that lost a node exits with status 1
cluster.shutdown()
"""


def test_lost_worker_node_mid_job_gives_the_exact_output(canon, cnn_reference, tmp_path, ray_tmp):
    out = tmp_path / "out"
    proc = run_cmd([sys.executable, "-c", NODE_SCRIPT, json.dumps(cnn_workflow(canon, out)), str(out),
                    str(Path(__file__).parent)], RAY_TMPDIR=ray_tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = result_line(proc.stdout)
    assert res.get("removed"), res
    n = n_units(canon / "imagenet")
    assert res["done_before"] is False and 1 <= res["markers_before"] < n        # the node died mid-job
    assert res["actors_on_victim"] >= 1                                           # ... with a model actor on it
    assert (res["rows_out"], res["processed"], res["quarantined"], res["reconciles"]) == (48, n, 0, True)
    assert_same_output(out, cnn_reference)


# --- 2. worker fault -------------------------------------------------------------------------------
WORKER_SCRIPT = r"""
import json, sys
import ray
from mmbatch.engine.runtime import THREAD_ENV
# test-only fault hook (tests/fault_hooks.py) in every worker of this job's own Ray
ray.init(address="local", num_cpus=2, include_dashboard=False,
         runtime_env={"worker_process_setup_hook": "fault_hooks.kill_nth_unit", "env_vars": dict(THREAD_ENV)})
from mmbatch.config import workflow_from_dict
from mmbatch.preprocess import run_preprocess
s = run_preprocess(workflow_from_dict(json.loads(sys.argv[1])), progress=False)
print("RESULT", json.dumps({"rows_out": s.rows_out, "processed": s.shards_processed, "skipped": s.shards_skipped,
                            "quarantined": s.quarantined, "reconciles": s.reconciles}))
"""


def with_fault_hooks(**env) -> dict:
    """Environment for a subprocess whose Ray workers load tests/fault_hooks.py."""
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, **env}


def test_killed_model_actor_is_replaced_and_output_is_unchanged(canon, cnn_reference, tmp_path, ray_tmp):
    """A unit worker holding the CNN SIGKILLs itself at its 3rd unit (test hook, tests/fault_hooks.py);
    the pool hands the unit to a live worker and replaces the dead one; the output equals the undisturbed run."""
    from fault_hooks import KILL_UNIT_ENV

    flag = tmp_path / "kill-actor"
    flag.write_text("3")
    out = tmp_path / "out"
    proc = run_cmd([sys.executable, "-c", WORKER_SCRIPT, json.dumps(cnn_workflow(canon, out))],
                   **with_fault_hooks(**{KILL_UNIT_ENV: str(flag), "RAY_TMPDIR": ray_tmp}))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert not flag.exists(), "the fault never fired"
    res = result_line(proc.stdout)
    assert res == {"rows_out": 48, "processed": n_units(canon / "imagenet"), "skipped": 0, "quarantined": 0,
                   "reconciles": True}
    assert_same_output(out, cnn_reference)


def test_killed_extract_actor_is_replaced_and_output_is_unchanged(canon, tmp_path, ray_tmp):
    """Model-free extractors: a unit worker SIGKILLs itself at its 2nd unit; a new worker replaces it and
    retries the unit; same output, no duplicate rows, no partial file."""
    from fault_hooks import KILL_UNIT_ENV

    wf = {"datasets": [{"name": "speech", "path": str(canon / "librispeech")}], "output": {"path": ""}}
    ref = tmp_path / "ref"
    run_preprocess(workflow_from_dict({**wf, "output": {"path": str(ref)}}), progress=False)
    flag = tmp_path / "kill-actor"
    flag.write_text("2")
    out = tmp_path / "out"
    proc = run_cmd([sys.executable, "-c", WORKER_SCRIPT, json.dumps({**wf, "output": {"path": str(out)}})],
                   **with_fault_hooks(**{KILL_UNIT_ENV: str(flag), "RAY_TMPDIR": ray_tmp}))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert not flag.exists(), "the fault never fired"
    res = result_line(proc.stdout)
    assert res == {"rows_out": 48, "processed": n_units(canon / "librispeech"), "skipped": 0, "quarantined": 0,
                   "reconciles": True}
    assert_same_output(out, ref)


# --- 3. driver fault: preprocess -----------------------------------------------------------------
def paired_workflow(canon: Path, out: Path) -> dict:
    return {
        "datasets": [
            {"name": "images", "path": str(canon / "imagenet"), "modalities": ["image"]},
            {"name": "speech", "path": str(canon / "librispeech"), "modalities": ["audio", "text"],
             "label_column": "speaker"},
        ],
        "features": {"image": {"extractor": "hog", "size": 32, "batch_size": SHARD_ROWS},
                     "audio": {"batch_size": SHARD_ROWS}, "text": {"dim": 64}},
        "pairing": {"by": "label", "primary": "images", "seed": 0},
        "output": {"path": str(out)},
    }


def _mtimes(paths) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in paths}


def test_killed_preprocess_driver_resumes_without_recomputing(canon, tmp_path, ray_tmp, capsys):
    from mmbatch.cli import main

    ref = tmp_path / "ref"
    run_preprocess(workflow_from_dict(paired_workflow(canon, ref)), progress=False)

    out = tmp_path / "out"
    wf_file = tmp_path / "wf.yaml"
    wf_file.write_text(yaml.safe_dump(paired_workflow(canon, out)))
    args = ["preprocess", str(wf_file)]
    cmd = mmbatch_exe() + args
    markers = lambda: sorted(out.rglob("_shards/*.json"))  # noqa: E731  (partner features and fused units)

    first, bad_first = kill_mid_job(cmd, markers, out, tmp_path, ray_tmp)
    assert not (out / "_manifest.json").exists()                         # killed mid-job
    committed = markers()                                                 # only the driver writes these
    n = n_units(canon / "imagenet", canon / "librispeech")
    assert 1 <= len(first["ready"]) <= len(committed) < n
    feature_files = [m.parent.parent / (m.stem + ".parquet") for m in committed]
    before = _mtimes(feature_files)

    # the same command again (in this process, on the warm shared Ray: the resume logic is all on disk)
    watcher = ReadableWatcher(out)
    watcher.start()
    assert main(args) == 0
    watcher.stop()

    # committed shards were skipped, not recomputed; every other shard was processed once
    counts = summary_counts(capsys.readouterr().out)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert counts == {"processed": manifest["shards"]["processed"], "skipped": manifest["shards"]["skipped"]}
    assert counts["processed"] + counts["skipped"] == n
    assert counts["skipped"] == len(committed) >= len(first["ready"])
    assert _mtimes(feature_files) == before

    # complete, no duplicates, value for value the output of an undisturbed run
    tables = read_tables(out)
    ids = [s for t in tables.values() for s in t.column("sample_id").to_pylist()]
    assert len(ids) == len(set(ids)) == manifest["rows"] == 48
    assert_same_output(out, ref)
    assert not list(out.rglob("_staging")) and not list(out.rglob("_tmp/*"))   # a killed run's pieces removed
    # no partial file was ever visible (data, quarantine, committed features or staged pieces)
    assert bad_first == [] and watcher.bad == []
    assert any(not p.startswith("_") for p in watcher.checked)          # the watcher did see the outputs


# --- 4. driver fault: ingest ---------------------------------------------------------------------
def test_killed_ingest_driver_resumes_without_recomputing(ray_session, tmp_path, ray_tmp, capsys):
    from mmbatch.cli import main
    from mmbatch.demo.corpus import write_imagenet

    corpus = write_imagenet(tmp_path / "corpus", per_class=10, seed=5)           # 40 images
    ref = tmp_path / "ref"
    run_ingest("imagenet", str(corpus), str(ref), IngestOptions(shard_rows=2), echo=False)

    out = tmp_path / "out"
    args = ["ingest", "imagenet", str(corpus), "--out", str(out), "--shard-rows", "2"]
    cmd = mmbatch_exe() + args
    markers = lambda: sorted(out.glob("_shards/*.json"))  # noqa: E731

    first, bad_first = kill_mid_job(cmd, markers, out, tmp_path, ray_tmp)
    assert not (out / "_manifest.json").exists()
    committed = markers()              # written by the read tasks: counted once the whole job is dead
    assert 1 <= len(first["ready"]) <= len(committed) < 20
    data_files = [out / f"{m.stem}.parquet" for m in committed]
    before = _mtimes(data_files)

    watcher = ReadableWatcher(out)
    watcher.start()
    assert main(args) == 0                          # the same command again, in this process
    watcher.stop()

    counts = summary_counts(capsys.readouterr().out)
    manifest = Manifest.read(str(out)).to_dict()
    assert counts == {"total": manifest["shards_total"], "skipped": manifest["shards_skipped"]}
    assert counts["total"] == 20 and counts["skipped"] == len(committed)
    assert _mtimes(data_files) == before

    tables = read_tables(out)
    ids = [s for t in tables.values() for s in t.column("sample_id").to_pylist()]
    assert len(ids) == len(set(ids)) == manifest["ingested"] == manifest["rows_in"] == 40
    assert_same_output(out, ref)
    assert not list(out.rglob("_tmp/*"))
    assert bad_first == [] and watcher.bad == []
    assert watcher.checked


# --- 5. hostile input, end to end --------------------------------------------------------------
def hostile_corpus(root: Path) -> tuple[Path, Path, dict]:
    """A manifest corpus of hostile media plus a LibriSpeech folder with a non-UTF-8 transcript.

    Returns (manifest folder, LibriSpeech folder, {sample_id: [expected outcome per row]}), an outcome
    being "fused" (with finite features) or (stage, reason) of its quarantine row."""
    from mmbatch.demo.corpus import make_audio, make_image
    from mmbatch.ingest.sources import sphere

    m = root / "manifest"
    rng = np.random.default_rng(7)
    bgr = make_image(1, rng, 64, 48)
    big = jpeg(seed=3, w=320, h=240)
    tone = make_audio(0, np.random.default_rng(1), seconds=0.5)
    tone8k = make_audio(1, np.random.default_rng(2), seconds=0.5, sr=8000)
    full_flac = flac(seed=4, seconds=1.0)
    files = {
        "ok.jpg": jpeg(seed=1),
        "trunc.jpg": big[: len(big) // 2],                                   # header intact, data cut
        "zero.jpg": b"",
        "bomb.png": png_bomb(60000, 60000),                                  # declares 3.6 G pixels
        "png_named.JPEG": png_bytes(bgr),
        "cmyk.jpg": cmyk_jpeg(),
        "png16.png": png_bytes(bgr.astype(np.uint16) * 257),
        "alpha.png": png_bytes(np.dstack([bgr, np.full(bgr.shape[:2], 100, np.uint8)])),
        "badpng.png": png_header_only(40, 30, b"not zlib data at all"),      # header fine, pixels corrupt
        "dup_a.jpg": jpeg(seed=11), "dup_b.jpg": jpeg(seed=12),
        "ok.flac": flac(seed=1),
        "trunc.flac": full_flac[: len(full_flac) // 2],
        "short.wav": wav_bytes(tone[:100], 16000),                           # < one 400-sample window
        "zeros.flac": wav_bytes(np.zeros(8000, np.float32), 16000, "FLAC"),
        "tone8k.wav": wav_bytes(tone8k, 8000),                               # resampled to 16 kHz
        "shorten.sph": sphere.encode(tone, 16000, sample_coding="pcm,embedded-shorten-v2.00"),
    }
    for name, data in files.items():
        write(m / "media" / name, data)
    write(root / "outside.jpg", jpeg(seed=2))
    rows = [  # sample_id, image_path, audio_path, text, expected
        ("img_ok", "ok.jpg", None, None, "fused"),
        ("img_trunc", "trunc.jpg", None, None, ("preprocess", "image:corrupt_image")),
        ("img_zero", "zero.jpg", None, None, ("ingest", "empty_file")),
        ("img_bomb", "bomb.png", None, None, ("ingest", "decompression_bomb")),
        ("img_png_named_jpeg", "png_named.JPEG", None, None, "fused"),
        ("img_cmyk", "cmyk.jpg", None, None, "fused"),
        ("img_png16", "png16.png", None, None, "fused"),
        ("img_alpha", "alpha.png", None, None, "fused"),
        ("img_badpng", "badpng.png", None, None, ("preprocess", "image:corrupt_image")),
        ("img_escape", "../outside.jpg", None, None, ("ingest", "path_outside_root")),
        ("img_dup", "dup_a.jpg", None, None, "fused"),
        ("img_dup", "dup_b.jpg", None, None, ("ingest", "duplicate_id")),
        ("aud_ok", None, "ok.flac", "a clean clip", "fused"),
        ("aud_trunc", None, "trunc.flac", "cut in half", ("preprocess", "audio:corrupt_audio")),
        ("aud_short", None, "short.wav", "very short", "fused"),
        ("aud_zeros", None, "zeros.flac", "silence", "fused"),
        ("aud_8k", None, "tone8k.wav", "eight kilohertz", "fused"),
        ("aud_shorten", None, "shorten.sph", "compressed sphere", ("ingest", "sphere_shorten")),
        ("txt_only", None, None, "only words here", "fused"),
    ]
    lines = ["sample_id,image_path,audio_path,text,label,split"]
    expected: dict = {}
    for i, (sid, img, aud, text, exp) in enumerate(rows):
        path = lambda p: "" if p is None else (p if p.startswith("..") else f"media/{p}")  # noqa: E731
        lines.append(f"{sid},{path(img)},{path(aud)},{text or ''},{i % 2},train")
        expected.setdefault(sid, []).append(exp)
    write(m / "manifest.csv", "\n".join(lines) + "\n")

    libri = root / "LibriSpeech"
    d = libri / "dev-clean" / "84" / "121"
    write(libri / "SPEAKERS.TXT", ";ID|SEX|SUBSET|MINUTES|NAME\n84 | F | dev-clean | 8.0 | A\n")
    for i in range(3):
        write(d / f"84-121-{i:04d}.flac", flac(seed=20 + i))
    write(d / "84-121.trans.txt", b"84-121-0000 GOOD ONE\n84-121-0001 CAF\xe9 AU LAIT\n84-121-0002 GOOD TWO\n")
    expected.update({"84-121-0000": ["fused"], "84-121-0001": [("ingest", "transcript_not_utf8")],
                     "84-121-0002": ["fused"]})
    return m, libri, expected


def _quarantine(folder: Path) -> list[dict]:
    return [r for p in visible_parquet(folder / "quarantine") for r in pq.read_table(p).to_pylist()]


def test_hostile_input_end_to_end(ray_session, tmp_path):
    from mmbatch.cli import main
    from mmbatch.config import AudioFeatures, ImageFeatures
    from mmbatch.preprocess.features.image import decode_image, resize_center_crop
    from mmbatch.preprocess.features.registry import build_extractor

    mdir, libri, expected = hostile_corpus(tmp_path / "in")
    n_manifest = sum(len(v) for k, v in expected.items() if not k.startswith("84-"))
    ing = {"hostile": tmp_path / "canon" / "hostile", "speech": tmp_path / "canon" / "speech"}
    assert main(["ingest", "manifest", str(mdir), "--out", str(ing["hostile"]), "--shard-rows", "5"]) == 3
    assert main(["ingest", "librispeech", str(libri), "--out", str(ing["speech"])]) == 3
    out = tmp_path / "fused"
    wf = {"datasets": [{"name": "hostile", "path": str(ing["hostile"])},
                       {"name": "speech", "path": str(ing["speech"])}],
          "features": {"image": {"size": 32}, "text": {"dim": 32}},
          "output": {"path": str(out)}}
    wf_file = tmp_path / "wf.yaml"
    wf_file.write_text(yaml.safe_dump(wf))
    assert main(["preprocess", str(wf_file)]) == 3             # something was quarantined at decode

    # where did every input row end up? (a duplicate id legitimately appears twice)
    where: dict[str, list] = {}
    fused = {}
    for name, t in read_tables(out).items():
        for r in t.to_pylist():
            where.setdefault(r["sample_id"], []).append("fused")
            fused[r["sample_id"]] = r
    for stage, folder in (("ingest", ing["hostile"]), ("ingest", ing["speech"]), ("preprocess", out)):
        for r in _quarantine(folder):
            assert r["reason"] and r["stage"] == stage, r
            where.setdefault(r["sample_id"], []).append((stage, r["reason"]))
    assert set(where) == set(expected)
    for sid, exp in expected.items():
        assert sorted(map(str, where[sid])) == sorted(map(str, exp)), (sid, where[sid], exp)
    # one canonical shard lost every row at ingest (bomb + shorten ...): preprocess must still commit it
    assert any(t.num_rows == 0 for t in read_tables(ing["hostile"]).values())

    # counts reconcile end to end, per dataset: input rows = fused + quarantined at ingest + at preprocess
    pre = json.loads((out / "_manifest.json").read_text())
    pre_q = Counter(f.split("--")[0] for f in os.listdir(out / "quarantine") if f.endswith(".parquet")
                    for _ in range(pq.read_metadata(out / "quarantine" / f).num_rows))
    for name, n_in in (("hostile", n_manifest), ("speech", 3)):
        im = Manifest.read(str(ing[name])).to_dict()
        n_fused = sum(t.num_rows for f, t in read_tables(out).items() if f.startswith(name + "--"))
        assert im["rows_in"] == n_in == n_fused + im["quarantined"] + pre_q[name], (name, im, pre_q)
    assert pre["rows_in"] == pre["features_rows"] + pre["quarantined"] and pre["rows"] == pre["features_rows"]
    assert pre["quarantined"] == sum(pre_q.values()) >= 1

    # every fused row: finite features; present modalities flagged
    meta_dims = pre["metadata"]["dims"]
    for name, t in read_tables(out).items():
        for col, dim in [(f"{m}_emb", d) for m, d in meta_dims.items()] + [("fused", pre["metadata"]["fused_dim"])]:
            x = embeddings_to_numpy(t.column(col), dim)
            assert np.isfinite(x).all(), (name, col)
    for sid in ("aud_short", "aud_zeros", "aud_8k", "aud_ok"):
        assert fused[sid]["has_audio"] and np.abs(np.asarray(fused[sid]["audio_emb"])).sum() > 0, sid
    for sid in ("img_png_named_jpeg", "img_cmyk", "img_png16", "img_alpha", "img_ok"):
        assert fused[sid]["has_image"], sid
    assert fused["txt_only"]["has_text"] and not fused["txt_only"]["has_image"]

    # "handled correctly": the odd images decode to PIL's RGB rendering of the same file ...
    import io

    from PIL import Image
    media = mdir / "media"
    for f in ("png_named.JPEG", "cmyk.jpg", "png16.png", "alpha.png"):
        data = (media / f).read_bytes()
        want = resize_center_crop(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), 32).astype(float)
        assert np.abs(decode_image(data, 32).astype(float) - want).mean() < 2.0, f
    canon_rows = {r["sample_id"]: r for t in read_tables(ing["hostile"]).values() for r in t.to_pylist()}
    assert json.loads(canon_rows["img_png_named_jpeg"]["extra"])["image_format"] == "PNG"
    assert canon_rows["aud_8k"]["sample_rate"] == 8000
    # ... the 8 kHz clip is resampled to 16 kHz, and the Ray features equal a plain loop's
    aex = build_extractor("audio", AudioFeatures())
    dec = aex.decode([(media / "tone8k.wav").read_bytes()])
    assert dec.errors == [None] and abs(len(dec.values[0]) - 8000) <= 16
    iex = build_extractor("image", ImageFeatures(size=32))
    for sid, f in (("img_cmyk", "cmyk.jpg"), ("img_png16", "png16.png"), ("img_ok", "ok.jpg"),
                   ("img_dup", "dup_a.jpg")):                      # the first duplicate (path order) is kept
        want, _ = iex.extract([(media / f).read_bytes()])
        np.testing.assert_array_equal(np.asarray(fused[sid]["image_emb"], np.float32), want[0])
    for sid, f in (("aud_8k", "tone8k.wav"), ("aud_zeros", "zeros.flac"), ("aud_short", "short.wav")):
        want, _ = aex.extract([(media / f).read_bytes()])
        np.testing.assert_allclose(np.asarray(fused[sid]["audio_emb"], np.float32), want[0], rtol=0, atol=0)
