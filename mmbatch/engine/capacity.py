"""What the cluster has now and can add, per node type: the one place every stage asks.

A :class:`Cluster` is plain data: the running nodes' resources and the node types the autoscaler can
start. :func:`snapshot` reads it from Ray (the only code here that touches Ray, private APIs included);
the questions the stages ask are pure functions of it:

- :func:`pool_size`: how many workers of a shape (CPUs, GPUs) the cluster can hold, at most one per unit
  (ingest, preprocess);
- :func:`gpu_share`: a GPU node's GPUs per CPU (preprocess, a model worker's GPU share when none is asked);
- :func:`gpus`: GPUs now and the most the cluster can have (train's ``use_gpu: auto``);
- :func:`task_cpus`: CPUs that CPU-only tasks can have (dedup's task parallelism).

Node types come from the GCS where the autoscaler reports them (autoscaler v2, KubeRay), else, while a v1
autoscaler runs (the cluster launcher's), from the launcher's config on the head node,
``~/ray_bootstrap_config.yaml`` (:func:`launcher_types`). Work that needs no GPU is sized from the CPU-only
node types when there are any, so it does not make the autoscaler start GPU nodes (issue #33).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger("mmbatch")

LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"    # where `ray up` puts the config on the head node


@dataclass
class Cluster:
    """``nodes``: each running node's resources (``{"CPU": 2.0, "GPU": 1.0, ...}``). ``types``: the node
    types the autoscaler can start, ``{"resources": {...}, "max_count": n}`` (-1: no limit); ``[]``: no
    autoscaler; None: an autoscaler whose node types are unknown. ``limits``: cluster-wide caps per
    resource, where the autoscaler reports them."""
    nodes: list[dict]
    types: Optional[list[dict]] = field(default_factory=list)
    limits: dict = field(default_factory=dict)


# --- the questions (pure) -----------------------------------------------------------------------------
def _gpu_node(resources: dict) -> bool:
    return resources.get("GPU", 0) > 0


def _cpu_only_types(types: list[dict]) -> list[dict]:
    """The node types with CPUs and no GPU."""
    return [t for t in types if t["resources"].get("CPU", 0) > 0 and not _gpu_node(t["resources"])]


def _add_up(nodes: list[dict], types: list[dict]) -> dict[str, Optional[float]]:
    """Per resource, the larger of the running nodes' total and the types' total at their most nodes
    (None: a type with that resource has no limit)."""
    now: dict[str, float] = {}
    for r in nodes:
        for k, v in r.items():
            now[k] = now.get(k, 0.0) + float(v)
    most: dict[str, Optional[float]] = {}
    for t in types:
        if t["max_count"] == 0:
            continue
        for k, v in t["resources"].items():
            if k in most and most[k] is None:
                continue
            most[k] = None if t["max_count"] < 0 else most.get(k, 0.0) + float(v) * t["max_count"]
    return {k: (None if most.get(k, 0.0) is None else max(now.get(k, 0.0), most.get(k, 0.0)))
            for k in {*now, *most}}


def can_have(cluster: Cluster, gpu_work: bool = True) -> Optional[dict[str, Optional[float]]]:
    """The most of each resource the cluster can have once its autoscaler has added every node it may
    (a value None: no limit). For work without GPUs (``gpu_work=False``) on a cluster with a CPU-only
    node type: those types' CPUs (or the CPU-only nodes' now, if more) plus the CPUs of the GPU nodes
    already running, so the work never counts on GPU nodes being started. None: the autoscaler's node
    types are unknown."""
    if cluster.types is None:
        return None
    cpu_types = [] if gpu_work else _cpu_only_types(cluster.types)
    if not cpu_types:
        most = _add_up(cluster.nodes, cluster.types)
    else:
        most = _add_up([r for r in cluster.nodes if not _gpu_node(r)], cpu_types)
        if most.get("CPU") is not None:
            most["CPU"] += sum(float(r.get("CPU", 0)) for r in cluster.nodes if _gpu_node(r))
    for k, cap in cluster.limits.items():
        if k in most:
            most[k] = float(cap) if most[k] is None else min(most[k], float(cap))
    return most


def pool_size(cluster: Cluster, cpus: float, gpus: float, units: int, max_workers: Optional[int] = None) -> int:
    """How many workers of ``cpus`` CPUs and ``gpus`` GPUs each the cluster can hold once its autoscaler has
    added every node it may (:func:`can_have`; at least one), never more than ``units`` nor ``max_workers``.
    Where no limit is known (unknown node types, a type without a limit): one per unit, and the autoscaler's
    own limits decide how many start."""
    most = can_have(cluster, gpu_work=bool(gpus))
    fits = [] if most is None else [most.get(k, 0.0) / need for k, need in (("CPU", cpus), ("GPU", gpus))
                                    if need and most.get(k, 0.0) is not None]
    size = max(1, int(min(fits))) if fits else units
    return max(1, min(size, units, max_workers or units))


def gpu_share(cluster: Cluster) -> float:
    """GPU per worker when nothing is asked: a GPU node's GPUs shared by its CPUs (one worker per CPU), the
    smallest share over the GPU nodes that run and the GPU node types the autoscaler can start. 0: no GPU
    to be had (as far as the cluster tells)."""
    kinds = cluster.nodes + [t["resources"] for t in cluster.types or [] if t["max_count"] != 0]
    shares = [min(1.0, r["GPU"] / max(1.0, r.get("CPU", 1.0))) for r in kinds if _gpu_node(r)]
    return min(shares) if shares else 0.0


def gpus(cluster: Cluster) -> tuple[float, Optional[float]]:
    """(GPUs in the cluster now, the most it can have: ``inf`` where a GPU node type has no limit, None
    where no autoscaler with known node types runs)."""
    now = sum(float(r.get("GPU", 0)) for r in cluster.nodes)
    if not cluster.types:
        return now, None
    most = can_have(cluster)
    return now, float("inf") if most.get("GPU", 0.0) is None else most.get("GPU", 0.0)


def task_cpus(cluster: Cluster) -> float:
    """CPUs that tasks of one CPU and no GPU can have (:func:`can_have` of work without GPUs); where no
    limit is known, the CPUs running now."""
    most = can_have(cluster, gpu_work=False) or {}
    cpus = most.get("CPU", 0.0)
    return cpus if cpus is not None else sum(float(r.get("CPU", 0)) for r in cluster.nodes)


# --- where node types come from -------------------------------------------------------------------------
def node_types(reported: Optional[list[dict]], running_types: set[str],
               path: str = LAUNCHER_CONFIG) -> Optional[list[dict]]:
    """The node types the autoscaler can start: those it reports to the GCS (``reported``), else, while an
    autoscaler runs nodes of ``running_types``, the launcher's config file (:func:`launcher_types`); ``[]``:
    no autoscaler (a local Ray, a fixed set of ``ray start`` nodes); None: an autoscaler whose node types
    are unknown."""
    if reported:
        return reported
    if not running_types:
        return []
    return launcher_types(running_types, path)


def launcher_types(running_types: set[str], path: str = LAUNCHER_CONFIG) -> Optional[list[dict]]:
    """The node types of the launcher's config file (``ray up`` writes it on the head node, where job
    drivers run, and starts the v1 autoscaler on it: ``--autoscaling-config=~/ray_bootstrap_config.yaml``;
    Ray Tune looks for the same file): the head type at most 1 node, the others their ``max_workers``
    (else the file's). None unless every type in ``running_types`` is in the file, so a file left from
    another cluster is not believed."""
    import yaml

    path = os.path.expanduser(path)
    if not running_types or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        types = config.get("available_node_types") or {}
    except (OSError, yaml.YAMLError, AttributeError) as e:
        log.debug("launcher config %s unreadable: %s", path, e)
        return None
    if not isinstance(types, dict) or not running_types <= set(types):
        log.debug("launcher config %s does not describe this cluster's node types %s", path, running_types)
        return None
    cap = config.get("max_workers", -1)
    return [{"resources": {k: float(v) for k, v in (t.get("resources") or {}).items()},
             "max_count": 1 if name == config.get("head_node_type") else int(t.get("max_workers", cap))}
            for name, t in types.items()]


# --- reading Ray (the one place) ------------------------------------------------------------------------
def snapshot() -> Cluster:
    """The connected cluster: its live nodes' resources (``ray.nodes``) and its autoscaler's node types
    (:func:`node_types`)."""
    import ray

    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    reported, limits = _reported_types()
    return Cluster(nodes, node_types(reported, _autoscaler_node_types()), limits)


def _reported_types() -> tuple[Optional[list[dict]], dict]:
    """The node types and cluster-wide resource caps the autoscaler reports to the GCS (autoscaler v2,
    KubeRay: ``ray._private.state.state.get_cluster_config``, what Ray Data's cluster autoscaler and Ray
    Train read). (None, {}) where it reports none (v1, another Ray version, a client connection)."""
    import ray
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - another Ray version, a client connection
        config = None
    if config is None or not config.node_group_configs:
        return None, {}
    types = [{"resources": {k: float(v) for k, v in g.resources.items()}, "max_count": int(g.max_count)}
             for g in config.node_group_configs]
    return types, {k: float(v) for k, v in config.max_resources.items()}


def _autoscaler_node_types() -> set[str]:
    """The node types of the nodes that an autoscaler manages, as its status in the GCS key-value store
    maps them (v1: the cluster launcher's, ``ray start --autoscaling-config``). Empty where there is
    none: a local Ray, a fixed set of ``ray start`` nodes, whose read-only monitor names each node's
    type after its own id."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get
    try:
        status = json.loads(_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or "{}")
    except Exception:  # noqa: BLE001 - another Ray version, a client connection
        return set()
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return {t for n, t in mapping.items() if t != format_readonly_node_type(n)}
