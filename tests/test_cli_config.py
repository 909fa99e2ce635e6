"""CLI surface and workflow validation (no Ray needed)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mmbatch.cli import build_parser, main
from mmbatch.config import WorkflowError, apply_overrides, load_workflow, workflow_from_dict

SUBCOMMANDS = ["demo", "ingest", "preprocess", "train", "evaluate", "retrain", "submit", "inspect", "registry",
               "convert", "duplicates", "audit"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help_with_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"mmbatch {cmd}" in out


def test_parser_knows_every_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(SUBCOMMANDS) <= set(sub.choices)


def test_overrides_parse_yaml_values_and_nested_keys():
    data = apply_overrides({"train": {"epochs": 3}}, ["train.epochs=7", "train.modalities=[audio, text]",
                                                      "fusion.method=weighted", "ray.num_gpus=0.5"])
    wf = workflow_from_dict(data)
    assert wf.train.epochs == 7 and wf.train.modalities == ["audio", "text"]
    assert wf.fusion.method == "weighted" and wf.ray.num_gpus == 0.5


def test_errors_name_the_key_the_value_and_what_is_allowed():
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({"fusion": {"method": "sum"}})
    msg = str(e.value)
    assert "fusion.method" in msg and "'sum'" in msg and "'concat' or 'weighted'" in msg
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({"train": {"epochz": 3}})
    assert "unknown key 'train.epochz'" in str(e.value)
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({"train": {"epochs": "many"}})
    assert "train.epochs" in str(e.value) and "'many'" in str(e.value)
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({}, overrides=["train.epochs"])
    assert "key.sub=value" in str(e.value)


def test_workflow_yaml_is_loaded_safely(tmp_path):
    f = tmp_path / "wf.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(WorkflowError) as e:
        load_workflow(f)
    assert "not valid YAML" in str(e.value)
    f.write_text("- just\n- a list\n")
    with pytest.raises(WorkflowError, match="mapping"):
        load_workflow(f)


def test_cli_returns_2_for_a_bad_workflow(tmp_path, capsys):
    f = tmp_path / "wf.yaml"
    f.write_text(yaml.safe_dump({"train": {"model": "transformer"}}))
    assert main(["train", str(f)]) == 2
    err = capsys.readouterr().err
    assert "train.model" in err and "'early'" in err


def test_inspect_json_reports_rows_columns_counts_and_metadata(tmp_path, capsys):
    from mmbatch.schema import fused_schema, with_metadata

    schema = with_metadata(fused_schema({"audio": 2}, 2), {"kind": "fused", "dims": {"audio": 2}})
    t = pa.table({"sample_id": ["a", "b", "c"], "source": ["x"] * 3, "split": ["train", "train", "test"],
                  "label": [0, 1, 1], "label_name": ["n0", "n1", "n1"],
                  "audio_emb": pa.array([[0.0, 1.0], None, [2.0, 3.0]], pa.list_(pa.float32(), 2)),
                  "has_audio": [True, False, True],
                  "fused": pa.array([[0.0, 1.0], [0.0, 0.0], [2.0, 3.0]], pa.list_(pa.float32(), 2))},
                 schema=schema)
    pq.write_table(t, tmp_path / "part-0.parquet")
    assert main(["inspect", str(tmp_path), "--json"]) == 2          # fused, but no manifest: refused ...
    assert "_manifest.json" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path), "--json", "--allow-incomplete"]) == 0    # ... unless allowed
    info = json.loads(capsys.readouterr().out)
    assert len(info["problems"]) == 1 and "_manifest.json" in info["problems"][0]
    assert info["rows"] == 3 and "audio_emb" in info["columns"]
    assert info["counts"]["split"] == {"test": 1, "train": 2} and info["counts"]["label"] == {"0": 1, "1": 2}
    assert info["presence"] == {"audio": 2} and info["metadata"]["kind"] == "fused"
    assert main(["inspect", str(tmp_path), "--allow-incomplete"]) == 0
    assert "modality presence: audio 2/3" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 2


def test_unknown_keys_get_a_suggestion_and_the_allowed_keys():
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({"train": {"epochz": 3}})
    msg = str(e.value)
    assert "did you mean 'epochs'?" in msg and "allowed keys in train:" in msg and "max_failures" in msg
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({"datasets": [{"name": "a", "path": "p", "modalites": ["image"]}]})
    assert "unknown key 'datasets.0.modalites': did you mean 'modalities'?" in str(e.value)
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({"outptu": {}})
    assert "did you mean 'output'?" in str(e.value) and "allowed keys in the top level:" in str(e.value)
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({"features": {"image": {"zzz": 1}}})
    assert "did you mean" not in str(e.value) and "allowed keys in features.image: extractor, size" in str(e.value)


def test_paths_in_a_workflow_file_are_relative_to_the_file(tmp_path, monkeypatch):
    wf_dir = tmp_path / "project" / "workflows"
    wf_dir.mkdir(parents=True)
    f = wf_dir / "wf.yaml"
    f.write_text(yaml.safe_dump({"datasets": [{"name": "a", "path": "../data/canonical"}],
                                 "output": {"path": "../data/features"}}))
    monkeypatch.chdir(tmp_path)                   # somewhere else entirely
    wf = load_workflow(f)
    project = (tmp_path / "project").resolve()
    assert wf.datasets[0].path == str(project / "workflows" / "../data/canonical")
    assert wf.output.path == str(project / "workflows" / "../data/features")
    # train.out defaults next to the features; retrain.registry's default is next to the file
    assert wf.train.out == str(project / "workflows" / "../data/train")
    assert wf.retrain.registry == str(project / "workflows" / "out/registry")
    # defaults are relative to the file too; --set paths stay as typed (relative to the current folder)
    f.write_text(yaml.safe_dump({"name": "x"}))
    wf = load_workflow(f, ["train.out=runs", "output.path=s3://bucket/features"])
    assert wf.train.out == "runs" and wf.output.path == "s3://bucket/features"
    wf = load_workflow(f)
    assert wf.output.path == str(project / "workflows" / "out/features")
    assert wf.train.out == str(project / "workflows" / "out/train")
    # without a file (a dict), train.out still defaults next to the training data
    assert workflow_from_dict({"train": {"data": "s3://b/feats"}}).train.out == "s3://b/train"
    assert workflow_from_dict({}).train.out == "out/train"


def test_splits_section_owns_the_split_settings_and_the_old_train_keys_still_work(caplog):
    wf = workflow_from_dict({"splits": {"seed": 7, "val_fraction": 0.2, "test_fraction": 0.1}, "train": {"seed": 1}})
    assert (wf.splits.seed, wf.splits.val_fraction, wf.splits.test_fraction, wf.train.seed) == (7, 0.2, 0.1, 1)
    caplog.clear()
    old = workflow_from_dict({"train": {"val_fraction": 0.3, "seed": 5}}, overrides=["train.test_fraction=0.05"])
    assert (old.splits.seed, old.splits.val_fraction, old.splits.test_fraction, old.train.seed) == (5, 0.3, 0.05, 5)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3, warnings                        # one line per deprecated key
    assert any("train.val_fraction is deprecated: use splits.val_fraction" in w for w in warnings)
    assert any("train.test_fraction is deprecated: use splits.test_fraction" in w for w in warnings)
    assert any("set splits.seed" in w for w in warnings)
    same = workflow_from_dict({"train": {"val_fraction": 0.2}, "splits": {"val_fraction": 0.2}})
    assert same.splits.val_fraction == 0.2


def test_old_and_new_split_keys_that_disagree_are_an_error_naming_both():
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({"train": {"test_fraction": 0.2}, "splits": {"test_fraction": 0.1}})
    assert "train.test_fraction" in str(e.value) and "splits.test_fraction" in str(e.value)
    with pytest.raises(WorkflowError) as e:
        workflow_from_dict({"splits": {"val_fraction": 1.5}})
    assert "splits.val_fraction" in str(e.value) and "less than 1" in str(e.value)


def test_train_record_keeps_the_fingerprinted_keys_of_before_the_splits_section():
    """Model specs, run and retrain fingerprints hash the train settings: the fractions stay in them."""
    from mmbatch.ops.retrain import train_fingerprint

    new = workflow_from_dict({"splits": {"val_fraction": 0.2}})
    old = workflow_from_dict({"train": {"val_fraction": 0.2}})
    assert new.train_record()["val_fraction"] == 0.2 and new.train_record()["test_fraction"] == 0.15
    assert train_fingerprint(new) == train_fingerprint(old)
    assert train_fingerprint(new) != train_fingerprint(workflow_from_dict({}))


def test_the_next_hint_after_preprocess_keeps_the_set_overrides():
    """Following the hint must train on what preprocess wrote: the same --set values, quoted for a shell."""
    import shlex

    from mmbatch.cli import _with_overrides

    args = build_parser().parse_args(["preprocess", "wf.yaml", "--set", "output.path=/tmp/my features",
                                      "--set", "features.image.size=32"])
    hint = _with_overrides("mmbatch train wf.yaml --baselines", args)
    again = build_parser().parse_args(shlex.split(hint)[1:])
    assert again.command == "train" and again.baselines
    assert again.overrides == ["output.path=/tmp/my features", "features.image.size=32"]
