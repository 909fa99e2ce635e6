"""``train.exclude``: the sample ids training leaves out of its train and validation splits.

The file is Parquet (``.parquet``, or a folder of Parquet files) or CSV (``.csv``) with a
``sample_id`` column, e.g. the ``issues.parquet`` of `mmbatch audit`. The test split is never
altered: an excluded test row is still scored. The ids' fingerprint is part of the training data's
fingerprint (:meth:`mmbatch.train.data.FusedData.open`), so a run with another exclusion is another run.
"""
from __future__ import annotations

from typing import Optional

from mmbatch.engine import storage
from mmbatch.errors import UsageError

KEY = "train.exclude"
EXCLUDED_SPLITS = ("train", "validation")    # never the test split


def read_exclude(uri: Optional[str], key: str = KEY) -> frozenset[str]:
    """The sample ids of the file at ``uri`` (empty when ``uri`` is None); a missing file, an unknown
    format or a file without ``sample_id`` is a UsageError naming ``key``."""
    if not uri:
        return frozenset()
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        raise UsageError(f"{key}: {uri} not found (expected a Parquet or CSV file with a sample_id column)")
    try:
        if path.lower().endswith(".csv"):
            with fs.open(path, "rb") as f:
                table = pcsv.read_csv(f, convert_options=pcsv.ConvertOptions(column_types={"sample_id": "string"}))
        elif path.lower().endswith(".parquet") or fs.isdir(path):
            table = pq.read_table(path, filesystem=fs)
        else:
            raise UsageError(f"{key}: {uri} is neither .parquet nor .csv; give a Parquet or CSV file with a "
                             "sample_id column")
    except UsageError:
        raise
    except Exception as e:       # pyarrow's own error: unreadable Parquet/CSV
        raise UsageError(f"{key}: cannot read {uri}: {e}") from None
    if "sample_id" not in table.column_names:
        raise UsageError(f"{key}: {uri} has no sample_id column (columns: {', '.join(table.column_names)})")
    return frozenset(str(v) for v in table.column("sample_id").to_pylist() if v is not None)


def exclude_fingerprint(ids: frozenset[str]) -> Optional[str]:
    """Fingerprint of the excluded ids (None when there are none: fingerprints stay as without the key)."""
    return storage.fingerprint(sorted(ids)) if ids else None
