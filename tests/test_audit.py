"""`mmbatch audit` (#37): scoring on small arrays, the fold models, train.exclude, config validation,
the report; the whole command on a planted-noise corpus in the slow tier."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from benchmarks import audit_corpus as ac
from mmbatch.audit import folds as F
from mmbatch.audit.score import FUSED, LABEL_ERROR, find_issues, precision_recall
from mmbatch.config import WorkflowError, workflow_from_dict
from mmbatch.errors import UsageError
from mmbatch.train.data import FusedData
from mmbatch.train.exclude import read_exclude


# --- scoring on small arrays (cleanlab, no Ray) ------------------------------------------------------
def _onehot_probs(labels, k, conf, rng):
    p = np.full((len(labels), k), (1 - conf) / (k - 1))
    p[np.arange(len(labels)), labels] = conf
    p += rng.uniform(0, 0.02, p.shape)
    return p / p.sum(1, keepdims=True)


def planted_probs(n=300, k=3, seed=0):
    """Views that agree with the true class, then: rows 0-9 relabelled (every view says the true class),
    rows 10-19 with an image of another class, rows 20-29 with audio of another class, row 30 missing
    its audio (nothing to say there)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    given = true.copy()
    given[:10] = (true[:10] + 1) % k
    img_cls, aud_cls = true.copy(), true.copy()
    img_cls[10:20] = (true[10:20] + 1) % k
    aud_cls[20:30] = (true[20:30] + 2) % k
    probs = {"image": _onehot_probs(img_cls, k, 0.99, rng), "audio": _onehot_probs(aud_cls, k, 0.98, rng),
             FUSED: _onehot_probs(true, k, 0.9, rng)}
    probs[FUSED][10:30] = 1.0 / k            # the fused view is torn where one modality disagrees
    probs["audio"][30] = np.nan
    return given, probs


def test_find_issues_finds_planted_label_errors_and_mismatches():
    y, probs = planted_probs()
    found = find_issues(y, probs, ["image", "audio"])
    kind = found["kind"]
    assert set(np.flatnonzero(kind == LABEL_ERROR)) == set(range(10))
    assert set(np.flatnonzero(kind == "mismatched_image")) == set(range(10, 20))
    assert set(np.flatnonzero(kind == "mismatched_audio")) == set(range(20, 30))
    assert (kind[30:] == None).all()  # noqa: E711
    assert (found["suggested"][:10] == (y[:10] - 1) % 3).all()        # the true class
    assert (found["score"][:30] > 0).all() and (found["score"][30:] == 0).all()
    assert list(found["modality"][10:12]) == ["image", "image"]


def test_a_row_one_modality_backs_is_no_label_error():
    y, probs = planted_probs()
    probs["audio"][:10] = _onehot_probs(y[:10], 3, 0.9, np.random.default_rng(1))   # audio backs the label
    kind = find_issues(y, probs, ["image", "audio"])["kind"]
    assert not (kind[:10] == LABEL_ERROR).any()


def test_min_odds_and_a_single_modality():
    y, probs = planted_probs()
    kind = find_issues(y, probs, ["image", "audio"], min_odds=500)["kind"]
    assert not any(str(k).startswith("mismatched") for k in kind)      # the views' odds are about 40-100
    one = find_issues(y, {FUSED: probs[FUSED], "image": probs[FUSED]}, ["image"])["kind"]
    assert not any(str(k).startswith("mismatched") for k in one)       # nothing to compare with
    assert set(np.flatnonzero(one == LABEL_ERROR)) == set(range(10))


def test_precision_recall():
    assert precision_recall({"a", "b"}, {"a", "c"}) == {"flagged": 2, "planted": 2, "hit": 1, "precision": 0.5,
                                                        "recall": 0.5}
    assert precision_recall(set(), set())["precision"] == 1.0


def test_folds_are_stratified_and_fit_predict_learns():
    y = np.repeat(np.arange(3), 40)
    folds = F.fold_of(y, 4, seed=0)
    for k in range(4):
        assert sorted(set(y[folds == k])) == [0, 1, 2]
        assert 25 <= (folds == k).sum() <= 35
    rng = np.random.default_rng(0)
    emb = (np.eye(3)[y] * 3 + rng.normal(size=(120, 3)) * 0.3).astype(np.float32)
    arrays = {"y": y, "image_emb": emb, "has_image": np.ones(120, bool)}
    spec = {"name": "t", "modalities": ["image"], "classes": [{"id": i, "name": str(i)} for i in range(3)],
            "arch": __import__("mmbatch.train.models", fromlist=["arch_spec"]).arch_spec("early", {"image": 3}, 3,
                                                                                         16, 0.0)}
    cfg = {**workflow_from_dict({}).train.model_dump(mode="json"), "epochs": 8, "seed": 0}
    p = F.fit_predict(arrays, np.flatnonzero(folds != 0), np.flatnonzero(folds == 0), spec, cfg)
    assert p.shape == ((folds == 0).sum(), 3) and np.allclose(p.sum(1), 1)
    assert (p.argmax(1) == y[folds == 0]).mean() > 0.9


# --- train.exclude -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return ac.build_corpus(str(tmp_path_factory.mktemp("audit") / "fused"), n=400, seed=3)


def test_read_exclude_parquet_csv_and_errors(tmp_path):
    pq.write_table(pa.table({"sample_id": ["a", "b"], "kind": ["x", "y"]}), tmp_path / "x.parquet")
    (tmp_path / "x.csv").write_text("sample_id,why\nc,1\nd,2\n")
    assert read_exclude(str(tmp_path / "x.parquet")) == {"a", "b"}
    assert read_exclude(str(tmp_path / "x.csv")) == {"c", "d"}
    assert read_exclude(None) == frozenset()
    (tmp_path / "bad.csv").write_text("id\n1\n")
    (tmp_path / "x.txt").write_text("a\n")
    for name, why in (("missing.parquet", "not found"), ("bad.csv", "no sample_id column"),
                      ("x.txt", "neither .parquet nor .csv")):
        with pytest.raises(UsageError, match=f"train.exclude: .*{why}"):
            read_exclude(str(tmp_path / name))


def test_exclude_leaves_train_and_validation_rows_out_never_test(corpus):
    full = FusedData.open(corpus.path)
    light = pq.read_table(corpus.path, columns=["sample_id", "split"]).to_pylist()
    by_split = {s: [r["sample_id"] for r in light if r["split"] == s] for s in ("train", "validation", "test")}
    drop = frozenset(by_split["train"][:7] + by_split["validation"][:3] + by_split["test"][:5])
    part = FusedData.open(corpus.path, exclude=drop)
    sizes, base = part.split_sizes(), full.split_sizes()
    assert sizes == {"train": base["train"] - 7, "validation": base["validation"] - 3, "test": base["test"]}
    assert part.excluded == 10
    assert len(part.arrays("train", ["image"])["y"]) == base["train"] - 7
    assert len(part.arrays("validation", ["image"])["y"]) == base["validation"] - 3
    assert len(part.arrays("test", ["image"])["y"]) == base["test"]
    # the exclusion is part of the data's fingerprint, hence of the run's
    assert part.fingerprint != full.fingerprint
    assert FusedData.open(corpus.path, exclude=drop).fingerprint == part.fingerprint
    assert FusedData.open(corpus.path, exclude=frozenset()).fingerprint == full.fingerprint


def test_exclude_is_in_the_run_fingerprint_and_absent_when_unset(corpus, tmp_path):
    from mmbatch.train.run import model_spec, run_fingerprint

    ids = pq.read_table(corpus.path, columns=["sample_id"]).column("sample_id").to_pylist()
    pq.write_table(pa.table({"sample_id": ids[:20]}), tmp_path / "ex.parquet")
    wf = workflow_from_dict({"train": {"data": corpus.path}})
    assert "exclude" not in wf.train_record()             # unset: every existing fingerprint stays as it was
    wf_ex = workflow_from_dict({"train": {"data": corpus.path, "exclude": str(tmp_path / "ex.parquet")}})
    data = FusedData.open(corpus.path)
    data_ex = FusedData.open(corpus.path, exclude=read_exclude(wf_ex.train.exclude))
    fp = run_fingerprint(model_spec(wf, data, ["image", "audio"], "f"), None)
    fp_ex = run_fingerprint(model_spec(wf_ex, data_ex, ["image", "audio"], "f"), None)
    assert fp != fp_ex
    assert model_spec(wf_ex, data_ex, ["image", "audio"], "f")["data"]["excluded"] == data_ex.excluded > 0


# --- config and CLI -----------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ({"audit": {"folds": 1}}, "audit.folds"),
    ({"audit": {"splits": ["train", "dev"]}}, "audit.splits"),
    ({"audit": {"min_odds": 0.5}}, "audit.min_odds"),
    ({"audit": {"cpus_per_task": 0}}, "audit.cpus_per_task"),
    ({"audit": {"foldz": 3}}, "audit.foldz"),
    ({"retrain": {"audit": "quarantine"}}, "retrain.audit"),
    ({"train": {"exclude": 3}}, "train.exclude"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(WorkflowError, match=key.replace(".", r"\.")):
        workflow_from_dict(override)


def test_audit_defaults_and_the_retrain_audit_folder():
    wf = workflow_from_dict({"output": {"path": "/data/x/features"}})
    assert wf.audit.folds == 5 and wf.retrain.audit == "off" and wf.audit_out() == "/data/x/audit"
    assert workflow_from_dict({"audit": {"out": "/a"}}).audit_out() == "/a"


def test_retrain_train_fingerprint_changes_only_with_audit_exclude():
    from mmbatch.ops.retrain import train_fingerprint

    base = train_fingerprint(workflow_from_dict({}))
    assert train_fingerprint(workflow_from_dict({"retrain": {"audit": "report"}})) == base
    assert train_fingerprint(workflow_from_dict({"retrain": {"audit": "exclude"}})) != base


def test_retrain_audit_step_off_and_a_conflicting_exclude():
    from mmbatch.ops.retrain import audit_step

    assert audit_step(workflow_from_dict({})) is None
    wf = workflow_from_dict({"retrain": {"audit": "exclude"}, "train": {"exclude": "/x/ids.csv"}})
    with pytest.raises(UsageError, match="retrain.audit: exclude .* train.exclude is already /x/ids.csv"):
        audit_step(wf)


def test_cli_has_audit_and_owns_its_folder(tmp_path, capsys):
    from mmbatch.cli import main
    from mmbatch.engine import ownership

    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    assert "mmbatch audit" in capsys.readouterr().out
    ownership.claim(str(tmp_path / "d"), "duplicates")
    with pytest.raises(UsageError, match="not a audit folder"):
        ownership.claim(str(tmp_path / "d"), "audit")


# --- the report ---------------------------------------------------------------------------------------
def _canonical_with_media(path, ids):
    img = cv2.imencode(".jpg", np.full((40, 40, 3), 120, np.uint8))[1].tobytes()
    import io
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000, format="FLAC")
    media = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"sample_id": ids, "image": pa.array([{"bytes": img, "path": "a.jpg"}] * len(ids), media),
                             "audio": pa.array([{"bytes": buf.getvalue(), "path": "a.flac"}] * len(ids), media),
                             "text": [f"a <b>text</b> {i}" for i in ids]}), str(path / "part-0.parquet"))


def test_report_shows_media_texts_and_ranks(tmp_path):
    from mmbatch.audit.report import render_report

    (tmp_path / "canon").mkdir()
    _canonical_with_media(tmp_path / "canon", ["s1"])
    issues = pa.table({"sample_id": ["s1", "s2"], "split": ["train", "test"], "kind": ["label_error", "mismatched_image"],
                       "score": [0.9, 0.5], "given_label": ["cat", "dog"], "suggested_label": ["dog", None],
                       "modality": [None, "image"], "fused_top": ["dog", "dog"], "fused_prob": [0.8, 0.4],
                       "image_top": ["dog", "cat"], "image_prob": [0.7, 0.9]})
    summary = {"data": "x", "views": {"fused": {"rows": 2, "accuracy": 0.5}, "image": {"rows": 2, "accuracy": 0.5}},
               "rows": {"train": 1, "test": 1}, "counts": {"label_error": {"train": 1}}}
    wf = workflow_from_dict({"datasets": [{"name": "c", "path": str(tmp_path / "canon")}]})
    page = render_report(issues, summary, wf)
    assert page.index("s1") < page.index("s2")
    assert "<img src='data:image/png;base64," in page and "<audio controls" in page
    assert "a &lt;b&gt;text&lt;/b&gt; s1" in page                      # texts escaped
    assert "media not found" in page                                   # s2 has none


# --- the whole command (Ray) ---------------------------------------------------------------------------
@pytest.mark.slow
def test_audit_command_finds_planted_errors_and_train_excludes_them(ray_session, tmp_path):
    from mmbatch.cli import main

    c = ac.build_corpus(str(tmp_path / "fused"), n=900, seed=1, noise=1.6)
    wf = tmp_path / "wf.yaml"
    wf.write_text(json.dumps({"train": {"data": c.path, "epochs": 2, "num_workers": 1, "out": str(tmp_path / "train")},
                              "audit": {"folds": 3, "epochs": 10}}))
    out = tmp_path / "audit"
    assert main(["audit", str(wf), "--out", str(out)]) == 3
    issues = pq.read_table(str(out / "issues.parquet"))
    assert {"sample_id", "split", "kind", "score", "given_label", "suggested_label", "fused_top", "fused_prob",
            "image_top", "image_prob", "audio_top", "audio_prob"} <= set(issues.column_names)
    s = ac.score(c, issues)
    assert s["label_error"]["precision"] >= 0.8 and s["label_error"]["recall"] >= 0.7, s
    assert s["mismatched"]["precision"] >= 0.7 and s["mismatched"]["recall"] >= 0.7, s
    summary = json.loads((out / "summary.json").read_text())
    assert sum(sum(v.values()) for v in summary["counts"].values()) == issues.num_rows
    assert "<table>" in (out / "report.html").read_text()
    # train without the flagged rows
    assert main(["train", str(wf), "--set", f"train.exclude={out / 'issues.parquet'}"]) == 0
    spec = json.loads((tmp_path / "train" / "fusion" / "model" / "model.json").read_text())
    flagged_tv = sum(1 for sp in issues.column("split").to_pylist() if sp in ("train", "validation"))
    assert spec["data"]["excluded"] == flagged_tv
    assert sum(spec["data"]["counts"]["test"].values()) == sum(1 for r in pq.read_table(c.path, columns=["split"])
                                                               .column("split").to_pylist() if r == "test")


@pytest.mark.slow
def test_audit_on_s3(ray_session, tmp_path):
    """The fused data, the audit folder and train.exclude's file on s3:// (moto on loopback; the
    endpoint and keys from the workflow's storage key, so no process-wide AWS variable is touched)."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    from mmbatch.audit.run import run_audit
    from mmbatch.engine import storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "audit-key", "secret": "audit-secret"}
    saved = storage.options()
    try:
        fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
        fs.mkdir("audit-bucket")
        c = ac.build_corpus(str(tmp_path / "fused"), n=300, seed=2, noise=1.6)
        fs.put(c.path + "/", "audit-bucket/fused/", recursive=True)
        wf = workflow_from_dict({"train": {"data": "s3://audit-bucket/fused"}, "storage": {"s3": opts},
                                 "audit": {"folds": 3, "epochs": 6}})
        res = run_audit(wf, "s3://audit-bucket/audit")
        fs.invalidate_cache()
        assert {p.rsplit("/", 1)[-1] for p in fs.ls("audit-bucket/audit")} >= {"issues.parquet", "summary.json",
                                                                               "report.html", "_mmbatch.json"}
        assert read_exclude("s3://audit-bucket/audit/issues.parquet") == \
            frozenset(res.issues.column("sample_id").to_pylist()) and res.flagged > 0
    finally:
        storage._OPTIONS.clear()
        storage.configure(saved)
        server.stop()
