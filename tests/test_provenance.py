"""Outputs you can trust: fingerprints from the whole job, no stale manifest, readers refuse mixed data.

On a real local Ray and real files: an image dataset (ResNet-18 with a weights file, the primary)
paired with a speech dataset (log-mel audio + hashed text, the partner). Each test changes one thing
and checks, from the units' commit markers, exactly which units were computed again.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmbatch.engine import storage
from mmbatch.config import workflow_from_dict
from mmbatch.errors import UsageError
from mmbatch.ingest.run import IngestOptions, run_ingest
from mmbatch.preprocess import run_preprocess
from mmbatch.engine.provenance import check_fused, content_digest

SHARD_ROWS = 4


@pytest.fixture(scope="module")
def corpus(ray_session, tmp_path_factory):
    """(source folders, canonical folders): 16 images and 16 utterances, 4-row shards."""
    from mmbatch.demo.corpus import write_imagenet, write_librispeech

    root = tmp_path_factory.mktemp("provenance")
    src = {"imagenet": write_imagenet(root / "corpus", per_class=4),
           "librispeech": write_librispeech(root / "corpus", per_class=4)}
    canon = root / "canon"
    for kind, path in src.items():
        run_ingest(kind, str(path), str(canon / kind), IngestOptions(shard_rows=SHARD_ROWS), echo=False)
    return src, canon


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    import torch

    from mmbatch.preprocess.features.resnet import build_resnet

    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.manual_seed(0)
    torch.save(build_resnet("resnet18").state_dict(), path)
    return path


def workflow(canon: Path, out: Path, weights: Path, **features) -> dict:
    feats = {"image": {"extractor": "cnn", "size": 32, "weights": str(weights), "batch_size": SHARD_ROWS},
             "text": {"dim": 64}, "batch_size": SHARD_ROWS}
    for k, v in features.items():
        feats[k] = {**feats[k], **v} if isinstance(v, dict) else v
    return {"datasets": [{"name": "images", "path": str(canon / "imagenet"), "modalities": ["image"]},
                         {"name": "speech", "path": str(canon / "librispeech"), "modalities": ["audio", "text"],
                          "label_column": "speaker"}],
            "features": feats, "pairing": {"by": "label", "primary": "images", "seed": 0},
            "output": {"path": str(out)}}


def markers(out: Path) -> dict[str, int]:
    """{unit: its marker's mtime}: primary (fused) units and the partner's feature units."""
    return {f"{p.parent.parent.relative_to(out)}/{p.stem}": p.stat().st_mtime_ns for p in out.rglob("_shards/*.json")}


def redone(before: dict, after: dict) -> set[str]:
    assert set(before) == set(after)
    return {u for u in after if after[u] != before[u]}


def run(wf: dict):
    return run_preprocess(workflow_from_dict(wf), progress=False)


def primary(units) -> set:
    return {u for u in units if u.startswith("./")}


def partner(units) -> set:
    return {u for u in units if u.startswith("_features/")}


def test_each_change_alone_redoes_exactly_the_units_it_affects(corpus, weights, tmp_path):
    """One output folder, changed one thing at a time (each step against the run before it)."""
    import os

    import numpy as np
    import torch

    from mmbatch.demo.corpus import encode_jpeg, make_image

    src, canon0 = corpus
    canon = tmp_path / "canon"                  # private copies: this test rewrites them
    shutil.copytree(canon0, canon)
    w = tmp_path / "w.pth"
    shutil.copy(weights, w)
    out = tmp_path / "out"
    wf = workflow(canon, out, w)
    s = run(wf)
    first = markers(out)
    n_primary, n_partner = len(primary(first)), len(partner(first))
    assert s.rows_out == 16 and s.shards_processed == n_primary + n_partner and n_primary >= 4 and n_partner >= 4

    def step(wf) -> set:
        before = markers(out)
        s = run(wf)
        got = redone(before, markers(out))
        assert s.shards_processed == len(got) and s.shards_skipped == len(before) - len(got)
        check_fused(*storage.url_to_fs(str(out)))          # every step leaves files and manifest agreeing
        return got

    # nothing changed -> nothing redone
    assert step(wf) == set()

    # weights rewritten at the same path -> the image (primary) units; the partner's audio/text kept
    sd = torch.load(w, weights_only=True)
    sd["conv1.weight"] = sd["conv1.weight"] * 0.5
    old = content_digest(str(w))
    torch.save(sd, w)
    assert content_digest(str(w)) != old
    assert step(wf) == primary(first)
    meta = json.loads((out / "_manifest.json").read_text())["metadata"]
    assert meta["features"]["image"]["params"]["weights_sha256"] == content_digest(str(w))

    # the same bytes with a new mtime -> nothing
    st = os.stat(w)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert step(wf) == set()

    # features.batch_size (rows per extractor call) -> the CNN's units; log-mel + hashing have no model
    wf = workflow(canon, out, w, batch_size=2)
    assert step(wf) == primary(first)

    # a partner's extractor description -> the partner's units, and every fused unit that pairs them
    wf = workflow(canon, out, w, batch_size=2, text={"dim": 32})
    assert step(wf) == set(first)

    # a UnitJob field no fingerprint lists by hand (the output's row group size) -> both roles write it
    wf["output"]["row_group_size"] = 2
    assert step(wf) == set(first)

    # one source image rewritten -> ingest redoes its shard -> preprocess redoes that shard's unit only
    img = sorted(Path(src["imagenet"]).rglob("*.JPEG"))[0]
    old_bytes = img.read_bytes()
    try:
        img.write_bytes(encode_jpeg(make_image(1, np.random.default_rng(7))))
        ing = run_ingest("imagenet", str(src["imagenet"]), str(canon / "imagenet"),
                         IngestOptions(shard_rows=SHARD_ROWS), echo=False)
    finally:
        img.write_bytes(old_bytes)
    assert ing.shards_total - ing.shards_skipped == 1
    got = step(wf)
    assert len(got) == 1 and got <= primary(first)


# --- 2. a killed rerun leaves no manifest over mixed files ----------------------------------------
@pytest.fixture(scope="module")
def images48(ray_session, tmp_path_factory) -> Path:
    """48 images in shards of at most 4 rows (12 or more units: a kill lands between commits)."""
    from mmbatch.demo.corpus import write_imagenet

    root = tmp_path_factory.mktemp("images48")
    out = root / "canon"
    run_ingest("imagenet", str(write_imagenet(root / "corpus", per_class=12)), str(out), IngestOptions(shard_rows=4),
               echo=False)
    return out


def hog_workflow(canon: Path, out: Path, size: int = 32) -> dict:
    return {"datasets": [{"name": "images", "path": str(canon), "modalities": ["image"]}],
            "features": {"image": {"extractor": "hog", "size": size}}, "output": {"path": str(out)}}


def unit_fps(out: Path) -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["fingerprint"] for p in out.glob("_shards/*.json")}


def test_killed_rerun_with_a_changed_setting_leaves_no_manifest_and_the_next_run_completes(images48, tmp_path):
    import yaml
    from faults import kill_when, mmbatch_exe, private_ray_tmpdir

    out = tmp_path / "out"
    run(hog_workflow(images48, out, size=32))
    old = unit_fps(out)
    n = len(old)
    assert (out / "_manifest.json").exists() and n >= 12

    wf_file = tmp_path / "wf.yaml"
    wf_file.write_text(yaml.safe_dump(hog_workflow(images48, out, size=24)))
    changed = lambda: [u for u, fp in unit_fps(out).items() if fp != old.get(u)][2:]   # noqa: E731
    ray_tmp = private_ray_tmpdir()
    try:
        first = kill_when(mmbatch_exe() + ["preprocess", str(wf_file)], changed, tmp_path / "first.log",
                          RAY_TMPDIR=ray_tmp, RAY_OVERRIDE_RESOURCES=json.dumps({"CPU": 2}))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert first["killed"], (tmp_path / "first.log").read_text()[-3000:]
    assert not (out / "_manifest.json").exists()             # the old one went before the first new file
    new = [u for u, fp in unit_fps(out).items() if fp != old[u]]
    assert 3 <= len(new) < n                                  # mixed: some units at size 24, the rest at 32

    # a reader refuses the folder and says how it is mixed
    with pytest.raises(UsageError) as e:
        check_fused(*storage.url_to_fs(str(out)))
    msg = str(e.value)
    assert "_manifest.json" in msg and "rerun preprocess" in msg
    assert f"files were made with image size" in msg and ("24" in msg and "32" in msg)
    got = check_fused(*storage.url_to_fs(str(out)), allow_incomplete=True)
    assert not got["complete"] and len(got["files"]) == n

    # the next rerun completes: only the units still at size 32 are computed
    s = run(hog_workflow(images48, out, size=24))
    assert s.shards_skipped == len(new) and s.shards_processed == n - len(new)
    assert check_fused(*storage.url_to_fs(str(out)))["complete"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["metadata"]["features"]["image"]["params"]["size"] == 24
    assert manifest["unit_fingerprints"] == {f"{u}.parquet": fp for u, fp in unit_fps(out).items()}


# --- 3. readers refuse mixed or incomplete data -----------------------------------------------------
@pytest.fixture(scope="module")
def mixed(images48, tmp_path_factory) -> Path:
    """A fused folder at image size 32 in which 2 of 12 files were rewritten at size 24 (as by an
    unfinished rerun), and the size-32 run's manifest still there."""
    root = tmp_path_factory.mktemp("mixed")
    run(hog_workflow(images48, root / "mixed", size=32))
    run(hog_workflow(images48, root / "other", size=24))
    for f in sorted((root / "other").glob("*.parquet"))[:2]:
        shutil.copy(f, root / "mixed" / f.name)
    return root / "mixed"


def test_check_names_the_mixed_files_and_how(mixed):
    with pytest.raises(UsageError) as e:
        check_fused(*storage.url_to_fs(str(mixed)))
    msg = str(e.value)
    n = len(list(mixed.glob("*.parquet")))
    assert f"2 of {n} files were made with other settings" in msg
    assert f"{n - 2} files were made with image size 32, 2 with 24" in msg and "rerun preprocess" in msg
    assert "2 file(s) have another unit fingerprint" in msg
    two = sorted(p.name for p in (mixed.parent / "other").glob("*.parquet"))[:2]
    assert all(n in msg for n in two)


def _train_wf(tmp_path: Path, data: Path) -> Path:
    import yaml

    f = tmp_path / "train.yaml"
    f.write_text(yaml.safe_dump({"train": {"data": str(data), "out": str(tmp_path / "runs"), "name": "m",
                                           "epochs": 1, "hidden": 8, "num_workers": 1, "schedule": "none"}}))
    return f


def test_commands_refuse_mixed_data_with_exit_2(mixed, tmp_path, capsys):
    from mmbatch.cli import main

    wf = _train_wf(tmp_path, mixed)
    for args in (["inspect", str(mixed)], ["train", str(wf)],
                 ["evaluate", str(tmp_path / "no-model"), "--data", str(mixed)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "files were made with image size 32, 2 with 24" in err and "--allow-incomplete" in err, args
    assert not (tmp_path / "runs").exists()                  # refused before training started


def test_allow_incomplete_reads_what_is_committed_and_says_so(mixed, tmp_path, capsys, caplog):
    from mmbatch.cli import main

    assert main(["inspect", str(mixed), "--allow-incomplete"]) == 0
    out = capsys.readouterr().out
    assert "NOT one complete preprocess output" in out and "image size 32, 2 with 24" in out
    assert f"48 rows in {len(list(mixed.glob('*.parquet')))} file(s)" in out

    caplog.clear()
    assert main(["train", str(_train_wf(tmp_path, mixed)), "--allow-incomplete"]) == 0
    assert any("--allow-incomplete" in r.getMessage() and "image size" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "runs").rglob("model.pt"))


def test_retrain_refuses_mixed_training_data(images48, mixed, tmp_path, capsys):
    import yaml

    from mmbatch.cli import main

    wf = hog_workflow(images48, tmp_path / "features", size=32)
    wf["train"] = {"data": str(mixed), "out": str(tmp_path / "runs"), "epochs": 1, "hidden": 8, "num_workers": 1}
    wf["retrain"] = {"registry": str(tmp_path / "registry")}
    f = tmp_path / "retrain.yaml"
    f.write_text(yaml.safe_dump(wf))
    assert main(["retrain", str(f)]) == 2
    assert "2 with 24" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --- 4. ingest's shard plan depends on the data and options only --------------------------------------
def test_ingest_plan_is_the_same_whatever_the_cluster_size(ray_session, tmp_path):
    """Ingested on the shared 2-CPU Ray, then rerun as a 1-CPU and a 16-CPU embedded Ray would plan it:
    every shard is found committed (same ids, same fingerprints), nothing is read again."""
    from faults import mmbatch_exe, run_cmd

    from mmbatch.demo.corpus import write_imagenet

    src = write_imagenet(tmp_path / "corpus", per_class=24)             # 96 small images
    out = tmp_path / "canon"
    first = run_ingest("imagenet", str(src), str(out), echo=False)
    assert first.shards_total >= 8                                        # parallel work from the data alone
    fps = unit_fps(out)
    for cpus in (1, 16):
        r = run_cmd(mmbatch_exe() + ["ingest", "imagenet", str(src), "--out", str(out)],
                    RAY_OVERRIDE_RESOURCES=json.dumps({"CPU": cpus}))
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"shards {first.shards_total} ({first.shards_total} already committed, skipped)" in r.stdout, r.stdout
        assert unit_fps(out) == fps


# --- 5. retries for transient errors only ---------------------------------------------------------------
def _counting(fn):
    calls = []

    def wrapped():
        calls.append(1)
        return fn()
    return wrapped, calls


def _write_to_full_disk() -> None:
    with open("/dev/full", "wb") as f:                 # every write: ENOSPC, no space left on device
        f.write(b"x" * 2**20)


def test_permanent_storage_errors_fail_at_once_naming_the_path(tmp_path):
    import errno

    import pyarrow as pa

    from mmbatch.engine.commit import call_with_retry, write_table

    table = pa.table({"x": [1, 2, 3]})
    fs, _ = storage.url_to_fs(str(tmp_path))
    # a directory nobody may write into (sysfs refuses even root), a full disk, a missing file
    cases = [(lambda: write_table(fs, "/sys/mmbatch-test/x.parquet", table), PermissionError, None,
              "/sys/mmbatch-test/x.parquet"),
             (_write_to_full_disk, OSError, errno.ENOSPC, "/dev/full"),
             (lambda: open(tmp_path / "missing.parquet", "rb"), FileNotFoundError, errno.ENOENT, "missing.parquet")]
    for fn, kind, code, path in cases:
        counted, calls = _counting(fn)
        with pytest.raises(kind) as e:
            call_with_retry(counted, f"writing {path}", backoff_s=5.0)
        assert len(calls) == 1, (path, e.value)                     # no retry (and no 5 s backoff)
        assert path in str(e.value) and "failed" not in str(e.value)
        assert code is None or e.value.errno == code


def test_transient_errors_are_retried_until_they_pass(tmp_path):
    import socket

    from mmbatch.engine.commit import call_with_retry

    # a real refused connection (nothing listens yet), then the service comes up
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    tries = []

    def connect():
        tries.append(1)
        if len(tries) == 3:
            listener.listen(1)
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return "connected"
    try:
        assert call_with_retry(connect, "connecting", backoff_s=0.01) == "connected"
    finally:
        listener.close()
    assert len(tries) == 3
    # and a transient error that does not pass: the last one, after every attempt
    tries.clear()
    with pytest.raises(OSError, match="failed 4 times"):
        call_with_retry(lambda: tries.append(1) or socket.create_connection(("127.0.0.1", port), timeout=2),
                        "connecting", backoff_s=0.01)
    assert len(tries) == 4


def test_object_store_errors_are_classified_as_s3fs_reports_them():
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from mmbatch.engine.commit import is_transient

    def s3(code: str, status: int):
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code},
                                                 "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"))
    for code, status in (("SlowDown", 503), ("ServiceUnavailable", 503), ("InternalError", 500),
                         ("RequestTimeout", 400)):
        assert is_transient(s3(code, status)), code
    for code, status in (("AccessDenied", 403), ("NoSuchKey", 404), ("NoSuchBucket", 404),
                         ("InvalidArgument", 400)):
        assert not is_transient(s3(code, status)), code


# --- 6. GPU training ranks never share a GPU --------------------------------------------------------------
def test_each_gpu_rank_asks_for_a_whole_gpu():
    from mmbatch.train.run import rank_placement

    # auto, 2 ranks, 1 GPU: one rank on it (never two ranks on half a GPU each)
    p = rank_placement("auto", 2, 0.5, gpus_now=1, gpus_max=None)
    assert (p.num_workers, p.use_gpu, p.resources_per_worker) == (1, True, {"CPU": 0.5, "GPU": 1.0})
    assert "1 rank(s), one GPU each" in p.note
    # auto, enough GPUs: every rank a whole GPU
    p = rank_placement("auto", 2, 0.5, gpus_now=4, gpus_max=None)
    assert (p.num_workers, p.resources_per_worker["GPU"], p.note) == (2, 1.0, "")
    assert p.where() == "2 rank(s) on GPUs (0.5 CPU, 1 GPU each)"
    # auto on an autoscaling cluster with no GPU node yet: ask for GPUs, do not fall back to CPU
    p = rank_placement("auto", 2, 0.5, gpus_now=0, gpus_max=8)
    assert (p.num_workers, p.use_gpu, p.resources_per_worker["GPU"]) == (2, True, 1.0)
    assert "autoscaler for 2 more GPU(s)" in p.note
    # no GPU now or ever: CPU ranks, as many as asked
    p = rank_placement("auto", 2, 0.5, gpus_now=0, gpus_max=None)
    assert (p.num_workers, p.use_gpu, p.resources_per_worker) == (2, False, {"CPU": 0.5})
    assert rank_placement("auto", 2, 0.5, gpus_now=0.5, gpus_max=None).use_gpu is False   # a GPU fraction
    assert rank_placement(False, 2, 0.5, gpus_now=4, gpus_max=None).use_gpu is False
    # use_gpu: true with fewer GPUs than ranks, now and at the autoscaler's limit: a clear error
    for now, most in ((1, None), (0, 1)):
        with pytest.raises(UsageError, match=r"train.use_gpu: true needs 2 whole GPUs"):
            rank_placement(True, 2, 0.5, gpus_now=now, gpus_max=most)
    assert rank_placement(True, 2, 0.5, gpus_now=0, gpus_max=2).num_workers == 2


GPU_CLUSTER_SCRIPT = r"""
import json, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=2, num_gpus=2)              # fake GPUs: the scheduler sees them, CUDA does not
cluster.wait_for_nodes()
import ray
ray.init(address=cluster.address)
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from mmbatch.engine import capacity
from mmbatch.train.run import rank_placement

place = rank_placement("auto", 2, 0.5, *capacity.gpus(capacity.snapshot()))
pg = placement_group([place.resources_per_worker] * place.num_workers)     # what Ray Train reserves
ray.get(pg.ready())

@ray.remote
def rank():
    return ray.get_gpu_ids()

gpus = ray.get([rank.options(num_cpus=place.resources_per_worker["CPU"], num_gpus=place.resources_per_worker["GPU"],
                             scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
                .remote() for i in range(place.num_workers)])
print("RESULT " + json.dumps({"capacity": capacity.gpus(capacity.snapshot()), "where": place.where(), "gpus": gpus}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_ranks_get_distinct_gpus_on_a_cluster_with_fake_gpus(tmp_path):
    from faults import private_ray_tmpdir, run_cmd

    import sys

    ray_tmp = private_ray_tmpdir()
    try:
        r = run_cmd([sys.executable, "-c", GPU_CLUSTER_SCRIPT], timeout=180, RAY_TMPDIR=ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert res["capacity"][0] == 2 and res["where"] == "2 rank(s) on GPUs (0.5 CPU, 1 GPU each)"
    ids = [tuple(g) for g in res["gpus"]]
    assert all(len(g) == 1 for g in ids) and len(set(ids)) == 2          # one whole GPU each, not shared
