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
import socket
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
    fs = s3fs.S3FileSystem(endpoint_url=ENDPOINT, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield fs
    server.stop()


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
    from mmbatch.sources import KINDS

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
    from mmbatch import storage
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
        m_s3, m_loc = storage.read_manifest(s3_out), storage.read_manifest(loc_out)
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


@pytest.fixture(scope="module")
def pipeline(ray_session, s3, ingested, tmp_path_factory):
    """preprocess (pairing partners + completions), train, evaluate, inspect and retrain on S3 (endpoint and
    credentials in the workflow's storage key), and preprocess of the same data on disk."""
    from mmbatch.cli import main

    tmp = tmp_path_factory.mktemp("s3wf")
    opts = {"s3": {"endpoint_url": ENDPOINT, "key": "wf-key", "secret": WF_SECRET}}
    wf_s3 = write_workflow(tmp / "s3.yaml", workflow(f"{S3}/canonical", f"{S3}/run", opts))
    wf_local = write_workflow(tmp / "local.yaml", workflow(str(Path(ingested["imagenet"][1]).parent),
                                                           str(tmp / "run")))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = run_all(main, wf_s3, wf_local)
    return {"rc": rc, "local": tmp / "run", "output": out.getvalue()}


def run_all(main, wf_s3: str, wf_local: str) -> dict:
    return {"preprocess": main(["preprocess", wf_s3]), "preprocess-local": main(["preprocess", wf_local]),
          "train": main(["train", wf_s3]),
          "evaluate": main(["evaluate", f"{S3}/run/train/fusion/model", "--data", f"{S3}/run/features",
                            "--out", f"{S3}/run/eval"]),
          "inspect": main(["inspect", f"{S3}/run/features", "--json"]),
          "retrain": main(["retrain", wf_s3, "--set", "retrain.force_train=true"]),
          "retrain-again": main(["retrain", wf_s3, "--set", "retrain.force_train=true"]),
          "list": main(["registry", "list", f"{S3}/run/registry"]),
          "show": main(["registry", "show", f"{S3}/run/registry"]),
          "promote": main(["registry", "promote", f"{S3}/run/registry", "v0002"]),
          "rollback": main(["registry", "rollback", f"{S3}/run/registry"])}


def test_every_command_runs_on_s3(pipeline):
    assert pipeline["rc"] == {"preprocess": 0, "preprocess-local": 0, "train": 0, "evaluate": 0, "inspect": 0,
                              "retrain": 0, "retrain-again": 0, "list": 0, "show": 0, "promote": 0,
                              "rollback": 0}, pipeline["output"][-5000:]


def test_fused_rows_on_s3_are_bit_identical_to_a_local_run(s3, pipeline):
    got, want = s3_tables(s3, f"{S3}/run/features"), local_tables(pipeline["local"] / "features")
    assert_same_tables(got, want)
    assert sum(t.num_rows for t in got.values()) == 48
    # the partners' features (pairing) too
    assert_same_tables(s3_tables(s3, f"{S3}/run/features/_features/speech"),
                       local_tables(pipeline["local"] / "features" / "_features" / "speech"))
