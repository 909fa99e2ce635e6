"""mmbatch.engine.capacity without Ray: node types as the launcher's config file gives them (a real YAML file in a
temporary HOME) and running nodes as plain dicts; every stage's question answered from the same data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_autoscale import autoscaling_config     # the fake cluster's config: 0-CPU head, cpu2 x3, gpu1 x2

from mmbatch.engine import capacity
from mmbatch.engine.capacity import Cluster
from mmbatch.train.run import rank_placement

HEAD = {"CPU": 0.0, "memory": 2e9, "object_store_memory": 2e8}
GPU_NODE = {"CPU": 2.0, "GPU": 1.0, "memory": 2e9, "object_store_memory": 2e8}
BARE_HEAD = {"ray.head.default"}         # the node types the v1 autoscaler's status names on a bare head


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    """The fake cluster's launcher config at ``$HOME/ray_bootstrap_config.yaml``, as ``ray up`` puts it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ray_bootstrap_config.yaml").write_text(json.dumps(autoscaling_config()))   # JSON is YAML
    return tmp_path


def bare_head() -> Cluster:
    return Cluster([HEAD], capacity.node_types(None, BARE_HEAD))


def test_preprocess_and_train_agree_on_the_gpus_the_cluster_can_have(fake_home):
    cluster = bare_head()
    # preprocess: a model worker's GPU share unasked, the fused pool, the split shape's embed pool
    assert capacity.gpu_share(cluster) == 0.5
    assert capacity.pool_size(cluster, 1, 0.5, units=100) == 4
    assert capacity.pool_size(cluster, 0, 1, units=100) == 2
    # train, use_gpu: auto
    assert capacity.gpus(cluster) == (0.0, 2.0)
    place = rank_placement("auto", 4, 1, *capacity.gpus(cluster))
    assert (place.num_workers, place.use_gpu) == (2, True)
    assert "asking the autoscaler for 2 more GPU(s)" in place.note


def test_cpu_work_is_sized_from_the_cpu_node_types(fake_home):
    cluster = bare_head()
    assert capacity.can_have(cluster)["CPU"] == 10                   # every node type at its limit
    assert capacity.can_have(cluster, gpu_work=False)["CPU"] == 6    # the CPU-only types: 3 x 2
    assert capacity.pool_size(cluster, 1, 0, units=2000) == 6
    assert capacity.task_cpus(cluster) == 6
    # GPU nodes already running lend their CPUs: nothing has to start for them
    running = Cluster([HEAD, GPU_NODE, GPU_NODE], cluster.types)
    assert capacity.pool_size(running, 1, 0, units=2000) == 10
    # no CPU-only node type: CPU work goes where the CPUs are, GPU nodes included
    gpu_only = Cluster([HEAD], [t for t in cluster.types if t["resources"].get("GPU") or t["max_count"] == 1])
    assert capacity.pool_size(gpu_only, 1, 0, units=2000) == 4


def test_a_pool_never_exceeds_its_units_nor_max_workers(fake_home):
    cluster = bare_head()
    assert capacity.pool_size(cluster, 1, 0, units=2) == 2
    assert capacity.pool_size(cluster, 1, 0.5, units=3) == 3
    assert capacity.pool_size(cluster, 1, 0, units=100, max_workers=5) == 5
    assert capacity.pool_size(cluster, 1, 0, units=1, max_workers=5) == 1
    assert capacity.pool_size(cluster, 4, 0, units=100) == 1        # a shape no node holds: one worker asks


def test_where_node_types_come_from(fake_home):
    reported = [{"resources": {"CPU": 8.0, "GPU": 2.0}, "max_count": 3}]
    assert capacity.node_types(reported, BARE_HEAD) == reported             # the GCS's word first
    assert capacity.node_types(None, set()) == []                          # no autoscaler
    assert capacity.node_types(None, BARE_HEAD | {"other.type"}) is None   # a file from another cluster
    (fake_home / "ray_bootstrap_config.yaml").unlink()
    assert capacity.node_types(None, BARE_HEAD) is None                    # an autoscaler, its types unknown


def test_no_autoscaler_unknown_types_and_no_limit():
    fixed = Cluster([{"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}], [])
    assert capacity.pool_size(fixed, 1, 0, units=100) == 4
    assert capacity.gpus(fixed) == (1.0, None)
    unknown = Cluster([HEAD], None)
    assert capacity.pool_size(unknown, 1, 0, units=7, max_workers=10) == 7     # one per unit
    assert capacity.gpus(unknown) == (0.0, None)
    assert capacity.gpu_share(unknown) == 0.0
    assert capacity.task_cpus(unknown) == 0.0
    endless = Cluster([HEAD], [{"resources": {"CPU": 4.0, "GPU": 1.0}, "max_count": -1}])
    assert capacity.pool_size(endless, 0, 1, units=9) == 9
    assert capacity.gpus(endless) == (0.0, float("inf"))
    assert rank_placement("auto", 3, 1, *capacity.gpus(endless)).num_workers == 3
    capped = Cluster([HEAD], endless.types, limits={"GPU": 2.0})
    assert capacity.pool_size(capped, 0, 1, units=9) == 2


def test_launcher_types_of_our_cluster_yaml(tmp_path):
    """The v1 autoscaler does not report its node types to the GCS: on the head node they come from the
    launcher's config (our own cluster.yaml here), believed only for the autoscaler that runs them."""
    path = tmp_path / "ray_bootstrap_config.yaml"
    shutil.copy(Path(__file__).parent.parent / "cluster.yaml", path)
    running = {"ray.head.cpu", "ray.worker.cpu"}
    types = capacity.launcher_types(running, str(path))
    assert sorted((t["max_count"], t["resources"]) for t in types) == [
        (1, {"CPU": 0.0}), (4, {"CPU": 4.0, "GPU": 1.0}), (8, {"CPU": 16.0})]
    assert capacity.launcher_types(set(), str(path)) is None                     # no autoscaler runs
    assert capacity.launcher_types(running | {"other.type"}, str(path)) is None  # a file from another cluster
    assert capacity.launcher_types(running, str(tmp_path / "missing.yaml")) is None
    path.write_text("available_node_types: [not, a, mapping")                    # unreadable: ignored
    assert capacity.launcher_types(running, str(path)) is None
