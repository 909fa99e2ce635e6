"""`mmbatch preprocess`: canonical shards -> fused per-sample feature Parquet, written by the workers.

- plan.py     units (row groups of the input shards), fingerprints; no Ray, no media
- unit.py     one unit start to finish in a worker: read, extract, fuse, write -> CommitRecord
- fuse.py     pairing on light columns (PartnerIndex) and the fused table of a unit
- run.py      the driver: skip committed units, run the rest (mmbatch.engine.units: a Ray Data job), commit, manifest
- summary.py  counts, stage table, manifest

The commit protocol (workers write, the driver writes markers) is mmbatch.engine.commit,
shared with ingest.
"""
from mmbatch.preprocess.run import run_preprocess
from mmbatch.preprocess.summary import PreprocessSummary, render_summary

__all__ = ["run_preprocess", "PreprocessSummary", "render_summary"]
