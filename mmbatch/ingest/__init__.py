"""`mmbatch ingest`: a corpus -> canonical Arrow rows in sharded Parquet.

- run.py      the stage: plan (no Ray), shard, read on Ray workers, commit, manifest
- sources/    one corpus reader per KIND (imagenet, librispeech, timit, hf, manifest)
"""
__all__ = ["IngestOptions", "IngestSummary", "plan_ingest", "run_ingest"]


def __getattr__(name: str):
    """The stage's entry points, imported on first use (a corpus reader alone imports no more than it needs)."""
    if name in __all__:
        from mmbatch.ingest import run
        return getattr(run, name)
    raise AttributeError(f"module 'mmbatch.ingest' has no attribute {name!r}")
