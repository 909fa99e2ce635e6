"""Shared fixtures: one real local Ray for the whole test session."""
from __future__ import annotations

import os

import pytest

for _k, _v in {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (2 CPUs), started once and shared by every test that asks for it."""
    import ray

    from mmbatch.engine.runtime import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray
    # left running until interpreter exit: other session fixtures may still use it


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The demo's generated corpus (ImageNet/LibriSpeech/TIMIT layouts), written once."""
    from mmbatch.demo.corpus import write_demo_corpus

    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), per_class=12)


# --- tiers ------------------------------------------------------------------------------------
# The fast tier (`python -m pytest -m "not slow"`) is the Ray-free unit tier: planning, fingerprints,
# config, readers, extractors and fusion math, each stage's callable run in this process. A test that
# needs Ray, because it asks for `ray_session` (itself or through a fixture) or starts Ray another way,
# is in the slow tier, as is one that runs a whole job or benchmark in a child process (marked by hand).
# The guard below keeps the fast tier Ray-free: a fast-tier test that leaves Ray running in this process
# fails and says how to fix it.
RAY_FIXTURES = {"ray_session", "ray_head"}     # the shared local Ray; a `ray start --head` server


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tier_stays_ray_free(request):
    import sys

    was = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    if was or request.node.get_closest_marker("slow"):
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        pytest.fail(f"{request.node.nodeid} starts Ray but is in the fast tier: mark it "
                    "@pytest.mark.slow or ask for the ray_session fixture", pytrace=False)
