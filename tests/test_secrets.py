"""Secrets stay secret (issue #31, item 6).

- the workflow's ``storage`` options (credentials) never show in its repr, str or an error message;
- they reach every filesystem mmbatch makes explicitly, fsspec's global configuration is left alone,
  and only a workflow that validated sets them;
- an S3 dataset is read, and a run's checkpoints written, with the options of the workflow alone:
  against moto's ThreadedMotoServer on loopback, every request signed with the workflow's key;
- ``mmbatch submit`` sends a token over plain http:// only to a loopback address unless --insecure;
- the checkpoint staging folders are private (0700, unpredictable names) and mmbatch removes only its own.
"""
from __future__ import annotations

import copy
import io
import os
import socket
import stat
import tempfile
import uuid

import pytest
import yaml

from mmbatch.engine import storage
from mmbatch.config import WorkflowError, load_workflow, workflow_from_dict

SECRET = f"secret-{uuid.uuid4().hex}"
KEY = f"key-{uuid.uuid4().hex[:12]}"          # the workflow's access key: nowhere in the environment


@pytest.fixture
def clean_options(monkeypatch):
    """This process's storage options start empty here and are put back afterwards."""
    monkeypatch.setattr(storage, "_OPTIONS", {})
    return storage


# --- repr and errors ----------------------------------------------------------------------------------
def test_repr_and_str_hide_storage(clean_options):
    wf = workflow_from_dict({"storage": {"s3": {"key": KEY, "secret": SECRET}}})
    assert wf.storage["s3"]["secret"] == SECRET                  # still there for the filesystems
    for text in (repr(wf), str(wf)):
        assert SECRET not in text and KEY not in text and "storage" not in text
        assert "train=TrainConfig(" in text                         # the rest is still shown


@pytest.mark.parametrize("override,key", [
    (f"storage.s3.secret=[{SECRET}", "storage.s3.secret"),           # not YAML
    (f"storage.s3={SECRET}", "storage.s3"),                          # not a mapping
    (f"storage.nosuch.secret={SECRET}", "storage"),                  # unknown scheme
    (f"storage.s3.secret: {SECRET}", "--set expects key.sub=value"),  # no '='
])
def test_an_invalid_storage_override_never_shows_its_value(clean_options, override, key):
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({}, overrides=[override])
    assert SECRET not in str(e.value) and key in str(e.value)
    assert storage.options() == {}                                  # nothing set by a workflow that failed


def test_a_broken_workflow_file_never_quotes_the_line(clean_options, tmp_path):
    f = tmp_path / "wf.yaml"
    f.write_text(f'name: x\nstorage: {{s3: {{secret: "{SECRET}}}\n')     # an unclosed quote
    with pytest.raises(WorkflowError, match=r"not valid YAML: line \d+, column \d+") as e:
        load_workflow(f)
    assert SECRET not in str(e.value)


def test_fsspec_config_is_left_alone_and_options_are_set_only_by_a_valid_workflow(clean_options, tmp_path):
    import fsspec.config

    before = copy.deepcopy(fsspec.config.conf)
    opts = {"s3": {"endpoint_url": "http://127.0.0.1:9", "key": KEY, "secret": SECRET}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"storage": opts, "train": {"epochs": "many"}}))
    with pytest.raises(WorkflowError, match="train.epochs"):
        load_workflow(bad)
    assert fsspec.config.conf == before and storage.options() == {}
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"storage": opts}))
    load_workflow(good)
    assert fsspec.config.conf == before
    assert storage.options() == opts
    # every filesystem made from now on gets them, under any name of its scheme (s3a:// is s3fs too)
    for uri in ("s3://bucket/x", "s3a://bucket/x"):
        fs, path = storage.url_to_fs(uri)
        assert path == "bucket/x"
        assert {k: fs.storage_options.get(k) for k in opts["s3"]} == opts["s3"], uri
    assert storage.url_to_fs(str(tmp_path))[0].storage_options == {}       # other schemes: none


# --- S3 with the workflow's options alone ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SignedBy:
    """WSGI middleware on the moto server: (method, path, access key) of every request."""

    def __init__(self):
        self.requests: list[tuple[str, str, str]] = []

    def wrap(self, app):
        def recorded(environ, start_response):
            auth = environ.get("HTTP_AUTHORIZATION", "")
            key = auth.split("Credential=", 1)[-1].split("/", 1)[0] if "Credential=" in auth else ""
            self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], key))
            return app(environ, start_response)
        return recorded


@pytest.fixture(scope="module")
def moto_s3():
    """A moto S3 server on a free loopback port (its address is given to no environment variable),
    a bucket on it and the request log."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    log = SignedBy()
    server._server.app = log.wrap(server._server.app)
    endpoint = f"http://127.0.0.1:{port}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="setup-key", secret="setup", skip_instance_cache=True)
    bucket = f"secrets-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    yield {"endpoint": endpoint, "bucket": bucket, "fs": fs, "log": log}
    server.stop()


def test_s3_data_and_checkpoints_use_the_workflows_options_alone(ray_session, moto_s3, clean_options, tmp_path):
    """The endpoint and the keys are in the workflow's storage section only: the fused data is read (pyarrow on
    the driver, Ray Data in the workers) and the run's checkpoints are written (Ray Train's storage filesystem),
    every request signed with the workflow's key."""
    import fsspec.config

    from fused_data import write_fused
    from mmbatch.data import read_fused
    from mmbatch.train.run import run_training

    s3, bucket = moto_s3["fs"], moto_s3["bucket"]
    s3.put(write_fused(str(tmp_path / "fused"), n=200, seed=3), f"{bucket}/fused", recursive=True)
    before = copy.deepcopy(fsspec.config.conf)
    wf = workflow_from_dict({
        "storage": {"s3": {"endpoint_url": moto_s3["endpoint"], "key": KEY, "secret": SECRET}},
        "train": {"data": f"s3://{bucket}/fused", "out": f"s3://{bucket}/train", "name": "opts", "epochs": 2,
                  "hidden": 16, "batch_size": 64, "num_workers": 1, "schedule": "none"}})
    n0 = len(moto_s3["log"].requests)
    assert read_fused(f"s3://{bucket}/fused").count() == 200                    # Ray Data, in the workers
    res = run_training(wf, baselines=False)
    reqs = moto_s3["log"].requests[n0:]
    assert res.status == "trained" and len(res.history) == 2
    s3.invalidate_cache()
    ckpts = s3.glob(f"{bucket}/train/opts/checkpoint_epoch_*/state.pt")
    assert len(ckpts) == 2 and s3.exists(f"{bucket}/train/opts/model/model.json")
    data_gets = [r for r in reqs if r[0] == "GET" and r[1].startswith(f"/{bucket}/fused/") and r[1].endswith(".parquet")]
    ckpt_puts = [r for r in reqs if r[0] in ("PUT", "POST") and "/checkpoint_epoch_" in r[1]]
    assert data_gets and ckpt_puts
    assert {key for _, _, key in reqs} == {KEY}, sorted({key for _, _, key in reqs})
    assert fsspec.config.conf == before


# --- mmbatch submit: no token over plain http to another machine ------------------------------------------
@pytest.mark.parametrize("address,refused", [
    ("http://10.0.0.5:8265", True), ("http://head.example.com:8265", True), ("http://[2001:db8::1]:8265", True),
    ("http://127.0.0.1:8265", False), ("http://127.8.9.10:8265", False), ("http://localhost:8265", False),
    ("http://[::1]:8265", False), ("https://head.example.com:8265", False)])
def test_plain_http_refusal(address, refused):
    from mmbatch.ops.submit import AuthToken, plain_http_refusal

    token = AuthToken(SECRET, "$RAY_AUTH_TOKEN")
    why = plain_http_refusal(address, token)
    assert (why is not None) == refused, why
    assert plain_http_refusal(address, token, insecure=True) is None
    assert plain_http_refusal(address, None) is None                 # no token, nothing to protect
    assert why is None or (SECRET not in why and "--insecure" in why)


def test_submit_refuses_a_token_over_http_to_another_machine(monkeypatch, capsys):
    from mmbatch.cli import main
    from mmbatch.ops.submit import submit_cli

    monkeypatch.setenv("RAY_AUTH_TOKEN", SECRET)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    # 192.0.2.1 (TEST-NET) would hang if contacted: the refusal comes before any connection
    assert main(["submit", "--address", "http://192.0.2.1:8265", "--", "inspect", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plain http://" in err and SECRET not in err
    # loopback is allowed: this one is tried (nothing listens there: "cannot reach", exit 1)
    buf = io.StringIO()
    assert submit_cli(["inspect", "x"], address=f"http://127.0.0.1:{_free_port()}", out=io.StringIO(), err=buf) == 1
    assert "cannot reach" in buf.getvalue() and "plain http://" not in buf.getvalue()


# --- private staging folders -------------------------------------------------------------------------------
def test_staging_folders_are_private_unpredictable_and_only_ours_are_removed(monkeypatch, tmp_path):
    from mmbatch.train.loop import STAGING_MARKER, make_staging_dir, remove_staging_dirs, staging_dirs

    base = tmp_path / "tmp"
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    config = {"fingerprint": "fp", "train": {"out": "/x", "name": "run"}}
    a, b = make_staging_dir(config), make_staging_dir(config)
    assert a != b and os.path.dirname(a) == str(base)
    for d in (a, b):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    prefix = os.path.basename(a)[:-len(os.path.basename(a).rsplit("-", 1)[-1])]     # mmbatch-ckpt-<key>-
    assert len(os.path.basename(a)) - len(prefix) >= 8                               # a random part
    assert sorted(staging_dirs(config)) == sorted([a, b])
    # look-alikes under the same name: world-readable, without the marker, a link to a marked folder
    shared = base / f"{prefix}shared"
    shared.mkdir(mode=0o755)
    (shared / STAGING_MARKER).write_text(open(os.path.join(a, STAGING_MARKER)).read())
    os.chmod(shared, 0o755)
    unmarked = base / f"{prefix}unmarked"
    unmarked.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / STAGING_MARKER).write_text(open(os.path.join(a, STAGING_MARKER)).read())
    (base / f"{prefix}link").symlink_to(elsewhere)
    other_run = make_staging_dir({**config, "fingerprint": "another"})
    remove_staging_dirs(config)
    assert not os.path.exists(a) and not os.path.exists(b)
    for kept in (shared, unmarked, elsewhere, base / f"{prefix}link", other_run):
        assert os.path.exists(kept), kept
    assert (elsewhere / STAGING_MARKER).exists()
    assert staging_dirs(config) == []
