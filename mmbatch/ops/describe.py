"""`mmbatch inspect`: describe any Parquet folder mmbatch writes (canonical, fused, quarantine).

(Named describe, not inspect, so that it never shadows the standard library's ``inspect``.)
"""
from __future__ import annotations

import json
from collections import Counter

import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmbatch.engine import storage
from mmbatch.errors import UsageError
from mmbatch.engine.manifest import data_files
from mmbatch.schema import MODALITIES, read_mmbatch_meta

_COUNT_COLUMNS = ("split", "label", "label_name", "reason", "source")


def describe(path: str, allow_incomplete: bool = False) -> dict:
    """Schema, row count, counts per split/label, modality presence and stored metadata. A fused
    folder must be complete and consistent (mmbatch.engine.provenance.check_fused) unless ``allow_incomplete``."""
    fs, root = storage.url_to_fs(path)
    if not fs.exists(root):
        raise UsageError(f"{path} does not exist")
    # what is on disk, as it is: a fused folder is checked against its manifest below
    fs, files, m = data_files(path, allow_incomplete=True)
    manifest = m.to_dict() if m is not None else None
    if not files:
        raise UsageError(f"{path}: no Parquet files (is it an mmbatch output folder?)")
    schema = pq.read_schema(files[0], filesystem=fs)
    check = None
    if not fs.isfile(root) and "fused" in ((manifest or {}).get("kind"), read_mmbatch_meta(schema).get("kind")):
        from mmbatch.engine.provenance import check_fused
        check = check_fused(fs, root, allow_incomplete=allow_incomplete)
    names = schema.names
    counts = {c: Counter() for c in _COUNT_COLUMNS if c in names}
    presence = Counter()
    rows = 0
    size = 0
    for f in files:
        size += fs.info(f).get("size", 0) or 0
        cols = [c for c in counts] + [c for c in names if c.startswith("has_")] + \
            [m for m in MODALITIES if m in names and not any(c == f"has_{m}" for c in names)]
        t = pq.read_table(f, filesystem=fs, columns=cols)
        rows += t.num_rows
        for c in counts:
            counts[c].update("null" if v is None else str(v) for v in t.column(c).to_pylist())
        for c in t.column_names:
            if c.startswith("has_"):
                presence[c[4:]] += int(pc.sum(t.column(c)).as_py() or 0)
            elif c in MODALITIES:
                presence[c] += t.num_rows - t.column(c).null_count
    quarantine = None
    if manifest is not None or not fs.isfile(root):
        qfiles = storage.list_parquet(fs, storage.join(root, storage.QUARANTINE_DIR))
        if qfiles:
            reasons = Counter()
            for q in qfiles:
                reasons.update(pq.read_table(q, filesystem=fs, columns=["reason"]).column("reason").to_pylist())
            quarantine = {"rows": sum(reasons.values()), "reasons": dict(reasons)}
    return {
        "path": path,
        "files": len(files),
        "bytes": size,
        "rows": rows,
        "columns": {f.name: str(f.type) for f in schema},
        "counts": {c: dict(sorted(v.items())) for c, v in counts.items()},
        "presence": dict(presence),
        "quarantine": quarantine,
        "metadata": read_mmbatch_meta(schema),
        "manifest": manifest,
        "problems": check["problems"] if check else [],
        "sequences": sequence_summary(schema),
    }


def sequence_summary(schema) -> dict:
    """modality -> one line on its sequence-feature column (fused data with pixels /
    logmel_frames / tokens extractors; these tables have no ``fused`` vector)."""
    from mmbatch.schema import LENGTH_COLUMNS, SEQUENCE_COLUMNS

    feats = (read_mmbatch_meta(schema).get("features") or {})
    out = {}
    for m, col in SEQUENCE_COLUMNS.items():
        if col not in schema.names:
            continue
        p = (feats.get(m) or {}).get("params") or {}
        what = {"image": lambda: f"pixels {p.get('size')}x{p.get('size')}x{p.get('channels')} uint8",
                "audio": lambda: f"log-mel frames x {p.get('n_mels')} mels, at most {p.get('max_frames')}",
                "text": lambda: f"token ids, at most {p.get('max_tokens')}, vocabulary of {p.get('vocab_size')} "
                                "words from the train split"}[m]()
        out[m] = f"{col}: {what}" + (f" (length in {LENGTH_COLUMNS[m]})" if m in LENGTH_COLUMNS else "")
    return out


def render_text(info: dict) -> str:
    out = [f"{info['path']}: {info['rows']} rows in {info['files']} file(s), {info['bytes'] / 1e6:.1f} MB"]
    out.append("columns:")
    for name, typ in info["columns"].items():
        out.append(f"  {name:<16} {typ}")
    for col, counts in info["counts"].items():
        if len(counts) > 30:
            out.append(f"{col}: {len(counts)} distinct values")
            continue
        out.append(f"{col}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    if info["presence"]:
        out.append("modality presence: " + ", ".join(f"{m} {n}/{info['rows']}" for m, n in info["presence"].items()))
    if info["quarantine"]:
        q = info["quarantine"]
        out.append(f"quarantined: {q['rows']} (" + ", ".join(f"{k} {v}" for k, v in q["reasons"].items()) + ")")
    if info.get("sequences"):
        out.append("fused vector: none -- sequence features (model inputs for train.encoders):")
        out += [f"  {m}: {line}" for m, line in info["sequences"].items()]
    meta = info["metadata"]
    if meta:
        out.append("metadata:")
        for k, v in meta.items():
            text = json.dumps(v, default=str)
            out.append(f"  {k}: {text if len(text) < 200 else text[:197] + '...'}")
    if (info["manifest"] or {}).get("leakage"):
        from mmbatch.dedup.leakage import leakage_line
        out.append(leakage_line(info["manifest"]["leakage"]))
    if info.get("problems"):
        out.append("NOT one complete preprocess output (read anyway, --allow-incomplete):")
        out += [f"  - {p}" for p in info["problems"]]
    elif info["manifest"]:
        out.append(f"manifest: complete ({len(info['manifest'].get('files', []))} files listed)")
    else:
        out.append("manifest: none (incomplete output or a single file)")
    return "\n".join(out)
