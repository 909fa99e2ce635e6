"""`mmbatch ingest`: a corpus -> canonical Arrow rows in sharded Parquet.

- run.py      the stage: plan (no Ray), shard, read on Ray workers, commit, manifest
- sources/    one corpus reader per KIND (imagenet, librispeech, timit, hf, manifest)
"""
from mmbatch.ingest.run import IngestOptions, IngestSummary, plan_ingest, run_ingest

__all__ = ["IngestOptions", "IngestSummary", "plan_ingest", "run_ingest"]
