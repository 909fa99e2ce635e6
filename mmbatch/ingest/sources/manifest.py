"""A CSV or JSONL manifest: one row per sample, media paths relative to the manifest's folder.

Columns (others go to ``extra``; rename with ``--columns src=dst``):
``sample_id``, ``image_path``, ``audio_path``, ``text``, ``label``,
``label_name``, ``split``, ``speaker``, ``gender``, ``chapter``, ``wnid``,
``dialect_region``, ``sentence_type`` (``image``/``audio``/``id`` are accepted
for the first three). A path that escapes the folder (``..``, absolute, a URI,
or a symlink resolving outside) is quarantined as ``path_outside_root`` unless
``allow_outside``. A non-integer ``label`` is taken as a class name; names
become sorted-unique indices. ``sample_id`` defaults to the media file stem,
else ``row-<line>``. ``split`` defaults to ``--split``.
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

from mmbatch.engine import storage
from mmbatch.errors import UsageError
from mmbatch.schema import label_indices
from mmbatch.ingest.sources import common
from mmbatch.ingest.sources.common import Plan, Problem, Sample

KIND = "manifest"
TARGETS = ("sample_id", "image_path", "audio_path", "text", "label", "label_name", "split", "speaker", "gender",
           "chapter", "wnid", "dialect_region", "sentence_type")
ALIASES = {"image": "image_path", "audio": "audio_path", "id": "sample_id", "transcript": "text",
           "sentence": "text", "speaker_id": "speaker", "sex": "gender"}
SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")


# --- pure parsers -------------------------------------------------------------------
def parse_manifest(text: str, fmt: str) -> list[tuple[int, dict | str]]:
    """[(line number, row dict or an error message)] for CSV/TSV/JSONL text."""
    out: list[tuple[int, dict | str]] = []
    if fmt in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
        if not reader.fieldnames:
            return out
        for row in reader:
            line = reader.line_num
            if None in row:
                out.append((line, f"more fields than the header has: {row[None]!r}"))
                continue
            out.append((line, {k.strip(): (v if v not in ("", None) else None) for k, v in row.items() if k}))
        return out
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            out.append((n, f"not JSON: {e}"))
            continue
        if not isinstance(obj, dict):
            out.append((n, "not a JSON object"))
            continue
        out.append((n, {str(k): v for k, v in obj.items()}))
    return out


def map_row(row: dict, explicit: dict[str, str]) -> tuple[dict, dict]:
    """(canonical fields, extra) of one manifest row; ``explicit`` (source -> target) wins over names."""
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in row.items():
        if k in explicit and explicit[k] not in fields:
            fields[explicit[k]] = v
    for k, v in row.items():
        if k in explicit:
            continue
        target = k if k in TARGETS else ALIASES.get(k)
        if target and target not in fields:
            fields[target] = v
        else:
            extra[k] = v
    return fields, extra


def parse_label(v: Any) -> tuple[int | None, str | None]:
    """(label index, label name): ints (or int strings) are indices, anything else a class name."""
    if v is None or v == "":
        return None, None
    if isinstance(v, bool):
        return int(v), None
    if isinstance(v, int):
        return v, None
    if isinstance(v, float) and v.is_integer():
        return int(v), None
    s = str(v).strip()
    try:
        return int(s), None
    except ValueError:
        return None, s


# --- planning -------------------------------------------------------------------------
def _find_manifest(fs, path: str, uri: str) -> str:
    if fs.isfile(path):
        return path
    cands = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(SUFFIXES)
                   and not posixpath.basename(p).startswith(("_", ".")))
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise UsageError(f"manifest: {uri!r} is a folder with no .csv/.jsonl manifest; give the manifest file")
    raise UsageError(f"manifest: {uri!r} holds several manifests ({', '.join(map(posixpath.basename, cands))}); "
                     "give one file")


def _read_manifest(fs, mpath: str, uri: str) -> tuple[str, list[tuple[int, dict | str]]]:
    """(format, parsed rows) of the manifest file ``mpath``."""
    name = posixpath.basename(mpath).lower()
    fmt = "tsv" if name.endswith(".tsv") else "csv" if name.endswith(".csv") else "jsonl"
    with fs.open(mpath, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"manifest: {uri!r} is not UTF-8 text ({e})") from None
    rows = parse_manifest(text, fmt)
    if not rows:
        raise UsageError(f"manifest: {uri!r} has no rows")
    return fmt, rows


def _explicit_columns(columns) -> dict[str, str]:
    """``--columns`` as {source: canonical target}, targets checked and aliases resolved."""
    explicit = common.parse_columns(columns)
    for dst in explicit.values():
        if ALIASES.get(dst, dst) not in TARGETS:
            raise UsageError(f"manifest --columns: unknown target {dst!r}; choose from {', '.join(TARGETS)}")
    return {k: ALIASES.get(v, v) for k, v in explicit.items()}


@dataclass
class _Folder:
    """The manifest's folder: its listing, and what the listing refused."""
    fs: Any
    root: str
    files: dict
    refused: dict
    allow_outside: bool


def _outside_problem(where: str, role: str, sid: str, how: str) -> tuple[None, None, Problem]:
    return None, None, Problem(common.OUTSIDE_ROOT, f"{role} path {where} {how} the manifest's "
                               "folder (pass --allow-outside to allow it)", path=where, sample_id=sid)


def _locate(folder: _Folder, rel: str, role: str, sid_hint: str) -> tuple[str | None, common.Entry | None,
                                                                          Problem | None]:
    """(path for the sample, listing entry, problem) of one media path of a row."""
    fs, root = folder.fs, folder.root
    where = rel
    if rel.startswith("/") or "://" in rel:
        if storage.is_local(fs) and "://" not in rel and common.is_within(os.path.realpath(rel), root):
            rel = os.path.relpath(os.path.realpath(rel), root)
        elif not folder.allow_outside:
            return _outside_problem(where, role, sid_hint, "is outside")
        else:
            return _outside(fs, rel, role, sid_hint)
    joined = common.safe_join(root, rel)
    if joined is None:
        if not folder.allow_outside:
            return _outside_problem(where, role, sid_hint, "escapes")
        return _outside(fs, posixpath.normpath(posixpath.join(root, rel)), role, sid_hint)
    rel = joined[len(root.rstrip("/")) + 1:]
    parts = rel.split("/")
    for i in range(len(parts), 0, -1):  # the file, or a symlinked folder above it, was refused
        p = folder.refused.get("/".join(parts[:i]))
        if p is not None:
            return None, None, Problem(p.reason, p.detail, path=rel, sample_id=sid_hint)
    if rel not in folder.files:
        return None, None, Problem(common.MISSING_FILE, f"{role} file {where} not found", path=where,
                                   sample_id=sid_hint)
    return rel, folder.files[rel], None


def _sample_id(fields: dict, media: dict[str, str], line: int) -> str:
    """The row's ``sample_id``, else the first media file's stem, else ``row-<line>``."""
    sid = fields.get("sample_id")
    if sid in (None, ""):
        first = next(iter(media.values()), None)
        sid = posixpath.splitext(posixpath.basename(first))[0] if first else f"row-{line:08d}"
    return str(sid)


def _locate_media(folder: _Folder, media: dict[str, str], sid: str) -> tuple[dict[str, str], list, Problem | None]:
    """({role: path}, listing entries, the first problem) of a row's media paths."""
    located: dict[str, str] = {}
    entries = []
    for role, rel in media.items():
        p, e, problem = _locate(folder, rel, role, sid)
        if problem:
            return located, entries, problem
        located[role] = p
        entries.append(e)
    return located, entries, None


def _row_label(fields: dict) -> tuple[int | None, str | None]:
    """(label index, label name) of a row; ``label_name`` wins over a name in ``label``."""
    label, lname = parse_label(fields.get("label"))
    if fields.get("label_name") not in (None, ""):
        lname = str(fields["label_name"])
    return label, lname


def _row_sample(folder: _Folder, mname: str, line: int, row: dict | str, explicit: dict[str, str],
                default_split: str) -> Sample | Problem:
    """The sample of one parsed manifest row, or the problem that keeps it out."""
    if isinstance(row, str):
        return Problem(common.BAD_ROW, f"{mname} line {line}: {row}", path=f"{mname}:{line}")
    fields, extra = map_row(row, explicit)
    media = {r: fields.get(f"{r}_path") for r in ("image", "audio")}
    media = {r: str(v) for r, v in media.items() if v not in (None, "")}
    sid = _sample_id(fields, media, line)
    located, entries, problem = _locate_media(folder, media, sid)
    if problem:
        return problem
    text = fields.get("text")
    text = None if text is None or str(text).strip() == "" else str(text)
    if not located and text is None:
        return Problem("empty_row", f"{mname} line {line}: no image_path, audio_path or text",
                       path=f"{mname}:{line}", sample_id=sid)
    label, lname = _row_label(fields)
    split = fields.get("split")
    main = located.get("image") or located.get("audio") or ""
    return Sample(
        key=f"{main}\x00{line:012d}", sample_id=sid, split=str(split) if split not in (None, "") else default_split,
        label=label, label_name=lname, text=text,
        speaker=None if fields.get("speaker") is None else str(fields["speaker"]),
        gender=common.norm_gender(fields.get("gender")),
        chapter=_s(fields.get("chapter")), wnid=_s(fields.get("wnid")),
        dialect_region=_s(fields.get("dialect_region")), sentence_type=_s(fields.get("sentence_type")),
        files=located, extra={**extra, "manifest_line": line},
        nbytes=sum(e.size for e in entries) or len(text or ""), stamp=[common.stamp(e) for e in entries])


def _index_labels(pending: list[Sample], names: set[str]) -> list[Sample]:
    """Samples labelled by class name only get that name's sorted-unique index."""
    vocab = label_indices(names)
    for s in pending:
        if s.label is None and s.label_name is not None:
            s.label = vocab[s.label_name]
    return list(pending)


def plan(uri: str, opts, exclude=()) -> Plan:
    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        raise UsageError(f"input {uri!r} does not exist")
    mpath = _find_manifest(fs, path, uri)
    if storage.is_local(fs):
        mpath = os.path.realpath(mpath)
    fmt, rows = _read_manifest(fs, mpath, uri)
    explicit = _explicit_columns(opts.columns)

    root = posixpath.dirname(mpath)
    listing = common.list_tree(fs, root, allow_outside=opts.allow_outside, exclude=exclude)
    folder = _Folder(fs, root, listing.files, {p.path: p for p in listing.problems}, opts.allow_outside)
    mname = posixpath.basename(mpath)
    problems: list[Problem] = []
    pending: list[Sample] = []
    names: set[str] = set()
    for line, row in rows:
        got = _row_sample(folder, mname, line, row, explicit, opts.split)
        if isinstance(got, Problem):
            problems.append(got)
            continue
        if got.label_name is not None:
            names.add(got.label_name)
        pending.append(got)
    samples = _index_labels(pending, names)
    info = {"manifest": mname, "format": fmt, "label_names": sorted(names) or None}
    return Plan(kind=KIND, uri=uri, root=root, samples=samples, problems=problems, info=info)


def _s(v: Any) -> str | None:
    return None if v in (None, "") else str(v)


def _outside(fs, path: str, role: str, sid: str):
    """An allowed path outside the folder: one ``info`` call for it."""
    try:
        if "://" in path:
            rfs, rp = storage.url_to_fs(path)
            info = rfs.info(rp)
        else:
            info = fs.info(path)
    except FileNotFoundError:
        return None, None, Problem(common.MISSING_FILE, f"{role} file {path} not found", path=path, sample_id=sid)
    return path, common.Entry(path, int(info.get("size") or 0), storage.modified(info)), None


# --- reading --------------------------------------------------------------------------------
def build_row(s: Sample, blobs: dict, options: dict) -> dict:
    row = common.empty_row(KIND, s)
    extra = dict(s.extra)
    if "image" in blobs:
        row["image"], facts = common.image_fields(blobs["image"], s.files["image"])
        extra.update(facts)
    if "audio" in blobs:
        fields, facts = common.audio_fields(blobs["audio"], s.files["audio"])
        row.update(fields)
        extra.update(facts)
    return common.finish_extra(row, extra)
