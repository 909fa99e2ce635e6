"""HuggingFace ``datasets`` storage.

INPUT is one of:
- a ``Dataset.save_to_disk`` folder (``state.json`` + ``dataset_info.json`` +
  ``data-0000x-of-0000n.arrow``), read with ``datasets.load_from_disk`` (which
  knows the features and the order of the data files), or a ``DatasetDict``
  folder with one such folder per split (the split is the folder name). A
  remote folder is copied to a local temporary folder by ``datasets`` on each
  read; for large remote datasets the Hub Parquet layout reads only the row
  groups it needs;
- Parquet shards as on the Hub: ``{split}-00000-of-00005.parquet`` (maybe
  under ``data/``), or ``<config>/<split>/*.parquet``; one ``.parquet`` file works too.

Columns map onto canonical ones with ``--columns src=dst,...``; without it,
canonical names map to themselves, the first ``Image``/``Audio`` feature
becomes ``image``/``audio``, the first ``ClassLabel`` becomes ``label`` (its
``names`` give ``label_name``) and a few common names are recognised
(``id``, ``sentence``/``transcription``, ``speaker_id``, ...). String labels
become sorted-unique indices. Unmapped scalar columns go to ``extra``.
``sample_id`` defaults to ``<split>-<row index in the split>``.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmbatch.engine import storage
from mmbatch.errors import UsageError
from mmbatch.schema import label_indices
from mmbatch.ingest.sources import common
from mmbatch.ingest.sources.common import Plan, Problem, Reject, Sample

KIND = "hf"
MAPPABLE = ("sample_id", "split", "label", "label_name", "image", "audio", "text", "speaker", "gender",
            "wnid", "chapter", "dialect_region", "sentence_type")
PLANNING_TARGETS = ("sample_id", "split", "label", "label_name")   # read by the driver
ALIASES = {
    "sample_id": ("id", "utt_id", "utterance_id", "key"),
    "text": ("sentence", "transcription", "transcript", "normalized_text", "caption"),
    "speaker": ("speaker_id", "client_id"),
    "gender": ("sex",),
    "chapter": ("chapter_id",),
    "label": ("labels", "class", "category"),
}
_HUB_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}\.parquet$")
KNOWN_SPLITS = ("train", "validation", "valid", "val", "dev", "test")


# --- pure helpers -------------------------------------------------------------------
def split_from_parquet_path(rel: str, default: str | None) -> str:
    """``data/train-00000-of-00005.parquet`` -> train; ``default/test/0000.parquet`` -> test; else ``default``."""
    name = posixpath.basename(rel)
    m = _HUB_SHARD.match(name)
    if m:
        return m.group("split")
    parent = posixpath.basename(posixpath.dirname(rel))
    if parent.lower().startswith(KNOWN_SPLITS):
        return parent
    stem = name[: -len(".parquet")] if name.endswith(".parquet") else name
    if stem.lower() in KNOWN_SPLITS:
        return stem
    return default or "train"


def features_from_schema(schema: pa.Schema) -> dict:
    md = schema.metadata or {}
    raw = md.get(b"huggingface")
    if raw:
        try:
            return json.loads(raw).get("info", {}).get("features", {}) or {}
        except (ValueError, AttributeError):
            return {}
    return {}


def _is_media_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}


def feature_type(features: dict, schema: pa.Schema, col: str) -> str:
    """Image / Audio / ClassLabel / Value / other, from the HF features (else the Arrow type)."""
    f = features.get(col)
    if isinstance(f, dict) and f.get("_type"):
        return f["_type"]
    t = schema.field(col).type
    if _is_media_struct(t):
        lc = col.lower()
        return "Audio" if "audio" in lc or "speech" in lc or "wav" in lc else "Image"
    return "Value"


def resolve_columns(schema: pa.Schema, features: dict, explicit: dict[str, str]) -> dict[str, str]:
    """{canonical target: source column} for one file."""
    cols = list(schema.names)
    mapping: dict[str, str] = {}
    used: set[str] = set()
    for src, dst in explicit.items():
        if src in cols:
            mapping[dst] = src
            used.add(src)
    for dst in MAPPABLE:
        if dst in mapping:
            continue
        if dst in cols and dst not in used:
            mapping[dst] = dst
            used.add(dst)
    for dst, kind in (("image", "Image"), ("audio", "Audio"), ("label", "ClassLabel")):
        if dst not in mapping:
            for c in cols:
                if c not in used and feature_type(features, schema, c) == kind:
                    mapping[dst] = c
                    used.add(c)
                    break
    for dst, names in ALIASES.items():
        if dst not in mapping:
            for c in names:
                if c in cols and c not in used:
                    mapping[dst] = c
                    used.add(c)
                    break
    return mapping


def class_names(features: dict, col: str | None) -> list[str] | None:
    f = features.get(col) if col else None
    if isinstance(f, dict) and f.get("_type") == "ClassLabel":
        return list(f.get("names") or []) or None
    return None


def scalar_columns(schema: pa.Schema, exclude: set[str]) -> list[str]:
    out = []
    for f in schema:
        if f.name in exclude:
            continue
        t = f.type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) or \
                pa.types.is_floating(t) or pa.types.is_boolean(t):
            out.append(f.name)
    return out


# --- file access ------------------------------------------------------------------------
def load_saved(fs, path: str):
    """The ``datasets.Dataset`` saved (``save_to_disk``) in folder ``path`` of ``fs`` (memory-mapped when local)."""
    import datasets

    if storage.is_local(fs):
        return datasets.load_from_disk(path)
    # normpath: the folder of a single saved dataset is "<root>/.", which object stores take literally
    return datasets.load_from_disk(fs.unstrip_protocol(posixpath.normpath(path)), storage_options=fs.storage_options)


def parquet_file(fs, path: str) -> pq.ParquetFile:
    return pq.ParquetFile(path, filesystem=storage.arrow_fs(fs))


def read_rows(fs, path: str, fmt: str, rows: list[int], columns: list[str]) -> pa.Table:
    """The given rows (sorted) and columns of one source file, reading only the row groups needed."""
    if fmt == "save_to_disk":
        ds = load_saved(fs, path)
        ds = ds.select_columns([c for c in columns if c in ds.column_names])
        return ds.with_format("arrow")[rows]
    pf = parquet_file(fs, path)
    md = pf.metadata
    groups, offsets, start = [], [], 0
    lo, hi = rows[0], rows[-1]
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if start <= hi and start + n > lo:
            groups.append(g)
            offsets.append(start)
        start += n
    cols = [c for c in columns if c in pf.schema_arrow.names]
    t = pf.read_row_groups(groups, columns=cols)
    base = offsets[0] if offsets else 0
    return t.take(pa.array([r - base for r in rows], pa.int64()))


# --- planning -------------------------------------------------------------------------
def _saved_parts(fs, root: str, files: dict, default_split: str | None) -> list[dict]:
    """One part per ``save_to_disk`` folder (a folder holding ``state.json``), loaded with ``datasets``."""
    parts = []
    for rel in sorted(r for r in files if posixpath.basename(r) == "state.json"):
        d = posixpath.dirname(rel)
        try:
            ds = load_saved(fs, posixpath.join(root, d) if d else root)
        except Exception as e:
            raise UsageError(f"hf: cannot load the save_to_disk folder {d or '.'!r}: {type(e).__name__}: {e}") from None
        split = posixpath.basename(d) if d else (default_split or ds.split or "train")
        entries = [e for r, e in sorted(files.items()) if posixpath.dirname(r) == d]
        parts.append({"file": d or ".", "format": "save_to_disk", "split": str(split), "dataset": ds,
                      "features": ds.features.to_dict(), "size": sum(e.size for e in entries),
                      "stamp": [common.stamp(e) for e in entries if e.rel.endswith((".arrow", ".json"))]})
    return parts


def _listing(fs, root: str, opts, exclude) -> tuple[str, common.Listing]:
    """(root, listing): the folder's tree, or the one file ``root`` names (then root is its folder)."""
    if fs.isfile(root):
        only = posixpath.basename(root)
        root = posixpath.dirname(root)
        info = fs.info(posixpath.join(root, only))
        return root, common.Listing(root, {only: common.Entry(only, int(info.get("size") or 0),
                                                              storage.modified(info))}, [])
    return root, common.list_tree(fs, root, allow_outside=opts.allow_outside, exclude=exclude)


def _explicit_columns(columns) -> dict[str, str]:
    """``--columns`` as {source: canonical target}, targets checked."""
    explicit = common.parse_columns(columns)
    for dst in explicit.values():
        if dst not in MAPPABLE:
            raise UsageError(f"hf --columns: unknown target {dst!r}; choose from {', '.join(MAPPABLE)}")
    return explicit


def _find_parts(fs, root: str, files: dict, default_split: str | None, uri: str) -> tuple[str, list[dict]]:
    """(layout, parts): the ``save_to_disk`` folders, else the Parquet files."""
    parts = _saved_parts(fs, root, files, default_split)
    if parts:
        return "save_to_disk", parts
    for rel in sorted(r for r in files if r.endswith(".parquet")):
        parts.append({"file": rel, "format": "parquet", "split": split_from_parquet_path(rel, default_split),
                      "features": None, "size": files[rel].size, "stamp": common.stamp(files[rel])})
    if not parts:
        raise UsageError(f"hf: no save_to_disk folder (state.json + .arrow) or Parquet files under {uri!r}")
    return "parquet", parts


def _scan_part(fs, root: str, part: dict, explicit: dict[str, str]) -> list[str]:
    """Read one part's schema, row count and driver-side columns into ``part``; its column names."""
    path = posixpath.join(root, part["file"])
    try:
        ds = part.pop("dataset", None)
        if ds is not None:
            schema, num_rows = ds.features.arrow_schema, ds.num_rows
        else:
            pf = parquet_file(fs, path)
            schema, num_rows = pf.schema_arrow, pf.metadata.num_rows
    except Exception as e:
        raise UsageError(f"hf: cannot read {part['file']}: {type(e).__name__}: {e}") from None
    feats = part["features"] or features_from_schema(schema)
    mapping = resolve_columns(schema, feats, explicit)
    want = [mapping[t] for t in PLANNING_TARGETS if t in mapping]
    cols = {}
    if want:
        if ds is not None:
            table = ds.select_columns(want).with_format("arrow")[:]
        else:
            table = parquet_file(fs, path).read(columns=want)
        cols = {t: table.column(mapping[t]).to_pylist() for t in PLANNING_TARGETS if t in mapping}
    part.update(features=feats, mapping=mapping, num_rows=num_rows, planned=cols,
                label_names=class_names(feats, mapping.get("label")),
                extra_columns=scalar_columns(schema, set(mapping.values())))
    return list(schema.names)


def _string_labels(cols: dict) -> set[str]:
    """The class names a part's planned columns give: string labels, else label names without labels."""
    lab = cols.get("label")
    if lab and any(isinstance(v, str) for v in lab):
        return {str(v) for v in lab if v is not None}
    if "label" not in cols and cols.get("label_name"):
        return {str(v) for v in cols["label_name"] if v is not None}
    return set()


def _row_label(cols: dict, i: int, vocab: dict[str, int], names: list[str] | None) -> tuple[int | None, str | None]:
    """(label, label_name) of row ``i`` of a part's planned columns."""
    label, label_name = None, None
    if "label" in cols:
        v = cols["label"][i]
        if isinstance(v, str):
            label, label_name = vocab.get(v), v
        elif v is not None and int(v) >= 0:
            label = int(v)
            label_name = names[label] if names and label < len(names) else None
    if "label_name" in cols and cols["label_name"][i] is not None:
        label_name = str(cols["label_name"][i])
        if label is None and "label" not in cols:
            label = vocab.get(label_name)
    return label, label_name


def _part_samples(part: dict, vocab: dict[str, int], counters: dict[str, int]) -> list[Sample]:
    """The samples of one part, in row order; ``counters`` (rows seen per split) number default ids."""
    out = []
    per_row = max(1, part["size"] // max(part["num_rows"], 1))
    cols, names = part["planned"], part["label_names"]
    for i in range(part["num_rows"]):
        split = cols["split"][i] if "split" in cols and cols["split"][i] is not None else part["split"]
        split = str(split)
        n = counters.get(split, 0)
        counters[split] = n + 1
        sid = cols["sample_id"][i] if "sample_id" in cols else None
        sid = str(sid) if sid is not None else f"{split}-{n:08d}"
        label, label_name = _row_label(cols, i, vocab, names)
        out.append(Sample(
            key=f"{part['file']}\x00{i:012d}", sample_id=sid, split=split, label=label,
            label_name=label_name, aux={"file": part["file"], "row": i}, nbytes=per_row,
            stamp=part["stamp"]))
    return out


def plan(uri: str, opts, exclude=()) -> Plan:
    fs, root = common.resolve_root(uri)
    root, listing = _listing(fs, root, opts, exclude)
    files = listing.files
    explicit = _explicit_columns(opts.columns)
    layout, parts = _find_parts(fs, root, files, opts.split, uri)

    # schemas, row counts and the driver-side columns
    seen_sources: set[str] = set()
    label_values: set[str] = set()
    for part in parts:
        seen_sources.update(_scan_part(fs, root, part, explicit))
        label_values.update(_string_labels(part["planned"]))
    missing = [s for s in explicit if s not in seen_sources]
    if missing:
        raise UsageError(f"hf --columns: no column {', '.join(map(repr, missing))} in the data "
                         f"(columns: {', '.join(sorted(seen_sources))})")
    vocab = label_indices(label_values)

    samples: list[Sample] = []
    counters: dict[str, int] = {}
    for part in parts:
        samples.extend(_part_samples(part, vocab, counters))
    if not samples:
        raise UsageError(f"hf: the dataset under {uri!r} has no rows")
    file_specs = {p["file"]: {"format": p["format"], "mapping": p["mapping"], "extra_columns": p["extra_columns"]}
                  for p in parts}
    if vocab:
        label_names = sorted(vocab, key=vocab.get)
    else:
        label_names = next((p["label_names"] for p in parts if p["label_names"]), None)
    info = {"layout": layout, "files": file_specs, "label_names": label_names,
            "columns": {p["file"]: p["mapping"] for p in parts}}
    return Plan(kind=KIND, uri=uri, root=root, samples=samples, problems=list(listing.problems), info=info)


# --- reading --------------------------------------------------------------------------------
def _media_path(fs, ctx: common.ReadContext, base_rel: str, path: str) -> str:
    """Where a media path of a row points, as the other sources resolve theirs: relative to the row's
    file, ``.``/``..`` folded, and on a local disk through every symlink (``realpath``), so that
    ``<root>/../x`` or a symlinked folder cannot lead outside the root unseen."""
    if "://" in path:
        scheme = path.split("://", 1)[0]
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        return posixpath.normpath(fs._strip_protocol(path)) if scheme in protocols else path
    full = path if path.startswith("/") else posixpath.join(ctx.root, base_rel, path)
    return os.path.realpath(full) if storage.is_local(fs) else posixpath.normpath(full)


def _media_bytes(fs, ctx: common.ReadContext, base_rel: str, value: Any, role: str) -> tuple[bytes, str | None]:
    """Bytes of an Image/Audio value (struct bytes/path, raw bytes or a path string relative to ``base_rel``)."""
    path = None
    data = None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        path = value
    max_bytes = common.max_file_bytes(ctx.options)
    if data:
        if max_bytes is not None and len(data) > max_bytes:
            raise common.too_large(f"{role} value", len(data), max_bytes)
        return bytes(data), path
    if not path:
        if data is not None:
            raise Reject("empty_file", f"{role} has zero bytes")
        raise Reject(common.MISSING_FILE, f"{role} has neither bytes nor a path")
    full = _media_path(fs, ctx, base_rel, path)
    if not (common.is_within(full, ctx.root) or ctx.options.get("allow_outside")):
        raise Reject(common.OUTSIDE_ROOT, f"{role} path {path} resolves outside the input folder "
                                          f"(pass --allow-outside to read it)")
    got = common.fetch(fs, [full], max_bytes=max_bytes)[full]
    if isinstance(got, Reject):
        raise got
    if isinstance(got, FileNotFoundError):
        raise Reject(common.MISSING_FILE, f"{role} file {path} not found")
    if isinstance(got, BaseException):
        raise Reject(common.READ_ERROR, f"{role} file {path}: {got}")
    return got, path


def read_shard(samples: list[Sample], ctx: common.ReadContext) -> tuple[list[dict], list[dict]]:
    from mmbatch.media import MediaError

    fs = ctx.fs()
    specs = ctx.info["files"]
    rows: list[dict] = []
    bad: list[dict] = []
    by_file: dict[str, list[Sample]] = {}
    for s in samples:
        by_file.setdefault(s.aux["file"], []).append(s)
    for file_rel, group in by_file.items():
        spec = specs[file_rel]
        mapping = spec["mapping"]
        # relative media paths are relative to the save_to_disk folder, or to the Parquet file's folder
        base_rel = file_rel if spec["format"] == "save_to_disk" else posixpath.dirname(file_rel)
        row_targets = [t for t in MAPPABLE if t in mapping and t not in PLANNING_TARGETS]
        columns = [mapping[t] for t in row_targets] + list(spec.get("extra_columns", []))
        group.sort(key=lambda s: s.aux["row"])
        try:
            table = read_rows(fs, posixpath.join(ctx.root, file_rel), spec["format"],
                              [s.aux["row"] for s in group], columns)
        except Exception as e:
            for s in group:
                bad.append(Problem(common.READ_ERROR, f"{file_rel}: {type(e).__name__}: {e}",
                                   path=f"{file_rel}#{s.aux['row']}", sample_id=s.sample_id).to_row(KIND))
            continue
        data = {c: table.column(c) for c in table.column_names}
        for j, s in enumerate(group):
            where = f"{file_rel}#{s.aux['row']}"
            try:
                row = common.empty_row(KIND, s)
                extra: dict = {}
                for t in row_targets:
                    col = mapping[t]
                    if col not in data:
                        continue
                    v = data[col][j].as_py()
                    if t in ("image", "audio"):
                        if v is None:
                            continue
                        blob, path = _media_bytes(fs, ctx, base_rel, v, t)
                        path = path or f"{s.sample_id}"
                        if t == "image":
                            row["image"], facts = common.image_fields(blob, path)
                        else:
                            fields, facts = common.audio_fields(blob, path)
                            row.update(fields)
                        extra.update(facts)
                    elif t == "gender":
                        row["gender"] = common.norm_gender(v)
                    else:
                        row[t] = None if v is None else str(v)
                for c in spec.get("extra_columns", []):
                    if c in data:
                        extra[c] = data[c][j].as_py()
                if row["image"] is None and row["audio"] is None and not row["text"]:
                    raise Reject("empty_row", "row has no image, audio or text")
                rows.append(common.finish_extra(row, extra))
            except (Reject, MediaError) as e:
                bad.append(Problem(e.reason, e.detail, path=where, sample_id=s.sample_id).to_row(KIND))
            except Exception as e:
                bad.append(Problem(common.READ_ERROR, f"{type(e).__name__}: {e}", path=where,
                                   sample_id=s.sample_id).to_row(KIND))
    return rows, bad
