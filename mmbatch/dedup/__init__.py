"""Exact and near duplicates within and across datasets, per modality (``mmbatch duplicates``).

signatures.py: pure per-modality signature and verify functions; candidates.py:
candidate pairs without an all-pairs comparison; run.py: the Ray wiring and the
outputs (pairs.parquet, summary.json, report.html). Method and figures: docs/duplicates.md.
"""
