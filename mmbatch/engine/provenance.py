"""What an output's bytes were made from, and whether a folder is one complete, consistent dataset.

Writers (preprocess) fingerprint each unit from everything that changes its file:

- :func:`job_fingerprint`: every field of the unit job (``UnitJob``), read from the dataclass so a
  new field is covered without anyone listing it; a field opts out with
  ``field(metadata={"fingerprint": False})`` (where the output goes, where it ran), or is only
  counted when a model runs with ``metadata={"fingerprint": "model"}`` (batch size: batched
  model inference changes the output's low bits). A schema counts with its full serialized
  metadata (``str(schema)`` truncates it).
- :func:`content_digest`: sha256 of a weights file's (or model folder's) bytes, cached by
  (path, size, mtime) so a rerun with the same file costs a ``stat``; a file rewritten at the same
  path is noticed. :func:`weights_digests` covers a feature spec's weight paths.

Readers (train, evaluate, retrain, inspect, the data API) call :func:`check_fused`: the folder has a
manifest, and every data file's footer (its extractor descriptions and unit fingerprint) agrees
with it. A folder that does not is refused with exit 2 and what disagrees, e.g.
"8 files were made with image size 224, 2 with 160; rerun preprocess".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from mmbatch.engine import storage
from mmbatch.errors import UsageError
from mmbatch.engine.manifest import Manifest

log = logging.getLogger("mmbatch.engine.provenance")

# feature-spec keys that name a file or folder whose bytes decide the embeddings
WEIGHT_KEYS = ("weights", "model_path")
# Parquet footer key of a fused unit's fingerprint (next to schema.META_KEY)
UNIT_FP_KEY = b"mmbatch_unit"


# --- writer side -------------------------------------------------------------------------------
def _signature(fs, path: str) -> list:
    """(name, size, mtime/etag) of a file, or of every file under a folder: changes when bytes do."""
    info = fs.info(path)
    if info.get("type") == "directory":
        return [_signature(fs, p) for p in sorted(fs.find(path))]
    return [path, info.get("size"), str(storage.modified(info))]


_DIGESTS: dict[str, str] = {}


def content_digest(uri: str) -> str:
    """sha256 of the bytes of a file (or of a folder's file names and bytes), recomputed only when
    the file's path, size or modification time changed since this process last hashed it."""
    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        raise UsageError(f"{uri}: no such file (a feature's weights or model path)")
    key = storage.fingerprint(_signature(fs, path))
    got = _DIGESTS.get(key)
    if got is None:
        h = hashlib.sha256()
        folder = fs.isdir(path)
        for f in sorted(fs.find(path)) if folder else [path]:
            if folder:                                  # a file's digest is the plain sha256 of its bytes
                h.update(f"{f[len(path):]}\0".encode())
            with fs.open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        got = _DIGESTS[key] = h.hexdigest()
    return got


def weights_digests(spec: dict) -> dict:
    """{key: content sha256} of the spec's weight files that are set (``weights``, ``model_path``)."""
    return {k: content_digest(spec[k]) for k in WEIGHT_KEYS if spec.get(k)}


def weights_signature(spec: dict) -> list:
    """A cheap stat of the spec's weight files (a cache key that changes when their bytes do)."""
    out = []
    for k in WEIGHT_KEYS:
        if spec.get(k):
            fs, path = storage.url_to_fs(spec[k])
            out.append(_signature(fs, path) if fs.exists(path) else None)
    return out


def schema_digest(schema: pa.Schema) -> str:
    """sha256 of the schema as Arrow serializes it, metadata included in full."""
    return hashlib.sha256(schema.serialize().to_pybytes()).hexdigest()


def _canonical(value: Any) -> Any:
    """A JSON-able stand-in for one job field's value; refuses types it cannot fingerprint exactly."""
    if isinstance(value, pa.Schema):
        return schema_digest(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    fp = getattr(value, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    raise TypeError(f"cannot fingerprint a {type(value).__name__}: give it a `fingerprint` attribute "
                    f"or mark its UnitJob field with metadata={{'fingerprint': False}}")


def job_fingerprint(job: Any, uses_model: bool) -> dict:
    """The fingerprinted fields of a job dataclass (see the module docstring), as JSON-able values."""
    out = {}
    for f in dataclasses.fields(job):
        how = f.metadata.get("fingerprint", True)
        if how is False or (how == "model" and not uses_model):
            continue
        out[f.name] = _canonical(getattr(job, f.name))
    return out


# --- reader side -------------------------------------------------------------------------------
def _footer(fs, path: str) -> tuple[dict, str | None]:
    """(the file's mmbatch metadata, its unit fingerprint) from the Parquet footer only."""
    import pyarrow.parquet as pq

    from mmbatch.schema import read_mmbatch_meta

    with fs.open(path, "rb") as fh:
        sch = pq.ParquetFile(fh).schema_arrow
    raw = (sch.metadata or {}).get(UNIT_FP_KEY)
    return read_mmbatch_meta(sch), raw.decode() if raw else None


def _settings(features: dict) -> dict:
    """Flat ``{"image size": 224, "image weights_sha256": ...}`` of extractor descriptions."""
    out = {}
    for m, d in sorted((features or {}).items()):
        for k in ("name", "version", "dim"):
            out[f"{m} {'extractor' if k == 'name' else k}"] = d.get(k)
        for k, v in sorted((d.get("params") or {}).items()):
            out[f"{m} {k}"] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
    return out


def _differences(values: dict[str, dict], want: dict | None, label) -> list[str]:
    """'8 files were made with image size 224, 2 with 160' for each key whose values differ between
    the files (or, when ``want`` is given, from it)."""
    lines = []
    keys = sorted({k for v in values.values() for k in v} | set(want or {}))
    for k in keys:
        got = Counter(json.dumps(v.get(k), sort_keys=True, default=str) for v in values.values())
        expected = json.dumps((want or {}).get(k), sort_keys=True, default=str)
        if len(got) > 1 or (want is not None and got and expected not in got):
            parts = [f"{n} file{'s were' if n != 1 else ' was'} made with {label(k)} {_short(v)}" if i == 0
                     else f"{n} with {_short(v)}" for i, (v, n) in enumerate(got.most_common())]
            lines.append(", ".join(parts) + (f" (the manifest says {_short(expected)})" if want is not None else ""))
    return lines


def _short(v: str, n: int = 80) -> str:
    return v if len(v) <= n else v[:n] + "..."


def _how_they_differ(files: dict[str, dict], want: dict | None) -> list[str]:
    """How the files' metadata differs: extractor settings first, else the other metadata keys."""
    lines = _differences({f: _settings(m.get("features", {})) for f, m in files.items()},
                         _settings(want.get("features", {})) if want is not None else None, lambda k: k)
    return lines or _differences(files, want, lambda k: f"'{k}' metadata")


def check_fused(fs, root: str, allow_incomplete: bool = False) -> dict:
    """Check that the fused folder ``root`` is complete and made by one run's settings.

    Complete: ``_manifest.json`` exists and lists exactly the data files present. Consistent: each
    file's footer has the manifest's metadata (extractor descriptions, fusion, splits, ...) and the
    unit fingerprint the manifest records for it. Returns ``{"complete": bool, "files": [...],
    "problems": [...]}``. Raises :class:`UsageError` (exit 2) naming the files that disagree and
    how, unless ``allow_incomplete``: then the problems are logged and returned, and the caller
    reads the committed files as they are.
    """
    files = storage.list_parquet(fs, root)
    names = [f.rstrip("/").rsplit("/", 1)[-1] for f in files]
    manifest = Manifest.read_at(fs, root)
    problems: list[str] = []
    if manifest is None:
        problems.append(f"{root} has no {storage.MANIFEST}: the preprocess run that writes it did not finish "
                        f"({len(files)} data file(s) present); rerun preprocess")
        want_meta, want_fps = None, {}
    else:
        want_meta = manifest.metadata
        want_fps = manifest.get("unit_fingerprints") or {}
        listed = set(manifest.files or [])
        missing, extra = sorted(listed - set(names)), sorted(set(names) - listed)
        if missing:
            problems.append(f"{len(missing)} file(s) the manifest lists are missing: {_few(missing)}; rerun preprocess")
        if extra:
            problems.append(f"{len(extra)} file(s) are not in the manifest: {_few(extra)}; rerun preprocess")
    with ThreadPoolExecutor(max_workers=16) as pool:         # footers only; object stores: in parallel
        footers = dict(zip(names, pool.map(lambda f: _footer(fs, f), files)))
    if want_meta is not None:
        bad_meta = {n: m for n, (m, _) in footers.items() if _comparable(m) != _comparable(want_meta)}
        if bad_meta:
            ok = len(footers) - len(bad_meta)
            how = _how_they_differ({n: _comparable(m) for n, (m, _) in footers.items()}, _comparable(want_meta))
            problems.append(f"{len(bad_meta)} of {len(footers)} files were made with other settings than the "
                            f"manifest's ({ok} agree): {_few(sorted(bad_meta))}; " + "; ".join(how)
                            + "; rerun preprocess")
        bad_fp = sorted(n for n, (_, fp) in footers.items() if n in want_fps and fp != want_fps[n])
        if bad_fp:
            problems.append(f"{len(bad_fp)} file(s) have another unit fingerprint than the manifest records "
                            f"(rewritten by a later, unfinished run): {_few(bad_fp)}; rerun preprocess")
    elif footers:
        how = _how_they_differ({n: _comparable(m) for n, (m, _) in footers.items()}, None)
        if how:
            problems.append("the files were made with different settings: " + "; ".join(how))
    if problems and not allow_incomplete:
        raise UsageError(f"{root}: not one complete preprocess output:\n  - " + "\n  - ".join(problems)
                         + "\n(--allow-incomplete reads the committed files anyway)")
    if problems:
        log.warning("%s: reading the committed files anyway (--allow-incomplete): %s", root, "; ".join(problems))
    return {"complete": not problems, "files": files, "problems": problems}


def _comparable(meta: dict) -> dict:
    """mmbatch metadata as the manifest records it (the files add the schema version)."""
    return {k: v for k, v in (meta or {}).items() if k != "schema_version"}


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_fused_uri(uri: str, allow_incomplete: bool = False) -> dict:
    """:func:`check_fused` for a URI or local path; a single Parquet file is not checked."""
    if uri.endswith(".parquet"):
        return {"complete": True, "files": [uri], "problems": []}
    fs, root = storage.url_to_fs(uri)
    return check_fused(fs, root, allow_incomplete=allow_incomplete)
