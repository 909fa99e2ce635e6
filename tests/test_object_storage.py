"""Every command on s3://, against a real S3-compatible server: moto's ThreadedMotoServer on loopback.

The server listens on a free loopback port chosen when this module is imported, and the standard
AWS variables (AWS_ENDPOINT_URL, dummy credentials) are set then too: pytest imports every test
module before the session's shared Ray starts, so its workers inherit them, as the workers of a
user's embedded Ray inherit the user's environment. Each S3 output is compared with a local run of
the same command: the fused rows must be bit-identical.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
BUCKET = "mmbatch-test"
ENV_SECRET = f"env-secret-{uuid.uuid4().hex}"       # AWS_SECRET_ACCESS_KEY: must appear in no output
WF_SECRET = f"wf-secret-{uuid.uuid4().hex}"         # the workflow's storage key: must appear in no output
for _k, _v in {"AWS_ENDPOINT_URL": ENDPOINT, "AWS_ACCESS_KEY_ID": "mmbatch-test-key",
               "AWS_SECRET_ACCESS_KEY": ENV_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ[_k] = _v
S3 = f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def s3():
    """The moto server (module-wide) and an s3fs filesystem on it, with a fresh bucket."""
    from moto.server import ThreadedMotoServer
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)     # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=PORT, verbose=False)
    server.start()
    server._server.app = GETS.wrap(server._server.app)
    fs = s3fs.S3FileSystem(endpoint_url=ENDPOINT, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield fs
    server.stop()


class GetCounter:
    """WSGI middleware on the moto server: the GET requests it answered per key, with their Range
    header, the bytes of their response bodies (what a reader really downloaded) and the access key
    that signed them."""

    def __init__(self):
        self.gets: list[tuple[str, str | None, int]] = []
        self.keys: list[tuple[str, str]] = []            # (path, access key id) of every GET

    def wrap(self, app):
        def counted(environ, start_response):
            body = app(environ, start_response)
            if environ["REQUEST_METHOD"] != "GET" or environ.get("QUERY_STRING"):
                return body
            chunks = list(body)
            auth = environ.get("HTTP_AUTHORIZATION", "")
            self.keys.append((environ["PATH_INFO"], auth.split("Credential=", 1)[-1].split("/", 1)[0]))
            self.gets.append((environ["PATH_INFO"], environ.get("HTTP_RANGE"), sum(len(c) for c in chunks)))
            return chunks
        return counted

    def of(self, key: str) -> list[tuple[str | None, int]]:
        return [(r, n) for path, r, n in self.gets if path == f"/{BUCKET}/{key}"]


GETS = GetCounter()


def ls_all(fs, prefix: str) -> list[str]:
    """Every object under ``prefix`` (fresh listing, no cache), relative to it."""
    fs.invalidate_cache()
    root = prefix.removeprefix("s3://").rstrip("/")
    return sorted(p[len(root) + 1:] for p in fs.find(root))


def s3_tables(fs, uri: str) -> dict[str, pa.Table]:
    """{name: table} of the data objects directly under ``uri``, read back from S3."""
    fs.invalidate_cache()
    root = uri.removeprefix("s3://").rstrip("/")
    return {Path(p).name: pq.read_table(p, filesystem=fs) for p in sorted(fs.ls(root, detail=False))
            if p.endswith(".parquet") and not Path(p).name.startswith("_")}


def local_tables(root: Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(Path(root).glob("*.parquet")) if not p.name.startswith("_")}


def assert_same_tables(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) and got, (sorted(got), sorted(want))
    for name in want:
        assert got[name].equals(want[name]), f"{name}: S3 output differs from the local run"


def by_id(tables: dict[str, pa.Table]) -> pa.Table:
    """All rows of ``tables``, sorted by sample_id, without the media paths (where the corpus lived)."""
    t = pa.concat_tables(tables.values())
    return t.sort_by("sample_id")


@pytest.fixture(scope="module")
def corpora(s3, demo_corpus, tmp_path_factory):
    """The demo corpus (ImageNet, LibriSpeech, TIMIT layouts) plus small hf and manifest corpora, on disk
    and uploaded to s3://BUCKET/corpus/<kind>."""
    from corpora_ingest import flac, jpeg, write

    root = tmp_path_factory.mktemp("s3corpora")
    local = {"imagenet": demo_corpus.imagenet, "librispeech": demo_corpus.librispeech, "timit": demo_corpus.timit}
    man = root / "manifest"
    rows = ["image_path,audio_path,text,label,split"]
    for i in range(6):
        write(man / "img" / f"{i}.jpg", jpeg(seed=i, c=i % 4))
        write(man / "wav" / f"{i}.flac", flac(seed=i))
        rows.append(f"img/{i}.jpg,wav/{i}.flac,utterance {i},{i % 2},{'train' if i < 4 else 'test'}")
    write(man / "index.csv", "\n".join(rows) + "\n")
    local["manifest"] = man / "index.csv"
    from test_ingest_hf_manifest import hf_dataset
    hf_dataset(5).save_to_disk(str(root / "hf"))
    local["hf"] = root / "hf"
    for kind, path in local.items():
        if path.is_dir():
            s3.put(str(path), f"{BUCKET}/corpus/{kind}", recursive=True)
        else:
            s3.put(str(path.parent), f"{BUCKET}/corpus/{kind}", recursive=True)
    remote = {k: f"{S3}/corpus/{k}" + ("/index.csv" if k == "manifest" else "") for k in local}
    return {"local": {k: str(v) for k, v in local.items()}, "s3": remote}


INGEST_ARGS = {"hf": ["--columns", "transcript=text,uid=sample_id", "--split", "train"]}


@pytest.fixture(scope="module")
def ingested(ray_session, s3, corpora, tmp_path_factory):
    """Every ingest KIND, from S3 to S3 and from disk to disk: {kind: (s3 out, local out, captured output)}."""
    from mmbatch.cli import main
    from mmbatch.ingest.sources import KINDS

    local_root = tmp_path_factory.mktemp("canonical")
    out = {}
    for kind in KINDS:
        extra = INGEST_ARGS.get(kind, [])
        s3_out, loc_out = f"{S3}/canonical/{kind}", str(local_root / kind)
        assert main(["ingest", kind, corpora["s3"][kind], "--out", s3_out, *extra]) in (0, 3), kind
        assert main(["ingest", kind, corpora["local"][kind], "--out", loc_out, *extra]) in (0, 3), kind
        out[kind] = (s3_out, loc_out)
    return out


def test_ingest_every_kind_on_s3_matches_a_local_ingest(s3, ingested):
    from mmbatch.engine.manifest import Manifest
    for kind, (s3_out, loc_out) in ingested.items():
        got, want = s3_tables(s3, s3_out), local_tables(Path(loc_out))
        assert sorted(got) == sorted(want) and got, kind
        a, b = by_id(got), by_id(want)
        assert a.column("sample_id").equals(b.column("sample_id")), kind
        for col in a.column_names:
            if col in ("image", "audio"):      # media bytes identical; the path names where the corpus lived
                for field in ("bytes",):
                    assert pa.compute.struct_field(a.column(col), field).equals(
                        pa.compute.struct_field(b.column(col), field)), (kind, col)
            elif col != "extra":
                assert a.column(col).equals(b.column(col)), (kind, col)
        m_s3, m_loc = Manifest.read(s3_out).to_dict(), Manifest.read(loc_out).to_dict()
        assert m_s3["counts"] == m_loc["counts"], kind
        assert "_tmp" not in " ".join(ls_all(s3, s3_out)), kind


def workflow(canon: str, out: str, storage: dict | None = None) -> dict:
    """The demo's workflow (images paired by label with speech, image rows completed with a spoken class
    name) on the canonical data under ``canon``, every output under ``out``."""
    from mmbatch.demo.run import DEMO_WORKFLOW

    wf = json.loads(json.dumps(DEMO_WORKFLOW))
    wf["datasets"][0]["path"] = f"{canon}/imagenet"
    wf["datasets"][0]["modalities"] = ["image", "audio"]
    wf["datasets"][0]["complete"] = [{"kind": "text-to-speech", "source_column": "label_name"}]
    wf["datasets"][1]["path"] = f"{canon}/librispeech"
    wf["output"]["path"] = f"{out}/features"
    wf["train"].update(out=f"{out}/train", epochs=2, baselines=False)
    wf["retrain"]["registry"] = f"{out}/registry"
    if storage:
        wf["storage"] = storage
    return wf


def write_workflow(path: Path, wf: dict) -> str:
    path.write_text(yaml.safe_dump(wf, sort_keys=False))
    return str(path)


def captured(fn):
    """(fn(), everything it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        result = fn()
    return result, out.getvalue()


@pytest.fixture(scope="module")
def pipeline(ray_session, s3, ingested, tmp_path_factory):
    """preprocess (pairing partners + completions) and inspect on S3 (endpoint and credentials in the
    workflow's storage key), and the same preprocess of the same data on disk."""
    from mmbatch.cli import main

    tmp = tmp_path_factory.mktemp("s3wf")
    opts = {"s3": {"endpoint_url": ENDPOINT, "key": "wf-key", "secret": WF_SECRET}}
    wf_s3 = write_workflow(tmp / "s3.yaml", workflow(f"{S3}/canonical", f"{S3}/run", opts))
    wf_local = write_workflow(tmp / "local.yaml", workflow(str(Path(ingested["imagenet"][1]).parent),
                                                           str(tmp / "run")))
    n0 = len(GETS.keys)
    rc, output = captured(lambda: {"preprocess": main(["preprocess", wf_s3]),
                                   "preprocess-local": main(["preprocess", wf_local]),
                                   "inspect": main(["inspect", f"{S3}/run/features", "--json"])})
    return {"rc": rc, "local": tmp / "run", "output": output, "workflow": wf_s3, "gets": GETS.keys[n0:]}


@pytest.fixture(scope="module")
def trained(pipeline):
    """train, evaluate, two retrain cycles and every registry action on S3."""
    from mmbatch.cli import main

    wf, reg = pipeline["workflow"], f"{S3}/run/registry"
    steps = [("train", ["train", wf]),
             ("evaluate", ["evaluate", f"{S3}/run/train/fusion/model", "--data", f"{S3}/run/features",
                           "--out", f"{S3}/run/eval"]),
             ("retrain", ["retrain", wf, "--set", "retrain.force_train=true"]),
             ("retrain-again", ["retrain", wf, "--set", "retrain.force_train=true"]),
             ("list", ["registry", "list", reg]), ("show", ["registry", "show", reg]),
             ("promote", ["registry", "promote", reg, "v0002"]), ("rollback", ["registry", "rollback", reg])]
    rc, output = captured(lambda: {name: main(args) for name, args in steps})
    return {"rc": rc, "output": output}


def test_preprocess_and_inspect_run_on_s3(pipeline):
    assert pipeline["rc"] == {"preprocess": 0, "preprocess-local": 0, "inspect": 0}, pipeline["output"][-5000:]
    info = json.loads(pipeline["output"][pipeline["output"].rindex("\n{"):])       # inspect --json, printed last
    assert info["rows"] == 48 and info["metadata"]["kind"] == "fused"


def test_the_workflow_storage_key_reaches_the_workers(pipeline):
    """Every read of the canonical data, the workers' row-group reads included, was signed with the key
    of the workflow's `storage` option, not the one in AWS_ACCESS_KEY_ID (the workers' environment)."""
    keys = {key for path, key in pipeline["gets"] if path.startswith(f"/{BUCKET}/canonical/")
            and path.endswith(".parquet")}
    assert keys == {"wf-key"}


@pytest.mark.slow
def test_train_evaluate_retrain_and_registry_run_on_s3(s3, trained):
    from mmbatch.ops.registry import Registry

    assert trained["rc"] == {k: 0 for k in ("train", "evaluate", "retrain", "retrain-again", "list", "show",
                                             "promote", "rollback")}, trained["output"][-5000:]
    s3.invalidate_cache()
    for key in ("train/fusion/model/model.pt", "train/fusion/model/model.json", "eval/metrics.json",
                "eval/report.html"):
        assert s3.exists(f"{BUCKET}/run/{key}"), key
    # evaluate scores the rows training held out as test, with the model it exported: the same accuracy
    evaluated = json.loads(s3.cat_file(f"{BUCKET}/run/eval/metrics.json"))["metrics"]["accuracy"]
    trained_acc = json.loads(s3.cat_file(f"{BUCKET}/run/train/fusion/metrics.json"))["metrics"]["accuracy"]
    assert evaluated == pytest.approx(trained_acc)
    reg = Registry(f"{S3}/run/registry")
    assert [v.version for v in reg.list()] == ["v0001", "v0002"]
    assert reg.alias("champion")["version"] == "v0001"                 # promote v0002, then rolled back
    events = [k.rsplit("-", 1)[-1] for k in ls_all(s3, f"{S3}/run/registry/history")]
    assert "promote.json" in events and events[-1] == "rollback.json"
    assert "v0001" in trained["output"] and "v0002" in trained["output"]       # list / show printed them


def test_fused_rows_on_s3_are_bit_identical_to_a_local_run(s3, pipeline):
    got, want = s3_tables(s3, f"{S3}/run/features"), local_tables(pipeline["local"] / "features")
    assert_same_tables(got, want)
    assert sum(t.num_rows for t in got.values()) == 48
    # the partners' features (pairing) too
    assert_same_tables(s3_tables(s3, f"{S3}/run/features/_features/speech"),
                       local_tables(pipeline["local"] / "features" / "_features" / "speech"))


@pytest.mark.slow
def test_no_secret_in_any_output_object_log_or_message(s3, pipeline, trained, ingested):
    """The secrets (the workflow's storage key, AWS_SECRET_ACCESS_KEY) are in no object the commands wrote
    (manifests, markers, Parquet metadata, model.json, registry records, reports), in nothing they printed,
    and in no log of the Ray session that ran them."""
    import ray

    secrets = [WF_SECRET.encode(), ENV_SECRET.encode()]
    keys = [k for k in ls_all(s3, S3) if not k.startswith("corpus/")]
    assert any(k.endswith("model.json") for k in keys) and any("registry/history/" in k for k in keys)
    assert any(k.endswith("_manifest.json") for k in keys) and any(k.endswith("workflow.yaml") for k in keys)
    for key in keys:
        blob = s3.cat_file(f"{BUCKET}/{key}")
        assert not any(s in blob for s in secrets), key
    out = (pipeline["output"] + trained["output"]).encode()
    assert b"wrote" in out and not any(s in out for s in secrets)
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert not any(s in p.read_bytes() for s in secrets), p


def test_convert_a_folder_on_s3(s3, tmp_path):
    """`mmbatch convert` from an S3 folder into an S3 folder gives the objects a local conversion gives."""
    from mmbatch.cli import main

    src = tmp_path / "texts"
    for i, words in enumerate(["red apple river", "blue ocean cloud", "snow window letter"]):
        (src / ("sub" if i == 2 else "")).mkdir(parents=True, exist_ok=True)
        (src / ("sub" if i == 2 else "") / f"t{i}.txt").write_text(words)
    s3.put(str(src), f"{BUCKET}/convert/texts", recursive=True)
    assert main(["convert", "text-to-image", f"{S3}/convert/texts", "--out", f"{S3}/convert/images"]) == 0
    assert main(["convert", "text-to-image", str(src), "--out", str(tmp_path / "images")]) == 0
    want = {p.relative_to(tmp_path / "images").as_posix(): p.read_bytes()
            for p in (tmp_path / "images").rglob("*") if p.is_file()}
    assert sorted(want) == ["sub/t2.png", "t0.png", "t1.png"]
    assert ls_all(s3, f"{S3}/convert/images") == sorted(want)
    for rel, blob in want.items():
        assert s3.cat_file(f"{BUCKET}/convert/images/{rel}") == blob, rel
    # one file to a named object
    assert main(["convert", "text-to-image", f"{S3}/convert/texts/t0.txt", "--out", f"{S3}/convert/one.png"]) == 0
    assert s3.cat_file(f"{BUCKET}/convert/one.png") == want["t0.png"]


@pytest.mark.parametrize("args", [["inspect", f"{S3}/x"], ["ingest", "imagenet", f"{S3}/x", "--out", "x"],
                                  ["registry", "list", "gs://bucket/registry"]])
def test_a_missing_filesystem_package_is_one_line_naming_the_extra(args, tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['s3fs'] = sys.modules['gcsfs'] = None\n"
            "from mmbatch.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    extra = "gcs" if args[-1].startswith("gs://") else "s3"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and f"pip install 'mmbatch[{extra}]'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# --- the commit protocol on S3: a killed driver, then a rerun ----------------------------------------
class ObjectWatcher(threading.Thread):
    """Lists ``prefix`` while a job runs: every Parquet object a reader may see (no ``_`` part in its key)
    must parse whole; an object seen twice must not have changed (no partial object replaced later)."""

    def __init__(self, prefix: str):
        import s3fs

        super().__init__(daemon=True)
        self.fs = s3fs.S3FileSystem(endpoint_url=ENDPOINT, skip_instance_cache=True, use_listings_cache=False)
        self.root = prefix.removeprefix("s3://").rstrip("/")
        self.seen: dict[str, str] = {}
        self.bad: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.scan()
            time.sleep(0.05)
        self.scan()

    def scan(self) -> None:
        try:
            objs = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return
        for key, info in objs.items():
            rel = key[len(self.root) + 1:]
            if not rel.endswith(".parquet") or any(part.startswith("_") for part in rel.split("/")):
                continue
            tag = info.get("ETag", "")
            if key in self.seen:
                continue
            try:
                pq.read_metadata(self.fs.open(key, "rb"))
            except FileNotFoundError:
                continue
            except Exception as e:             # a partial object visible to readers
                self.bad.append(f"{rel}: {e}")
            self.seen[key] = tag

    def stop(self) -> "ObjectWatcher":
        self._halt.set()
        self.join(timeout=60)
        return self


def kill_after_first_marker(s3, cmd: list[str], out: str, tmp: Path) -> list[str]:
    """Run ``cmd`` with its own Ray; SIGKILL it once a unit's marker is on S3; the markers then."""
    from faults import kill_when, private_ray_tmpdir

    root = out.removeprefix("s3://")

    def markers():
        s3.invalidate_cache()
        try:
            return [k for k in s3.find(root) if "/_shards/" in k and k.endswith(".json")]
        except FileNotFoundError:
            return []

    ray_tmp = private_ray_tmpdir()
    try:
        first = kill_when(cmd, markers, tmp / "first.log", RAY_TMPDIR=ray_tmp,
                          RAY_OVERRIDE_RESOURCES=json.dumps({"CPU": 2}))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert first["killed"], (tmp / "first.log").read_text()[-3000:]
    assert first["leftover"] == [], "the killed driver's embedded Ray outlived it"
    s3.invalidate_cache()
    assert not s3.exists(f"{root}/_manifest.json")           # killed mid-job
    return markers()


@pytest.mark.slow
def test_killed_ingest_and_preprocess_drivers_on_s3_resume_to_the_local_result(ray_session, s3, corpora, tmp_path,
                                                                            capsys):
    from faults import mmbatch_exe, summary_counts
    from mmbatch.cli import main

    # ingest: killed after its first shard's marker, rerun: the same rows as a local ingest, no duplicates
    args = lambda src, out: ["ingest", "imagenet", src, "--out", out, "--shard-rows", "4"]  # noqa: E731
    out = f"{S3}/kill/canon/imagenet"
    watcher = ObjectWatcher(out)
    watcher.start()
    local = tmp_path / "canon"
    assert main(args(corpora["local"]["imagenet"], str(local / "imagenet"))) == 0
    shards = len(local_tables(local / "imagenet"))        # the plan depends on the data only
    assert shards > 2
    committed = kill_after_first_marker(s3, mmbatch_exe() + args(corpora["s3"]["imagenet"], out), out, tmp_path)
    assert 1 <= len(committed) < shards
    capsys.readouterr()
    assert main(args(corpora["s3"]["imagenet"], out)) == 0
    assert summary_counts(capsys.readouterr().out) == {"total": shards, "skipped": len(committed)}   # resumed
    assert main(["ingest", "librispeech", corpora["local"]["librispeech"], "--out", str(local / "librispeech"),
                 "--shard-rows", "4"]) == 0
    assert main(["ingest", "librispeech", corpora["s3"]["librispeech"], "--out", f"{S3}/kill/canon/librispeech",
                 "--shard-rows", "4"]) == 0
    assert watcher.stop().bad == [] and watcher.seen
    got, want = s3_tables(s3, out), local_tables(local / "imagenet")
    assert sorted(got) == sorted(want) and len(got) == shards
    for name in want:
        a, b = got[name], want[name]
        assert a.drop_columns(["image"]).equals(b.drop_columns(["image"])), name
        assert pa.compute.struct_field(a.column("image"), "bytes").equals(
            pa.compute.struct_field(b.column("image"), "bytes")), name
    assert not [k for k in ls_all(s3, out) if "_tmp" in k]

    # preprocess (pairing partners): killed after its first unit's marker, rerun: bit-identical to local
    def paired(canon: str, out: str) -> dict:
        return {"datasets": [{"name": "images", "path": f"{canon}/imagenet", "modalities": ["image"]},
                             {"name": "speech", "path": f"{canon}/librispeech", "modalities": ["audio", "text"],
                              "label_column": "speaker"}],
                "features": {"image": {"extractor": "hog", "size": 32, "batch_size": 4},
                             "audio": {"batch_size": 4}, "text": {"dim": 64}},
                "pairing": {"by": "label", "primary": "images", "seed": 0}, "output": {"path": out}}

    out = f"{S3}/kill/features"
    wf = write_workflow(tmp_path / "wf.yaml", paired(f"{S3}/kill/canon", out))
    watcher = ObjectWatcher(out)
    watcher.start()
    capsys.readouterr()
    assert main(["preprocess", write_workflow(tmp_path / "local.yaml", paired(str(local), str(tmp_path / "f")))]) == 0
    units = summary_counts(capsys.readouterr().out)["processed"]     # partner + primary units of the same plan
    assert units > 2
    committed = kill_after_first_marker(s3, mmbatch_exe() + ["preprocess", wf], out, tmp_path)
    assert 1 <= len(committed) < units
    capsys.readouterr()
    assert main(["preprocess", wf]) == 0
    counts = summary_counts(capsys.readouterr().out)
    assert counts["skipped"] == len(committed) and counts["processed"] + counts["skipped"] == units   # resumed
    assert watcher.stop().bad == [] and watcher.seen
    got = s3_tables(s3, out)
    assert_same_tables(got, local_tables(tmp_path / "f"))
    ids = [s for t in got.values() for s in t.column("sample_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 48
    assert not [k for k in ls_all(s3, out) if "_tmp" in k]


# --- the registry lock on S3: a conditional write ------------------------------------------------------
def test_the_server_honours_conditional_writes_and_the_registry_lock_excludes(s3):
    from mmbatch.ops.registry import Registry, RegistryLocked

    s3.pipe_file(f"{BUCKET}/lock-probe", b"1", mode="create")            # PUT with If-None-Match: *
    with pytest.raises(FileExistsError):
        s3.pipe_file(f"{BUCKET}/lock-probe", b"2", mode="create")        # 412 Precondition Failed
    assert s3.cat_file(f"{BUCKET}/lock-probe") == b"1"

    a, b = Registry(f"{S3}/lock/registry"), Registry(f"{S3}/lock/registry")
    assert a.conditional_writes() and b.conditional_writes()
    with a.lock():
        with pytest.raises(RegistryLocked, match="is locked by"):
            with b.lock(timeout=0.5):
                pass
    with b.lock(timeout=0):                                              # released: the next writer gets it
        assert ls_all(s3, f"{S3}/lock/registry/_locks") == ["0000000002.json"]   # the next generation
        assert json.loads(s3.cat_file(f"{BUCKET}/lock/registry/_locks/0000000002.json")).get("released") is None
    assert json.loads(s3.cat_file(f"{BUCKET}/lock/registry/_locks/0000000002.json"))["released"]
    assert not [k for k in ls_all(s3, f"{S3}/lock/registry") if "probe" in k]


@pytest.mark.slow
def test_two_retrains_at_once_on_an_s3_registry_exactly_one_promotes(ray_session, s3, pipeline, tmp_path):
    """Two `mmbatch retrain` processes (drivers on the shared Ray) started together on a fresh S3
    registry: one takes the lock and promotes, the other exits 2 with the lock message."""
    import subprocess

    from faults import mmbatch_exe

    registry = f"{S3}/race/registry"
    cmd = mmbatch_exe() + ["retrain", pipeline["workflow"], "--set", f"retrain.registry={registry}"]
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    rcs = sorted(p.returncode for p in procs)
    assert rcs == [0, 2], outs
    winner, loser = (outs[0], outs[1]) if procs[0].returncode == 0 else (outs[1], outs[0])
    assert "promoted" in winner and "is locked by" in loser, outs
    assert loser.strip().count("\n") <= 2 and "Traceback" not in loser
    from mmbatch.ops.registry import Registry
    reg = Registry(registry)
    assert [v.version for v in reg.list()] == ["v0001"]
    assert reg.alias("champion")["version"] == "v0001"


# --- reads stream: ranged GETs of one row group, not whole-object downloads ---------------------------
@pytest.fixture(scope="module")
def four_row_groups(s3):
    """An ~8 MB object of incompressible rows in 4 row groups: (uri, table, object size)."""
    import numpy as np

    from mmbatch.engine import storage

    rng = np.random.default_rng(0)
    t = pa.table({"sample_id": [f"s{i:05d}" for i in range(4000)],
                  "blob": [rng.bytes(2000) for _ in range(4000)]})
    uri = f"{S3}/ranges/part-00000.parquet"
    fs, path = storage.url_to_fs(uri)
    storage.atomic_write_table(fs, path, t, row_group_size=1000)
    return uri, t, s3.info(path)["size"]


def assert_ranged(key: str, n0: int, size: int) -> None:
    gets = [(r, n) for path, r, n in GETS.gets[n0:] if path == f"/{BUCKET}/{key}"]
    assert gets and all(r is not None and r.startswith("bytes=") for r, _ in gets), gets
    fetched = sum(n for _, n in gets)
    assert 0.2 * size < fetched < 0.3 * size, (fetched, size)   # the row group (a quarter) + footer, not the object


def test_a_unit_reads_its_row_group_with_range_requests_through_arrow_s3(s3, four_row_groups):
    from mmbatch.engine import storage
    from mmbatch.preprocess.plan import Unit
    from mmbatch.preprocess.unit import read_unit

    uri, t, size = four_row_groups
    assert storage.arrow_s3(*storage.url_to_fs(uri)) is not None        # Arrow's S3 client, not s3fs
    n0 = len(GETS.gets)
    got = read_unit(Unit("u", uri, 2, 1000, "fp"), ["sample_id", "blob"])
    assert got.equals(t.slice(2000, 1000))
    assert_ranged("ranges/part-00000.parquet", n0, size)


def test_s3fs_reads_are_range_requests_too(s3, four_row_groups):
    """With an s3fs option Arrow's client cannot take, reads stay on s3fs, still ranged."""
    import s3fs

    from mmbatch.engine import storage

    uri, t, size = four_row_groups
    fs = s3fs.S3FileSystem(endpoint_url=ENDPOINT, requester_pays=False, skip_instance_cache=True)
    assert storage.arrow_s3(fs, uri) is None
    n0 = len(GETS.gets)
    with storage.open_input(fs, uri) as f:
        got = pq.ParquetFile(f, pre_buffer=True).read_row_group(2)
    assert got.equals(t.slice(2000, 1000))
    assert_ranged("ranges/part-00000.parquet", n0, size)


# --- credentials from a profile ---------------------------------------------------------------------
PROFILE_SCRIPT = r"""
import json, sys
from mmbatch.engine import storage
from mmbatch.config import workflow_from_dict
from mmbatch.ops.describe import describe
from mmbatch.preprocess.plan import Unit
from mmbatch.preprocess.unit import read_unit
if sys.argv[1]:
    workflow_from_dict({"storage": json.loads(sys.argv[1])})
info = describe(sys.argv[2])                                  # s3fs: listing, footers
t = read_unit(Unit("u", sys.argv[3], 1, 1000, "fp"), None)    # a worker's row-group read
print("RESULT", json.dumps({"rows": info["rows"], "unit_rows": t.num_rows}))
"""


@pytest.mark.parametrize("how", ["AWS_PROFILE", "workflow storage key"])
def test_credentials_from_a_named_profile(s3, ingested, four_row_groups, tmp_path, how):
    """A profile in a shared credentials file signs every request, named by AWS_PROFILE (s3fs and Arrow's
    S3 client both read it) or by the workflow's `storage: {s3: {profile: ...}}` (reads then stay on s3fs)."""
    import subprocess
    import sys

    creds = tmp_path / "credentials"
    creds.write_text("[mmbatch-test]\naws_access_key_id = profile-key\naws_secret_access_key = profile-secret\n")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(creds), AWS_CONFIG_FILE=str(tmp_path / "none"))
    opts = ""
    if how == "AWS_PROFILE":
        env["AWS_PROFILE"] = "mmbatch-test"
    else:
        opts = json.dumps({"s3": {"profile": "mmbatch-test"}})
    n0 = len(GETS.keys)
    proc = subprocess.run([sys.executable, "-c", PROFILE_SCRIPT, opts, ingested["imagenet"][0], four_row_groups[0]],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.split("RESULT ", 1)[1]) == {"rows": 48, "unit_rows": 1000}
    keys = {key for _, key in GETS.keys[n0:]}
    assert keys == {"profile-key"}, keys


def test_an_s3_output_with_foreign_objects_or_overlapping_an_input_is_refused(s3, corpora, ingested, capsys):
    """On s3:// a folder is a prefix: a prefix holding a user's objects is refused, and so is an output
    that is (spelled otherwise) or lies inside an input; nothing is written or removed (docs/data-safety.md)."""
    from mmbatch.cli import main

    theirs = f"{BUCKET}/theirs/train-00000-of-00001.parquet"
    with s3.open(theirs, "wb") as f:
        pq.write_table(pa.table({"x": [1, 2]}), f)
    s3.invalidate_cache()
    before = {k: s3.cat_file(f"{BUCKET}/theirs/{k}") for k in ls_all(s3, f"{S3}/theirs")}
    assert list(before) == ["train-00000-of-00001.parquet"]
    assert main(["ingest", "imagenet", corpora["s3"]["imagenet"], "--out", f"{S3}/theirs"]) == 2
    assert "did not write" in capsys.readouterr().err
    s3.invalidate_cache()
    assert {k: s3.cat_file(f"{BUCKET}/theirs/{k}") for k in ls_all(s3, f"{S3}/theirs")} == before
    canon = ingested["imagenet"][0]
    canon_before = ls_all(s3, canon)
    assert main(["ingest", "imagenet", corpora["s3"]["imagenet"], "--out", f"s3a://{BUCKET}//corpus/./imagenet/"]) == 2
    assert main(["duplicates", canon, "--out", f"{canon}/dups"]) == 2
    err = capsys.readouterr().err
    assert err.count("mmbatch never writes where it reads") == 2 and "Traceback" not in err
    s3.invalidate_cache()
    assert ls_all(s3, canon) == canon_before
