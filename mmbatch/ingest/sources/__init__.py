"""Corpus readers: one module per ingest KIND, plus ``sphere`` (a NIST SPHERE writer for demos and tests).

Each module has ``plan(input_uri, opts, exclude=()) -> common.Plan`` (driver
side, no Ray) and either ``build_row(sample, blobs, options)`` (file kinds)
or ``read_shard(samples, ctx)`` (``hf``). Modules are imported lazily, so
importing one kind does not import the others' dependencies.
"""
from __future__ import annotations

import importlib
from types import ModuleType

KINDS = ("imagenet", "librispeech", "timit", "hf", "manifest")


def source_module(kind: str) -> ModuleType:
    """The module implementing ingest KIND (ValueError for an unknown kind)."""
    if kind not in KINDS:
        raise ValueError(f"unknown ingest kind {kind!r}; choose from {', '.join(KINDS)}")
    return importlib.import_module(f"mmbatch.ingest.sources.{kind}")
