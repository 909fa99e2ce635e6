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
