"""The shipped operations files: cluster.yaml, workflows/*.yaml and the Kubernetes manifests."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
K8S = WORKFLOWS / "k8s"
EXPECTED_WORKFLOWS = {"imagenet_features.yaml", "librispeech_features.yaml", "timit_features.yaml",
                      "train_fusion.yaml", "retrain.yaml", "imagenet_clip.yaml", "librispeech_wav2vec2.yaml"}


def _ray_schema() -> dict:
    import ray.autoscaler
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


# --- cluster.yaml -------------------------------------------------------------------------
def test_cluster_yaml_validates_against_the_installed_ray_schema():
    import jsonschema

    jsonschema.validate(_cluster(), _ray_schema())


def test_cluster_yaml_passes_rays_own_checks_after_filling_defaults():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster()
    validate_config(cfg)
    validate_config(prepare_config(cfg))


def test_cluster_yaml_node_types_and_security():
    cfg = _cluster()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [n for n, t in types.items() if n != cfg["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and cpu, "needs a CPU worker type (decode) and a GPU worker type (extract/train)"
    for t in gpu + [types[n] for n in cpu]:
        assert t["max_workers"] >= t["min_workers"] >= 0
    # CUDA torch on GPU nodes, CPU torch elsewhere
    assert any("whl/cu" in c for c in gpu[0]["worker_setup_commands"])
    assert any("whl/cpu" in c for c in cfg["setup_commands"])
    assert any("mmbatch" in c for c in cfg["setup_commands"])
    # dashboard only on the head's loopback; token auth on every node; the token shipped by file_mounts
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    text = (ROOT / "cluster.yaml").read_text()
    assert "ray dashboard cluster.yaml" in text and "type: gcp" in text


# --- workflow files --------------------------------------------------------------------------
def test_every_workflow_file_loads_and_is_documented():
    from mmbatch.config import load_workflow

    files = sorted(WORKFLOWS.glob("*.yaml"))
    assert EXPECTED_WORKFLOWS <= {f.name for f in files}
    for f in files:
        wf = load_workflow(f)
        assert wf.name
        head = f.read_text().splitlines()[:8]
        assert head[0].startswith("# ") and sum(line.startswith("#") for line in head) >= 5, f
        assert "mmbatch " in f.read_text(), f"{f.name}: document how to run it"


def test_workflow_contents_fit_their_purpose():
    from mmbatch.config import load_workflow

    img = load_workflow(WORKFLOWS / "imagenet_features.yaml")
    assert img.datasets[0].modalities == ["image"]
    for name in ("librispeech_features.yaml", "timit_features.yaml"):
        wf = load_workflow(WORKFLOWS / name)
        assert set(wf.datasets[0].modalities) == {"audio", "text"}
    train = load_workflow(WORKFLOWS / "train_fusion.yaml")
    assert train.train.data and set(train.train.modalities) == {"audio", "text"}
    clip = load_workflow(WORKFLOWS / "imagenet_clip.yaml")
    assert (clip.features.image.extractor, clip.datasets[0].modalities) == ("hf", ["image"])
    assert clip.features.image.model_path.endswith("clip-vit-base-patch32")
    w2v = load_workflow(WORKFLOWS / "librispeech_wav2vec2.yaml")
    assert (w2v.features.audio.extractor, w2v.features.text.extractor) == ("hf", "hf") and w2v.features.audio.layer
    for wf in (clip, w2v):                      # the docs say how to make each folder
        assert "save_pretrained" in (WORKFLOWS / f"{wf.name.replace('-', '_')}.yaml").read_text()
    rt = load_workflow(WORKFLOWS / "retrain.yaml")
    assert rt.datasets and rt.retrain.registry and rt.retrain.metric in ("accuracy", "macro_f1")


# --- Kubernetes manifests ------------------------------------------------------------------------
def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _parse_mmbatch(command: list[str]):
    """The mmbatch command line parses with the real CLI parser."""
    from mmbatch.cli import build_parser

    assert command[0] == "mmbatch", command
    return build_parser().parse_args(command[1:])


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values()
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "needs a GPU worker group"
    for g in groups.values():
        assert g["maxReplicas"] >= g["minReplicas"] >= 0


def test_rayjob_manifest():
    (job,) = _docs("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    args = _parse_mmbatch(shlex.split(spec["entrypoint"]))
    assert args.command in ("preprocess", "train", "retrain", "ingest")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_raycronjob_manifest():
    (cron,) = _docs("raycronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    assert set(spec) <= {"schedule", "jobTemplate", "suspend"}, "fields of KubeRay 1.6 RayCronJobSpec"
    tmpl = spec["jobTemplate"]
    args = _parse_mmbatch(shlex.split(tmpl["entrypoint"]))
    assert args.command == "retrain"
    assert tmpl["rayClusterSpec"]["authOptions"]["mode"] == "token"
    _check_ray_cluster_spec(tmpl["rayClusterSpec"])


def test_cronjob_submit_manifest():
    docs = _docs("cronjob-submit.yaml")
    kinds = {(d["apiVersion"], d["kind"]): d for d in docs}
    cron = kinds[("batch/v1", "CronJob")]
    cluster = kinds[("ray.io/v1", "RayCluster")]
    _check_ray_cluster_spec(cluster["spec"])
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    args = _parse_mmbatch(container["command"])
    assert args.command == "submit" and args.wait
    assert f"{cluster['metadata']['name']}-head-svc" in args.address
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    assert rest[0] == "retrain"
    # the token only ever comes from a Secret, in the submitting pod and every Ray container
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    text = (K8S / "cronjob-submit.yaml").read_text()
    assert not re.search(r"RAY_AUTH_TOKEN\S*\s+value:", text)


def test_k8s_readme_covers_every_manifest():
    readme = (K8S / "README.md").read_text()
    for f in K8S.glob("*.yaml"):
        assert f.name in readme


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycronjob.yaml", "cronjob-submit.yaml"])
def test_k8s_manifests_have_names_and_no_literal_tokens(name):
    for d in _docs(name):
        assert d["metadata"]["name"]
    assert "auth_token:" not in (K8S / name).read_text().replace("key: auth_token", "")
