"""Training stage: splits, models, export/scoring, and real Ray Train runs on generated fused data.

The Ray tests share one session-wide local Ray (``ray_session``, 2 CPUs) and
keep the data tiny (a few hundred rows, 8-dim embeddings, 3-4 epochs).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from fused_data import CLASS_NAMES, extractor_meta, write_fused, xor_rows
from mmbatch import schema
from mmbatch.config import Workflow
from mmbatch.errors import UsageError
from mmbatch.train import run as run_mod
from mmbatch.preprocess.splits import assign_splits, split_plan
from mmbatch.train.data import FusedData, class_balance, to_arrays
from mmbatch.train.evaluate import check_features, compute_metrics, evaluate_arrays, evaluate_cli, evaluate_model
from mmbatch.train.loop import fit_in_memory
from mmbatch.train.models import FUSIONS, FusionModel, arch_spec, drop_modalities, load_model
from mmbatch.train.report import fusion_gain
from mmbatch.train.run import run_training

DIMS = {"image": 8, "audio": 8, "text": 8}
CHANCE = 0.25


def _wf(data, out, name, **train):
    t = {"data": str(data), "out": str(out), "name": name, "epochs": 3, "hidden": 32, "batch_size": 64,
         "num_workers": 1, "schedule": "none", "seed": 0, **train}
    return Workflow.model_validate({"train": t})


# --- splits (pure) -----------------------------------------------------------------------------
def test_split_names_are_normalised_and_kept():
    plan = split_plan({"train", "validation", "test"}, 0.15, 0.15)
    got = assign_splits(["a", "b", "c", "d"], ["train-clean-100", "dev-clean", "test-other", "val"], plan, 0)
    assert list(got) == ["train", "validation", "test", "validation"]


def test_missing_test_is_carved_from_validation_reproducibly():
    ids = [f"s{i}" for i in range(2000)]
    raw = ["train"] * 1000 + ["dev"] * 1000
    plan = split_plan({"train", "validation"}, 0.15, 0.15)
    a = assign_splits(ids, raw, plan, seed=7)
    b = assign_splits(list(reversed(ids)), list(reversed(raw)), plan, seed=7)[::-1]
    assert (a == b).all()                                   # by sample id, not by row position
    assert (a[:1000] == "train").all()                      # train rows untouched
    share = np.mean(a[1000:] == "test")
    assert 0.4 < share < 0.6                                # half of validation (0.15 / (0.15 + 0.15))
    c = assign_splits(ids, raw, plan, seed=8)
    assert (a != c).any()                                   # another seed, another carving


def test_missing_validation_and_test_are_carved_from_train():
    ids = [f"s{i}" for i in range(4000)]
    plan = split_plan({"train"}, 0.2, 0.1)
    got = assign_splits(ids, ["train"] * 4000, plan, seed=0)
    assert abs(np.mean(got == "validation") - 0.2) < 0.03
    assert abs(np.mean(got == "test") - 0.1) < 0.03


def test_rows_without_split_values_are_spread_by_fraction():
    ids = [f"s{i}" for i in range(4000)]
    plan = split_plan({None}, 0.15, 0.25)
    assert plan["mode"] == "unsplit"
    got = assign_splits(ids, [None] * 4000, plan, seed=0)
    assert abs(np.mean(got == "validation") - 0.15) < 0.03
    assert abs(np.mean(got == "test") - 0.25) < 0.03


def test_fused_data_open_without_splits(tmp_path):
    path = write_fused(str(tmp_path / "d"), n=300, splits=None)
    data = FusedData.open(path, seed=0, val_fraction=0.2, test_fraction=0.2)
    sizes = data.split_sizes()
    assert data.plan["mode"] == "unsplit" and sum(sizes.values()) == 300
    assert all(sizes[s] > 30 for s in ("train", "validation", "test"))
    assert [c["name"] for c in data.classes] == CLASS_NAMES
    assert data.features(["audio"])["audio"]["name"] == "logmel_stats"


def test_class_balance():
    cb = class_balance({"a": 30, "b": 10})
    assert cb["max_min_ratio"] == 3.0 and cb["counts"] == {"a": 30, "b": 10}


# --- arrays and models (pure) --------------------------------------------------------------------
def test_to_arrays_masks_missing_and_drops_unlabelled():
    cols = xor_rows(50, seed=1, missing=0.5)
    cols["label"] = [None if i == 0 else (9 if i == 1 else v) for i, v in enumerate(cols["label"])]
    sch = schema.fused_schema(DIMS, 24)
    table = pa.Table.from_pydict(cols, schema=sch)
    arr = to_arrays(table, list(DIMS), DIMS, class_ids=[0, 1, 2, 3])
    assert len(arr["y"]) == 48                              # null label and unknown label 9 dropped
    for m in DIMS:
        has = arr[schema.has_column(m)]
        assert arr[schema.emb_column(m)].shape == (48, 8)
        assert not has.all() and (arr[schema.emb_column(m)][~has] == 0).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_missing_modalities_are_masked_out(fusion):
    torch.manual_seed(0)
    model = FusionModel(DIMS, 4, fusion, hidden=16, dropout=0.0).eval()
    b = {schema.emb_column(m): torch.randn(6, 8) for m in DIMS}
    b.update({schema.has_column(m): torch.tensor([True, True, False, True, False, False]) for m in DIMS})
    b[schema.has_column("image")] = torch.tensor([True, False, True, True, False, False])
    out1 = model(b)
    b2 = dict(b)
    for m in DIMS:          # change the values of every missing embedding: the output must not move
        noise = torch.randn(6, 8) * 100
        b2[schema.emb_column(m)] = torch.where(b[schema.has_column(m)][:, None], b[schema.emb_column(m)], noise)
    assert torch.allclose(out1, model(b2), atol=1e-5)
    w = model.modality_weights(b)
    assert torch.all(w[~model.presence(b)] == 0)
    assert torch.isfinite(out1).all()                       # row 5 has nothing present
    model.train()
    loss = torch.nn.functional.cross_entropy(model(b), torch.tensor([0, 1, 2, 3, 0, 1]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_modality_dropout_never_drops_every_present_modality():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(5000, 3, generator=g) < 0.7
    out = drop_modalities(mask, 0.6, g)
    assert not (out & ~mask).any()                          # never switches a missing one on
    assert (out.any(1) == mask.any(1)).all()                # rows keep at least one present modality
    assert 0.4 < 1 - out.sum().item() / mask.sum().item() < 0.6
    assert torch.equal(drop_modalities(mask, 0.0, g), mask)


def test_compute_metrics():
    y = np.array([0, 0, 1, 1, 2])
    logits = np.eye(3)[[0, 1, 1, 1, 2]] * 5
    m = compute_metrics(y, logits, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert m["per_class"]["a"]["recall"] == 0.5 and m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(np.mean([2 / 3, 0.8, 1.0]))


def test_check_features_names_modality_and_field():
    feats = extractor_meta(DIMS)["features"]
    check_features(feats, extractor_meta(DIMS), DIMS)
    other = extractor_meta(DIMS, audio={"params": {"n_mels": 64, "sample_rate": 16000}})
    with pytest.raises(UsageError, match=r"modality 'audio'.*'params'"):
        check_features(feats, other, DIMS)
    with pytest.raises(UsageError, match=r"modality 'image'.*'version'"):
        check_features(feats, extractor_meta(DIMS, image={"version": "2"}), DIMS)
    with pytest.raises(UsageError, match=r"modality 'text'.*'dim'"):
        check_features(feats, extractor_meta(DIMS), {**DIMS, "text": 16})
    with pytest.raises(UsageError, match="no extractor metadata"):
        check_features(feats, {}, DIMS)


# --- Ray Train runs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xor_data(tmp_path_factory):
    return write_fused(str(tmp_path_factory.mktemp("xor") / "fused"), n=400, seed=0)


@pytest.fixture(scope="module")
def trained(ray_session, xor_data, tmp_path_factory):
    """Fused (early) model + one baseline per modality, 1 worker each."""
    out = tmp_path_factory.mktemp("runs")
    wf = _wf(xor_data, out, "xor")
    return wf, run_training(wf, baselines=True)


@pytest.mark.slow
def test_fusion_beats_every_unimodal_baseline(trained):
    _, res = trained
    fused = res.metrics["accuracy"]
    best_single = max(m["accuracy"] for m in res.baselines.values())
    assert set(res.baselines) == {"image", "audio", "text"}
    # each modality alone separates only 2 of the 4 classes (<= ~0.5); together they separate all 4
    assert fused >= 0.9
    assert best_single <= 0.65
    assert fused - best_single >= 0.3, (fused, {k: v["accuracy"] for k, v in res.baselines.items()})


def test_report_and_metrics_json(trained):
    _, res = trained
    html = open(res.report_path).read()
    assert html.count("data:image/png;base64,") >= 4        # loss, val metric, confusion, baselines
    assert "image only" in html and "fused (early)" in html
    summary = json.load(open(os.path.join(res.run_dir, "metrics.json")))
    assert summary["metrics"]["accuracy"] == pytest.approx(res.metrics["accuracy"])
    assert set(summary["baselines"]) == {"image", "audio", "text"}
    best = max(v["accuracy"] for v in summary["baselines"].values())
    assert summary["gain"]["gain"] == pytest.approx(res.metrics["accuracy"] - best)
    assert summary["gain"]["fusion_wins"] is True and summary["gain"]["warning"] is None
    assert "Gain over the best unimodal model" in html and 'class="warning"' not in html
    cb = summary["data"]["class_balance"]
    assert set(cb["counts"]) == set(CLASS_NAMES) and cb["max_min_ratio"] >= 1.0
    assert len(summary["history"]) == 3 and summary["history"][0]["epoch"] == 0
    for f in ("loss.png", "val_metric.png", "confusion.png", "baselines.png"):
        assert os.path.getsize(os.path.join(res.run_dir, f)) > 1000
    m = res.metrics
    assert set(m) >= {"accuracy", "macro_f1", "loss", "per_class", "confusion"}
    assert np.array(m["confusion"]).sum() == m["n"]


def test_export_loads_weights_only_and_scores_the_same(trained, xor_data):
    _, res = trained
    state = torch.load(os.path.join(res.model_dir, "model.pt"), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    spec = json.load(open(os.path.join(res.model_dir, "model.json")))
    assert spec["classes"] == [{"id": i, "name": n} for i, n in enumerate(CLASS_NAMES)]
    assert spec["features"]["audio"]["name"] == "logmel_stats" and spec["arch"]["fusion"] == "early"
    assert spec["status"] == "complete" and "mmbatch_version" in spec
    model, spec2 = load_model(res.model_dir)
    assert isinstance(model, FusionModel) and spec2["name"] == "xor"
    again = evaluate_model(res.model_dir, xor_data, "test")
    assert again["accuracy"] == pytest.approx(res.metrics["accuracy"])
    # the checkpoint itself carries everything too (state, spec, workflow)
    ck = torch.load(os.path.join(res.checkpoint_path, "state.pt"), weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "best_score", "spec_json", "workflow_json"} <= set(ck)


def test_scoring_refuses_other_extractor_settings(trained, tmp_path):
    _, res = trained
    other = write_fused(str(tmp_path / "other"), n=400, seed=0,
                        meta=extractor_meta(DIMS, audio={"params": {"n_mels": 40, "sample_rate": 16000}}))
    with pytest.raises(UsageError, match=r"modality 'audio'.*'params'"):
        evaluate_model(res.model_dir, other)
    newer = write_fused(str(tmp_path / "newer"), n=400, seed=0, meta=extractor_meta(DIMS, text={"version": "2"}))
    with pytest.raises(UsageError, match=r"modality 'text'.*'version'"):
        evaluate_model(res.model_dir, newer)


def test_evaluate_cli_writes_report(trained, xor_data, tmp_path, capsys):
    _, res = trained
    out = tmp_path / "eval"
    metrics = evaluate_cli(res.model_dir, xor_data, split="test", out=str(out))
    assert metrics["accuracy"] == pytest.approx(res.metrics["accuracy"])
    for f in ("metrics.json", "report.html", "confusion.png"):
        assert (out / f).exists()
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert "accuracy" in capsys.readouterr().out


def test_rerun_of_a_finished_run_does_not_train_again(trained):
    wf, res = trained
    ckpts = sorted(p for p in os.listdir(res.run_dir) if p.startswith("checkpoint_epoch"))
    again = run_training(wf, baselines=True)
    assert again.status == "complete"
    assert again.history == res.history and again.metrics["accuracy"] == pytest.approx(res.metrics["accuracy"])
    assert sorted(p for p in os.listdir(res.run_dir) if p.startswith("checkpoint_epoch")) == ckpts

    # without the export marker, Ray Train itself restores the run from its checkpoint snapshot:
    # the loop starts after the last epoch, so nothing is trained and the export is rebuilt
    os.remove(os.path.join(res.model_dir, "model.json"))
    restored = run_training(wf, baselines=False)
    assert restored.status == "complete"
    assert [h["epoch"] for h in restored.history] == [0, 1, 2] and restored.starts == [0]
    assert sorted(p for p in os.listdir(res.run_dir) if p.startswith("checkpoint_epoch")) == ckpts
    assert restored.metrics["accuracy"] == pytest.approx(res.metrics["accuracy"])


def test_a_changed_run_under_the_same_name_is_refused(trained):
    wf, _ = trained
    changed = wf.model_copy(deep=True)
    changed.train.hidden = 64
    with pytest.raises(UsageError, match="different settings"):
        run_training(changed, baselines=False)


@pytest.mark.slow
def test_two_workers_match_one_worker(trained, monkeypatch):
    """Same data, seed and global batch: 2 DDP workers land within 0.05 accuracy of 1 worker.
    This run streams the train split from Parquet every epoch (no materialisation), and the
    validation split too (rank 0 scores it batch by batch and broadcasts the metrics)."""
    wf, one = trained
    monkeypatch.setattr(run_mod, "MATERIALIZE_BYTES", 0)
    monkeypatch.setattr(run_mod, "VALIDATION_BYTES", 0)
    monkeypatch.setattr("mmbatch.train.evaluate.HOLD_BYTES", 0)     # the streamed sums, not the held split
    two_wf = wf.model_copy(deep=True)
    two_wf.train.name, two_wf.train.num_workers = "xor-2w", 2
    two = run_training(two_wf, baselines=False)
    assert two.history[0]["world_size"] == 2
    # Ray's equal shard split may leave out up to (workers - 1) rows per epoch
    for h1, h2 in zip(one.history, two.history):
        assert h1["train_rows"] - 1 <= h2["train_rows"] <= h1["train_rows"]
    assert abs(two.metrics["accuracy"] - one.metrics["accuracy"]) <= 0.05, \
        (two.metrics["accuracy"], one.metrics["accuracy"])
    # the streamed validation score of the best epoch is the exported model's score on that split
    best = next(h for h in two.history if h["epoch"] == two.spec["training"]["best_epoch"])
    assert best["val_accuracy"] == pytest.approx(two.val_metrics["accuracy"])
    assert best["val_loss"] == pytest.approx(two.val_metrics["loss"], rel=1e-4)


# --- every fusion in a plain torch loop (the same loop code as Ray Train, without Ray) ------------
def _split_arrays(tmp_path, name, **kw):
    data = FusedData.open(write_fused(str(tmp_path / name), **kw))
    return data, {s: data.arrays(s, list(data.dims)) for s in ("train", "validation", "test")}


def _spec(data, fusion, hidden=32):
    return {"arch": arch_spec(fusion, data.dims, len(data.classes), hidden, 0.1), "classes": data.classes}


def _cfg(**kw):
    from mmbatch.config import TrainConfig
    return TrainConfig(**{"epochs": 8, "batch_size": 64, "seed": 0, **kw}).model_dump()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_trains_with_missing_modalities(tmp_path, fusion):
    """25 % of rows miss one modality (a few miss two): has_<m> false, null embedding."""
    data, arr = _split_arrays(tmp_path, "gappy", n=400, seed=5, missing=0.25)
    model, history = fit_in_memory(_spec(data, fusion), arr["train"], arr["validation"], _cfg(modality_dropout=0.3))
    assert len(history) == 8
    res = evaluate_arrays(model, arr["test"], [c["name"] for c in data.classes])
    assert res["accuracy"] > CHANCE + 0.35, res["accuracy"]
    assert all(v > 0 for v in res["missing_rate"].values())
    if fusion in ("weighted", "gated"):
        w = res["modality_weights"]
        assert set(w) == set(DIMS) and sum(w.values()) == pytest.approx(1.0, abs=1e-4)


def _strong_and_weak(n, seed, scale):
    """4 classes; image tells the class with little noise, audio with a lot, text is noise; every
    modality at a very different scale and offset, like HOG / log-mel dB / hashing values."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    centres = {m: np.random.default_rng(10 + j).normal(size=(4, 16)) for j, m in enumerate(DIMS)}
    x = {"image": centres["image"][y] + 1.2 * rng.normal(size=(n, 16)),
         "audio": centres["audio"][y] + 2.6 * rng.normal(size=(n, 16)),
         "text": rng.normal(size=(n, 16))}
    offsets = {"image": 0.0, "audio": -50.0, "text": 0.0}
    arrays = {"y": y}
    for m in DIMS:
        arrays[schema.emb_column(m)] = ((x[m] + offsets[m]) * scale[m]).astype(np.float32)
        arrays[schema.has_column(m)] = np.ones(n, bool)
    return arrays


def test_gated_fusion_keeps_the_strong_modality_whatever_the_input_scale():
    """The issue-16 collapse: with modalities at scales 0.01 / 30 / 1 (and a -50 offset) the gate
    used to starve one modality. Standardised inputs, auxiliary losses and uniform-start gates
    keep every informative modality in play, and fusion beats the best single modality."""
    scale = {"image": 0.01, "audio": 30.0, "text": 1.0}
    tr, va, te = (_strong_and_weak(n, s, scale) for n, s in ((1200, 1), (300, 2), (600, 3)))
    classes = [{"id": i, "name": f"c{i}"} for i in range(4)]
    names = [c["name"] for c in classes]

    def fit(fusion, mods):
        spec = {"arch": arch_spec(fusion, {m: 16 for m in mods}, 4, 32, 0.1), "classes": classes}
        keep = lambda a: {k: v for k, v in a.items() if k == "y" or k.split("_")[-1] in mods  # noqa: E731
                          or k.split("_")[0] in mods}
        model, _ = fit_in_memory(spec, keep(tr), keep(va), _cfg(epochs=10))
        return evaluate_arrays(model, keep(te), names)

    single = {m: fit("early", [m])["accuracy"] for m in DIMS}
    gated = fit("gated", list(DIMS))
    assert single["image"] > 0.8 > single["audio"] > 0.45 and single["text"] < 0.35, single
    assert gated["accuracy"] >= single["image"] + 0.01, (gated["accuracy"], single)
    assert gated["modality_weights"]["image"] >= 0.05 and gated["modality_weights"]["audio"] >= 0.05, \
        gated["modality_weights"]


def test_fusion_gain_warns_when_fused_does_not_win():
    summary = {"model": {"arch": {"fusion": "gated"}}, "metrics": {"accuracy": 0.83},
               "baselines": {"image": {"accuracy": 0.80}, "audio": {"accuracy": 0.94}}}
    g = fusion_gain(summary)
    assert g["best_baseline"] == "audio" and g["gain"] == pytest.approx(-0.11) and not g["fusion_wins"]
    assert "does not beat the best single modality (audio only" in g["warning"]
    summary["metrics"]["accuracy"] = 0.94                       # a tie is not a win either
    assert fusion_gain(summary)["warning"]
    summary["metrics"]["accuracy"] = 0.97
    assert fusion_gain(summary)["warning"] is None and fusion_gain(summary)["gain"] == pytest.approx(0.03)
    summary["metrics"]["unscorable"] = "the test split has only 2 row(s)"
    g = fusion_gain(summary)
    assert g["gain"] is None and "not made" in g["warning"]
    assert fusion_gain({"metrics": {"accuracy": 0.9}, "baselines": {}}) is None


def test_modalities_argument_is_checked_against_the_data(tmp_path):
    data = FusedData.open(write_fused(str(tmp_path / "two"), n=60, dims={"image": 8, "audio": 8}))
    assert run_mod.resolve_modalities(["audio", "image"], data) == ["image", "audio"]
    assert run_mod.resolve_modalities(None, data) == ["image", "audio"]
    with pytest.raises(UsageError, match="only has"):
        run_mod.resolve_modalities(["text"], data)


@pytest.mark.slow
def test_validation_on_read_only_arrays_warns_nothing():
    """Ray Train workers get the validation split from the object store as read-only NumPy
    arrays; scoring them must not make torch warn about non-writable tensors (it did, once in
    every worker's log). A fresh process, because torch gives that warning once per process."""
    import subprocess
    import sys

    code = """
import warnings
import numpy as np
from mmbatch.train.evaluate import evaluate_arrays
from mmbatch.train.models import FusionModel
warnings.simplefilter("error")
dims = {"image": 4, "audio": 3, "text": 2}
rng = np.random.default_rng(0)
arrays = {f"{m}_emb": rng.normal(size=(10, d)).astype(np.float32) for m, d in dims.items()}
arrays.update({f"has_{m}": np.ones(10, bool) for m in dims}, y=rng.integers(0, 2, 10))
for a in arrays.values():
    a.setflags(write=False)
print(evaluate_arrays(FusionModel(dims, 2, "early", 8, 0.0), arrays, ["a", "b"])["accuracy"])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not writable" not in proc.stderr
    assert 0.0 <= float(proc.stdout.strip()) <= 1.0


# --- splits decided once (data with "splits_final": true) ----------------------------------------
def _final_data(path, split_col, n=None, seed=0):
    """Fused XOR rows whose split column is final (as preprocess writes it)."""
    n = n or len(split_col)
    meta = {**extractor_meta(DIMS), "splits_final": True}
    write_fused(path, n=n, seed=seed, meta=meta, splits=None)
    for f in sorted(p for p in os.listdir(path) if p.endswith(".parquet")):   # put the given split values in
        import pyarrow.parquet as pq
        t = pq.read_table(os.path.join(path, f))
        ids = t.column("sample_id").to_pylist()
        col = pa.array([split_col[int(i.split("-")[1])] for i in ids], pa.string())
        t = t.set_column(t.schema.get_field_index("split"), t.schema.field("split"), col)
        pq.write_table(t, os.path.join(path, f))
    return path


def test_final_splits_are_read_as_they_are(tmp_path):
    rng = np.random.default_rng(0)
    col = list(rng.choice(np.array(["train", "dev", "test"], dtype=object), 300, p=[0.5, 0.2, 0.3]))
    data = FusedData.open(_final_data(str(tmp_path / "final"), col), seed=3, val_fraction=0.4, test_fraction=0.4)
    assert data.plan["mode"] == "final"
    assert data.split_sizes() == {"train": col.count("train"), "validation": col.count("dev"), "test": col.count("test")}
    arr = data.arrays("test", list(DIMS))
    assert len(arr["y"]) == col.count("test")
    # the same split values without the marker: old data, so train rows are not carved but the
    # missing-split rules apply (a train-only column gets validation/test carved from it)
    only_train = FusedData.open(_final_data(str(tmp_path / "train-only"), ["train"] * 200), seed=0)
    assert only_train.split_sizes()["test"] == 0 and only_train.split_sizes()["validation"] == 0
    old = FusedData.open(write_fused(str(tmp_path / "old"), n=200, splits=("train",), split_probs=(1.0,)))
    assert old.plan["mode"] == "column" and old.split_sizes()["validation"] > 0 and old.split_sizes()["test"] > 0


def test_a_final_split_too_small_to_score_is_reported(trained, tmp_path, caplog):
    _, res = trained
    col = ["train"] * 150 + ["validation"] * 48 + ["test"] * 2
    path = _final_data(str(tmp_path / "tiny-test"), col)
    data = FusedData.open(path)
    assert data.unscorable() == {"test": "only 2 row(s) (fewer than 10)"}
    m = evaluate_model(res.model_dir, path, "test")
    assert m["n"] == 2 and "only 2 row(s)" in m["unscorable"]
    labels = xor_rows(200, seed=0, splits=None)["label"]     # validation: rows of class 0 only
    one_class = ["validation" if lab == 0 and i % 2 == 0 else ("test" if i % 5 == 0 else "train")
                 for i, lab in enumerate(labels)]
    assert FusedData.open(_final_data(str(tmp_path / "one-class"), one_class)).unscorable() == \
        {"validation": "only one class"}


# --- the warning when fusion does not win, end to end ---------------------------------------------
@pytest.mark.slow
def test_training_warns_when_fusion_cannot_beat_the_best_modality(ray_session, tmp_path, capsys):
    """image alone tells the class perfectly, audio is noise: no fusion can beat image only, so
    the run must say so in the console, metrics.json and report.html."""
    dims = {"image": 8, "audio": 8}
    path = write_fused(str(tmp_path / "perfect-image"), n=240, seed=4, dims=dims, noise=0.05,
                       meta=extractor_meta(dims))
    import pyarrow.parquet as pq
    for f in sorted(p for p in os.listdir(path) if p.endswith(".parquet")):   # audio: noise, independent of the label
        t = pq.read_table(os.path.join(path, f))
        noise = np.random.default_rng(len(f)).normal(size=(t.num_rows, 8)).astype(np.float32)
        col = pa.array(list(noise), schema.embedding_type(8))
        t = t.set_column(t.schema.get_field_index("audio_emb"), t.schema.field("audio_emb"), col)
        t = t.set_column(t.schema.get_field_index("label"), t.schema.field("label"),     # label = bit a
                         pa.array([2 * (v // 2) for v in t.column("label").to_pylist()], pa.int64()))
        pq.write_table(t, os.path.join(path, f))
    res = run_training(_wf(path, tmp_path / "runs", "nowin", epochs=4), baselines=True)
    assert res.baselines["image"]["accuracy"] == 1.0
    assert res.gain["fusion_wins"] is False and res.gain["best_baseline"] == "image"
    out = capsys.readouterr().out
    assert "WARNING: the fused model (early" in out and "gain over the best unimodal model (image only)" in out
    summary = json.load(open(os.path.join(res.run_dir, "metrics.json")))
    assert summary["gain"]["fusion_wins"] is False and "does not beat" in summary["gain"]["warning"]
    assert 'class="warning"' in open(res.report_path).read()


def test_a_model_of_the_previous_architecture_is_refused_with_a_reason():
    from mmbatch.train.models import build_model
    spec = {"name": "old", "arch": {"fusion": "gated", "dims": {"image": 8}, "num_classes": 2, "hidden": 8,
                                    "dropout": 0.1}}          # no "version": written before version 2
    with pytest.raises(UsageError, match="architecture version 1.*retrain it"):
        build_model(spec)
    spec["arch"]["version"] = 2
    assert isinstance(build_model(spec), FusionModel)


def test_best_epoch_breaks_score_ties_by_validation_loss():
    """On a small validation split accuracy ties across epochs: the lower validation loss wins the tie,
    not the first (least trained) epoch."""
    from mmbatch.train.loop import improves

    assert improves(0.5, 1.0, None, None)                      # the first epoch
    assert improves(0.6, 2.0, 0.5, 1.0)                        # a better score, whatever the loss
    assert improves(0.5, 0.9, 0.5, 1.0)                        # the same score, a lower loss
    assert not improves(0.5, 1.1, 0.5, 1.0) and not improves(0.4, 0.1, 0.5, 1.0)


def test_report_header_names_the_model_the_best_epoch_rule_the_test_uncertainty_and_what_plots_show():
    from mmbatch.train.report import render_html, wilson_interval

    hist = [{"epoch": e, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5, "val_macro_f1": 0.5}
            for e in range(12)]
    summary = {"title": "t", "run_dir": "/runs/fusion", "status": "trained", "history": hist,
               "model": {"arch": {"fusion": "early", "dims": {"image": 1764, "audio": 186}, "hidden": 128,
                                  "dropout": 0.1, "num_classes": 4}},
               "best_epoch": 6, "selection_metric": "macro_f1", "metrics": {"n": 24, "accuracy": 0.875}}
    page = render_html(summary, {"loss.png": b"png", "confusion.png": b"png"})
    assert "<tr><th></th>" not in page and '"fusion": "early"' not in page        # no empty row, no raw JSON
    assert "early fusion of image (1764 features), audio (186 features)" in page and "4 classes" in page
    assert "7 of 12: the highest validation macro-F1" in page
    lo, hi = wilson_interval(0.875, 24)
    assert 0.68 < lo < 0.70 and 0.95 < hi < 0.96                 # Wilson 95 % for 21 of 24
    assert f"test split of 24 rows: \u00b1{(hi - lo) / 2:.2f} accuracy at 95 %" in page
    assert 'class="warning">Small test split' in page
    assert "<figcaption>Training and validation loss per epoch</figcaption>" in page
    assert "Confusion matrix on the test split" in page and "<figcaption>loss.png" not in page
    big = render_html({**summary, "metrics": {"n": 5000, "accuracy": 0.875}}, {})
    assert "test split of 5000 rows" in big and "Small test split" not in big
