"""`mmbatch preprocess`: canonical shards -> fused per-sample feature Parquet, written by the workers.

- plan.py     units (row groups of the input shards), fingerprints; no Ray, no media
- unit.py     one unit start to finish in a worker: read, extract, fuse, write -> PreprocessRecord;
              what it writes is its job's type (FusedUnitJob, PartnerFeaturesJob)
- fuse.py     pairing on light columns (PartnerIndex) and the fused table of a unit
- run.py      the driver: skip committed units, run the rest (mmbatch.engine.units: a Ray Data job), commit, manifest
- summary.py  counts, stage table, manifest

The commit protocol (workers write, the driver writes markers) is mmbatch.engine.commit's
UnitSink, shared with ingest.
"""
__all__ = ["run_preprocess", "PreprocessSummary", "render_summary"]


def __getattr__(name: str):
    """The stage's entry points, imported on first use: importing a light submodule (``fusion``,
    ``features.audio``) must not import the whole stage (the image extractors and OpenCV with it)."""
    if name == "run_preprocess":
        from mmbatch.preprocess.run import run_preprocess
        return run_preprocess
    if name in ("PreprocessSummary", "render_summary"):
        from mmbatch.preprocess import summary
        return getattr(summary, name)
    raise AttributeError(f"module 'mmbatch.preprocess' has no attribute {name!r}")
