"""What mmbatch may delete or overwrite: only what it wrote, only in folders it owns.

Two rules, checked before a command writes anything (docs/data-safety.md):

- **Outputs never overlap inputs.** :func:`check_disjoint` refuses an output that equals, holds or
  lies inside any input (or another output), comparing URIs after normalising them
  (:func:`location`): a local path by its real path, an object-store URI by scheme, bucket and key.
- **A folder is mmbatch's before mmbatch cleans it.** :func:`claim` writes an ownership record
  (``_mmbatch.json``: the kind of output and the workflow's name) on a folder's first run. A folder
  with files and no record is refused, unless every entry in it is one mmbatch writes for that kind
  (an output of an mmbatch version from before the record). A folder owned as another kind is refused.

Both refusals are :class:`~mmbatch.errors.UsageError` (one line, exit 2); nothing is touched.
Inside an owned folder, cleanup removes only names that its markers or mmbatch's own temp names
identify (``storage.marker_files`` validates every name a marker holds; mmbatch.engine.commit).
"""
from __future__ import annotations

import os
import posixpath
import time
from dataclasses import dataclass
from typing import Mapping

from mmbatch.engine import storage
from mmbatch.errors import UsageError

RECORD = "_mmbatch.json"

# Top-level names an mmbatch output of each kind holds, for folders written before the record.
# Parquet data files and run folders are checked separately (_foreign_entries).
_COMMIT_NAMES = {storage.MANIFEST, storage.SHARDS_DIR, storage.TMP_DIR, storage.QUARANTINE_DIR, storage.PLAN}
KNOWN_NAMES: dict[str, set[str]] = {
    "canonical": _COMMIT_NAMES,
    "fused": _COMMIT_NAMES | {"_features"},
    "train": {storage.TMP_DIR},
    "evaluation": {storage.TMP_DIR, "metrics.json", "report.html", "summary.json"},
    "duplicates": {storage.TMP_DIR, "pairs.parquet", "summary.json", "report.html", "groups.parquet"},
    "audit": {storage.TMP_DIR, "issues.parquet", "summary.json", "report.html"},
    "registry": {storage.TMP_DIR, "versions", "aliases", "history", "last_cycle.json", "_lock", "_lock.owner.json",
                 "_locks"},
    "demo": {"corpus", "canonical", "features", "features_completed", "features_timit", "train", "registry",
             "workflow.yaml"},
}
KINDS = tuple(KNOWN_NAMES)

_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "local": "file"}


@dataclass(frozen=True)
class Location:
    """A normalised place: ``scheme`` ("file", "s3", ...) and an absolute ``/``-separated path
    (for object stores ``bucket/key``)."""
    scheme: str
    path: str

    def contains(self, other: "Location") -> bool:
        """True when ``other`` is this place or lies inside it."""
        if self.scheme != other.scheme:
            return False
        root = self.path.rstrip("/")
        return other.path == root or other.path.startswith(root + "/") or root == ""


def location(uri: str) -> Location:
    """``uri`` normalised for comparison: a local path made absolute with its symlinks resolved
    (of the part that exists), an object-store URI with its scheme's canonical name, ``.``/``..``
    and repeated or trailing slashes folded."""
    uri = str(uri)
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme == "file":
        local = rest if sep else uri
        return Location("file", os.path.realpath(os.path.abspath(os.path.expanduser(local))))
    scheme = _SCHEME_ALIASES.get(scheme.lower(), scheme.lower())
    path = posixpath.normpath("/" + rest).lstrip("/")
    return Location(scheme, "" if path == "." else path)


def check_disjoint(outputs: Mapping[str, str | None], inputs: Mapping[str, str | None]) -> None:
    """Refuse (UsageError) an output that equals, holds or lies inside an input, or overlaps another
    output. Keys name the setting (``output.path``, ``--out``) and appear in the message."""
    outs = {k: location(v) for k, v in outputs.items() if v}
    ins = {k: location(v) for k, v in inputs.items() if v}
    for ok, o in outs.items():
        for ik, i in ins.items():
            if o.contains(i) or i.contains(o):
                how = "is" if o == i else "holds" if o.contains(i) else "lies inside"
                raise UsageError(f"{ok} ({outputs[ok]}) {how} {ik} ({inputs[ik]}), an input: mmbatch never "
                                 f"writes where it reads; choose an output outside every input")
    keys = list(outs)
    for a_i, a in enumerate(keys):
        for b in keys[a_i + 1:]:
            if outs[a].contains(outs[b]) or outs[b].contains(outs[a]):
                raise UsageError(f"{a} ({outputs[a]}) and {b} ({outputs[b]}) overlap: give each output its own "
                                 f"folder")


def claim(uri: str, kind: str, workflow: str | None = None) -> dict:
    """Make ``uri`` an mmbatch output folder of ``kind`` (creating it), or refuse it. Returns the
    ownership record. Refused, with nothing touched: a folder owned as another kind; a folder with
    entries and no record, unless each entry is one mmbatch writes for ``kind``."""
    if kind not in KNOWN_NAMES:
        raise ValueError(f"unknown output kind {kind!r}; allowed: {', '.join(KINDS)}")
    fs, root = storage.url_to_fs(uri)
    path = storage.join(root, RECORD)
    record = storage.read_json(fs, path)
    if record is None:
        foreign = _foreign_entries(fs, root, kind) if fs.exists(root) else []
        if RECORD in foreign:
            # another run may have claimed the folder since the first read (two retrains at once): its
            # record is read again and used, never overwritten; anything else named RECORD stays foreign
            record = storage.read_json(fs, path)
            foreign = [] if _is_record(record) else foreign
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UsageError(f"{uri} holds files mmbatch did not write ({shown}): it is not an mmbatch {kind} "
                             f"folder; choose an empty or new output folder")
    if record is None:
        fs.makedirs(root, exist_ok=True)
        record = {"owner": "mmbatch", "kind": kind, "workflow": workflow or "",
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        storage.write_json(fs, path, record)
        return record
    if not _is_record(record):
        raise UsageError(f"{uri}: {RECORD} is not an mmbatch ownership record; mmbatch will not write there")
    if record.get("kind") != kind:
        raise UsageError(f"{uri} is an mmbatch {record.get('kind')} folder, not a {kind} folder: "
                         f"choose another output folder")
    if workflow and record.get("workflow") != workflow:
        record = {**record, "workflow": workflow}
        storage.write_json(fs, path, record)
    return record


def owner(uri: str) -> dict | None:
    """The ownership record of ``uri``, or None."""
    fs, root = storage.url_to_fs(uri)
    record = storage.read_json(fs, storage.join(root, RECORD))
    return record if _is_record(record) else None


def _is_record(record: object) -> bool:
    return isinstance(record, dict) and record.get("owner") == "mmbatch"


def _foreign_entries(fs, root: str, kind: str) -> list[str]:
    """Names directly under ``root`` that an mmbatch output of ``kind`` would not hold."""
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    if kind in ("canonical", "fused"):
        named = _marker_named(fs, root)
    foreign = []
    for e in entries:
        name = posixpath.basename(e["name"].rstrip("/"))
        if name in KNOWN_NAMES[kind]:
            continue
        if kind in ("canonical", "fused") and name in named:
            continue
        if kind == "train" and e.get("type") == "directory" and _is_train_run(fs, e["name"]):
            continue
        foreign.append(name)
    return sorted(foreign)


def _marker_named(fs, root: str) -> set[str]:
    """Top-level data file names the markers under ``root/_shards`` name."""
    named: set[str] = set()
    for marker_path in storage.marker_paths(fs, root):
        named.update(f for f in storage.marker_files(storage.read_json(fs, marker_path), marker_path) if "/" not in f)
    return named


def _is_train_run(fs, path: str) -> bool:
    """A folder `mmbatch train` made: its exported model, or Ray Train's experiment state."""
    if fs.exists(storage.join(path, "model", "model.json")):
        return True
    try:
        return any(posixpath.basename(p).startswith("experiment_state") for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return False
