"""Plain records and helpers shared by the source modules (no Ray here).

A source module exposes ``plan(input_uri, opts) -> Plan`` (driver side: list
files once, parse small text files, return one :class:`Sample` per candidate
row plus :class:`Problem` records for what is already wrong) and a shard
reader: either ``build_row(sample, blobs, opts) -> dict`` (file kinds: the
generic :func:`read_file_shard` fetches ``sample.files`` and calls it) or a
whole ``read_shard(samples, ctx) -> (rows, problems)`` (``hf``).

Samples and contexts are plain dataclasses: they travel to the ingest workers
(mmbatch.engine.units) pickled, and :meth:`Sample.to_dict` is what a shard's fingerprint covers.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import stat
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

from mmbatch.engine import storage
from mmbatch.errors import UsageError
from mmbatch.schema import CANONICAL_COLUMNS, quarantine_row

# Reason codes decided at planning time (media probes add their own: empty_file,
# not_an_image, corrupt_image, decompression_bomb, corrupt_audio, sphere_shorten, ...; reading adds
# too_large, ingest's Arrow conversion unstorable_row, an unclipped decode too_long).
MISSING_AUDIO = "missing_audio"            # transcript line / label row without its audio file
MISSING_TRANSCRIPT = "missing_transcript"  # audio without a transcript line
MISSING_FILE = "missing_file"              # a manifest/HF path that does not exist
MISSING_LABEL = "missing_label"            # an image with no label source
UNKNOWN_LABEL = "unknown_label"            # a label (wnid) outside the class list
DUPLICATE_ID = "duplicate_id"
OUTSIDE_ROOT = "path_outside_root"
NOT_UTF8 = "transcript_not_utf8"
EMPTY_TRANSCRIPT = "empty_transcript"
BAD_ALIGNMENT = "bad_alignment"
BAD_ROW = "bad_row"
READ_ERROR = "read_error"
TOO_LARGE = "too_large"                    # a file over --max-file-mb (refused before its bytes are read)

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class Reject(Exception):
    """Raised by a row builder: the sample goes to quarantine with ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Sample:
    """One candidate canonical row, as planned (media not read yet)."""
    key: str                                  # deterministic sort key (usually the main file's path)
    sample_id: str
    split: str | None = None
    label: int | None = None
    label_name: str | None = None
    text: str | None = None
    speaker: str | None = None
    gender: str | None = None
    wnid: str | None = None
    chapter: str | None = None
    dialect_region: str | None = None
    sentence_type: str | None = None
    files: dict = field(default_factory=dict)   # role (image/audio/txt/wrd/phn) -> path relative to root
    extra: dict = field(default_factory=dict)   # goes to the JSON ``extra`` column
    aux: dict = field(default_factory=dict)     # reader-only details (hf: file/row)
    nbytes: int = 0                             # estimated raw bytes (sharding)
    stamp: list = field(default_factory=list)   # sizes/mtimes of the files (fingerprint)

    def to_dict(self) -> dict:
        """A shallow, JSON-able dict (``asdict`` deep-copies and is ~10x slower on millions of records)."""
        return {f: getattr(self, f) for f in _SAMPLE_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(**d)

    @property
    def main_path(self) -> str | None:
        for role in ("image", "audio"):
            if self.files.get(role):
                return self.files[role]
        return next(iter(self.files.values()), None)


_SAMPLE_FIELDS = tuple(f.name for f in fields(Sample))


@dataclass
class Problem:
    """A row quarantined at planning time."""
    reason: str
    detail: str = ""
    path: str | None = None
    sample_id: str | None = None

    def to_row(self, source: str) -> dict:
        return quarantine_row(self.reason, self.detail, path=self.path, sample_id=self.sample_id,
                              source=source, stage="ingest")


@dataclass
class Plan:
    kind: str
    uri: str                                    # INPUT as given
    root: str                                   # filesystem path of the root the relative paths hang from
    samples: list[Sample]
    problems: list[Problem] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)   # name -> count of files/utterances deliberately not ingested
    info: dict = field(default_factory=dict)      # goes to the manifest (layout, label_names, ...)


# --- listing -----------------------------------------------------------------------
@dataclass
class Entry:
    rel: str
    size: int
    mtime: Any


@dataclass
class Listing:
    root: str
    files: dict[str, Entry]
    problems: list[Problem]


def resolve_root(uri: str) -> tuple[Any, str]:
    """(fs, root path) for INPUT; UsageError when it does not exist."""
    fs, root = storage.url_to_fs(uri)
    if not fs.exists(root):
        raise UsageError(f"input {uri!r} does not exist")
    if storage.is_local(fs):
        root = os.path.realpath(root)
    return fs, root.rstrip("/") or "/"


def is_within(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def list_tree(fs, root: str, *, allow_outside: bool = False, exclude: Iterable[str] = ()) -> Listing:
    """Every file under ``root`` with size and mtime, from one ``fs.find`` (plus one per followed symlinked dir).

    Symlinks (local only) that resolve outside ``root`` become ``path_outside_root``
    problems unless ``allow_outside``; symlinked directories are followed when
    their target is inside ``root`` (or outside and allowed). Names starting
    with ``.`` and anything under ``exclude`` (e.g. the output folder) are skipped.
    """
    files: dict[str, Entry] = {}
    problems: list[Problem] = []
    exclude = [e.rstrip("/") for e in exclude if e]
    real_root = os.path.realpath(root) if storage.is_local(fs) else root
    seen_dirs: set[str] = {real_root}

    find = _find_local if storage.is_local(fs) else (lambda base: fs.find(base, detail=True, withdirs=False))

    def walk(base: str, prefix: str) -> None:
        try:
            found = find(base)
        except FileNotFoundError:
            return
        head = base.rstrip("/") + "/"
        for path, info in found.items():
            path = path.rstrip("/")
            if not path.startswith(head):
                continue
            rel = path[len(head):]
            rel = f"{prefix}/{rel}" if prefix else rel
            if "/." in "/" + rel:           # hidden files and folders
                continue
            if exclude and any(is_within(path, e) for e in exclude):
                continue
            if info.get("islink"):
                target = os.path.realpath(path)
                inside = is_within(target, real_root)
                if not os.path.exists(target):
                    problems.append(Problem(MISSING_FILE, f"broken symlink -> {info.get('destination')}", path=rel))
                    continue
                if not inside and not allow_outside:
                    problems.append(Problem(OUTSIDE_ROOT, f"symlink resolves to {target}, outside the input "
                                            f"folder (pass --allow-outside to follow it)", path=rel))
                    continue
                if os.path.isdir(target):
                    if target not in seen_dirs:
                        seen_dirs.add(target)
                        walk(target, rel)
                    continue
                st = os.stat(target)
                files[rel] = Entry(rel, int(st.st_size), st.st_mtime)
                continue
            if info.get("type") == "directory":
                continue
            files[rel] = Entry(rel, int(info.get("size") or 0), storage.modified(info))

    walk(root, "")
    return Listing(root=root, files=files, problems=problems)


def _find_local(base: str) -> dict[str, dict]:
    """``fs.find(base, detail=True)`` of fsspec's local filesystem, from ``os.scandir``: the same files
    and the keys :func:`list_tree` reads (type, size, mtime, islink, destination), symlinked folders
    listed, not entered. fsspec builds a full info dict per file: 0.12 against 0.06 CPU s for a
    20,000-file corpus (a 10,000-sample manifest), about a sixth of ingest's planning."""
    out: dict[str, dict] = {}
    todo = [base]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                found = list(entries)
        except NotADirectoryError:
            continue
        for e in found:
            try:
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                    continue
                st = e.stat(follow_symlinks=False)
                info = {"type": "file" if stat.S_ISREG(st.st_mode) else "other", "size": st.st_size,
                        "mtime": st.st_mtime, "islink": stat.S_ISLNK(st.st_mode)}
                if info["islink"]:
                    try:
                        info["size"] = os.stat(e.path).st_size
                    except OSError:
                        info["size"] = 0
                    info["destination"] = os.readlink(e.path)
            except FileNotFoundError:        # removed while listed
                continue
            out[e.path] = info
    return out


def listing_problems(listing: Listing, sample_id_of: Callable[[str], str | None]) -> list[Problem]:
    """The listing's refused paths that this kind would have read (``sample_id_of`` gives an id, else None).

    Paths without an extension (symlinked folders) are kept too: their contents were not looked at.
    """
    out = []
    for p in listing.problems:
        sid = sample_id_of(p.path) if p.path else None
        if sid is not None or "." not in posixpath.basename(p.path or ""):
            out.append(Problem(p.reason, p.detail, path=p.path, sample_id=sid))
    return out


def safe_join(root: str, rel: str) -> str | None:
    """``root/rel`` normalised, or None when ``rel`` escapes ``root`` (``..``, absolute)."""
    if rel.startswith("/") or "://" in rel:
        return None
    p = posixpath.normpath(posixpath.join(root, rel))
    return p if is_within(p, root) else None


def stamp(entry: Entry | None) -> list:
    return [entry.size, entry.mtime] if entry else [None, None]


# --- transcript decoding -----------------------------------------------------------------
def decode_text(raw: bytes, what: str = "transcript") -> str:
    """UTF-8 text (BOM tolerated) or :class:`Reject` (``transcript_not_utf8``)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Reject(NOT_UTF8, f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def norm_gender(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip().lower()
    if s in ("m", "male", "man"):
        return "m"
    if s in ("f", "female", "woman"):
        return "f"
    return s or None


# --- options helpers -----------------------------------------------------------------------
def parse_columns(spec: str | None) -> dict[str, str]:
    """``'img=image,transcript=text'`` -> ``{'img': 'image', 'transcript': 'text'}`` (source -> canonical)."""
    if not spec:
        return {}
    out: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise UsageError(f"--columns: {part!r} is not SOURCE=TARGET (e.g. 'img=image,transcript=text')")
        src, dst = (x.strip() for x in part.split("=", 1))
        if not src or not dst:
            raise UsageError(f"--columns: {part!r} is not SOURCE=TARGET")
        out[src] = dst
    return out


# --- finishing a plan: order, duplicates, shards ----------------------------------------------
def dedupe(samples: list[Sample]) -> tuple[list[Sample], list[Problem]]:
    """Sort by key; keep the first sample of each id, quarantine the others (``duplicate_id``)."""
    kept: list[Sample] = []
    problems: list[Problem] = []
    first: dict[str, Sample] = {}
    for s in sorted(samples, key=lambda s: s.key):
        if s.sample_id in first:
            problems.append(Problem(DUPLICATE_ID, f"sample_id {s.sample_id!r} already taken by "
                                    f"{first[s.sample_id].main_path}", path=s.main_path, sample_id=s.sample_id))
            continue
        first[s.sample_id] = s
        kept.append(s)
    return kept, problems


def _unit(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a sample key."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0**64


def make_shards(samples: list[Sample], shard_bytes: float, shard_rows: int | None = None,
                min_shards: int = 1) -> list[list[Sample]]:
    """Contiguous groups of the (sorted) samples of at most ``shard_bytes`` raw bytes (and ``shard_rows`` rows).

    Boundaries are content-defined: once a group holds half its target, it ends
    after a sample whose key hash falls under a byte-weighted threshold (or at
    the target). A file that changes size therefore moves only the boundaries
    near it, and its neighbours' fingerprints stay valid. When the input is
    small the target drops to ``total / min_shards`` rounded down to a power of
    two (stable while the total changes a little), so there are at least
    ``min_shards`` groups and reads spread over the CPUs.
    """
    if not samples:
        return []
    total = sum(max(s.nbytes, 1) for s in samples)
    target = float(max(shard_bytes, 1))
    if min_shards > 1 and total / min_shards < target:
        target = float(2 ** math.floor(math.log2(max(total / min_shards, 1))))
    half = target / 2
    shards: list[list[Sample]] = []
    cur: list[Sample] = []
    cur_bytes = 0
    for s in samples:
        b = max(s.nbytes, 1)
        if cur and cur_bytes + b > target:          # never exceed the target (a lone big file gets its own)
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(s)
        cur_bytes += b
        if (shard_rows and len(cur) >= shard_rows) or \
                (cur_bytes >= half and _unit(s.key) < min(1.0, 2.0 * b / target)):
            shards.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        shards.append(cur)
    return shards


def shard_name(i: int) -> str:
    """The file stem of the ``i``-th ingested shard: ``part-00000``, ``part-00001``, ..."""
    return f"part-{i:05d}"


# --- reading a shard of file-based samples -------------------------------------------------------
@dataclass
class ReadContext:
    """What a shard reader needs (built in the ingest worker from the job's context)."""
    kind: str
    uri: str
    root: str
    options: dict
    info: dict = field(default_factory=dict)    # the plan's info (hf: per-file column mapping)

    def fs(self):
        fs, _ = storage.url_to_fs(self.uri)
        return fs


def abs_path(root: str, rel: str) -> str:
    """Filesystem path of a planned path (relative to ``root``, or absolute when allowed outside)."""
    if rel.startswith("/") or "://" in rel:
        return rel
    return posixpath.join(root, rel)


def max_file_bytes(options: dict) -> int | None:
    """The ``max_file_mb`` ingest option in bytes (None: no limit)."""
    mb = options.get("max_file_mb")
    return None if mb is None else int(mb * 2**20)


def too_large(what: str, size: int, max_bytes: int) -> Reject:
    return Reject(TOO_LARGE, f"{what}: {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:g} MiB limit "
                  "(--max-file-mb); not read")


def _read_local(path: str, max_bytes: int | None) -> Any:
    """A local file's bytes; with ``max_bytes``, a :class:`Reject` (``too_large``) for a file over it,
    decided from its size before reading, and never more than ``max_bytes + 1`` bytes read (a file
    that grows, or a device, cannot exhaust memory)."""
    with open(path, "rb") as f:
        if max_bytes is None:
            return f.read()
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            return too_large(posixpath.basename(path), size, max_bytes)
        data = f.read(max_bytes + 1)
    return too_large(posixpath.basename(path), len(data), max_bytes) if len(data) > max_bytes else data


def fetch(fs, paths: list[str], chunk: int = 64, max_bytes: int | None = None) -> dict[str, Any]:
    """path -> bytes, or the exception raised reading it (a :class:`Reject` for a file over ``max_bytes``).

    Local files are read one by one (a file over ``max_bytes`` is refused from its size, unread);
    object stores get ``fs.cat`` on chunks of paths, which fetches them concurrently (their sizes
    are checked from the listing before: :func:`read_file_shard`).
    """
    out: dict[str, Any] = {}
    urls = [p for p in paths if "://" in p]
    plain = [p for p in paths if "://" not in p]
    if storage.is_local(fs):
        for p in plain:
            try:
                out[p] = _read_local(p, max_bytes)
            except Exception as e:
                out[p] = e
    else:
        for i in range(0, len(plain), chunk):
            part = plain[i:i + chunk]
            try:
                got = fs.cat(part, on_error="return")
            except Exception as e:
                got = {p: e for p in part}
            for p in part:
                out[p] = got.get(p, got.get(fs._strip_protocol(p), FileNotFoundError(p)))
    for p in urls:
        try:
            out[p] = storage.read_bytes(p)
        except Exception as e:
            out[p] = e
    if max_bytes is not None:
        for p, v in out.items():
            if isinstance(v, (bytes, bytearray)) and len(v) > max_bytes:
                out[p] = too_large(posixpath.basename(p), len(v), max_bytes)
    return out


def empty_row(kind: str, s: Sample) -> dict:
    row = {c: None for c in CANONICAL_COLUMNS}
    row.update(sample_id=s.sample_id, source=kind, split=s.split, label=s.label, label_name=s.label_name,
               text=s.text, speaker=s.speaker, gender=s.gender, wnid=s.wnid, chapter=s.chapter,
               dialect_region=s.dialect_region, sentence_type=s.sentence_type)
    return row


def finish_extra(row: dict, extra: dict) -> dict:
    extra = {k: v for k, v in extra.items() if v is not None}
    row["extra"] = json.dumps(extra, sort_keys=True, default=str) if extra else None
    return row


def image_fields(data: bytes, path: str) -> tuple[dict, dict]:
    """(``image`` struct, extra facts) after the header probe; MediaError propagates."""
    from mmbatch.media import probe_image

    info = probe_image(data)
    return ({"bytes": data, "path": path},
            {"width": info.width, "height": info.height, "image_format": info.format, "mode": info.mode})


def audio_fields(data: bytes, path: str) -> tuple[dict, dict]:
    """(row fields: audio/duration/sample_rate/num_samples, extra facts) after the header probe."""
    from mmbatch.media import probe_audio

    info = probe_audio(data)
    if info.frames <= 0:
        raise Reject("empty_audio", "audio header declares no samples")
    return ({"audio": {"bytes": data, "path": path}, "duration": info.duration,
             "sample_rate": info.sample_rate, "num_samples": info.frames},
            {"channels": info.channels, "audio_format": info.format})


BuildRow = Callable[[Sample, dict, dict], dict]


def read_file_shard(samples: list[Sample], ctx: ReadContext, build_row: BuildRow,
                    chunk: int = 64) -> tuple[list[dict], list[dict]]:
    """Fetch each sample's files, call ``build_row``; every sample ends as a row or a quarantine row.

    A sample whose files, as listed, total more than ``max_file_mb`` is quarantined as ``too_large``
    before any of its bytes are fetched (and :func:`fetch` refuses a file that is larger when read).
    """
    from mmbatch.media import MediaError

    fs = ctx.fs()
    max_bytes = max_file_bytes(ctx.options)
    rows: list[dict] = []
    bad: list[dict] = []
    if max_bytes is not None:
        for s in samples:
            if s.nbytes > max_bytes:
                others = f" with the sample's {len(s.files) - 1} other file(s)" if len(s.files) > 1 else ""
                e = too_large(f"{s.main_path}{others}", s.nbytes, max_bytes)
                bad.append(Problem(e.reason, e.detail, path=s.main_path, sample_id=s.sample_id).to_row(ctx.kind))
        samples = [s for s in samples if s.nbytes <= max_bytes]
    for i in range(0, len(samples), chunk):
        part = samples[i:i + chunk]
        wanted = sorted({abs_path(ctx.root, p) for s in part for p in s.files.values() if p})
        blobs_all = fetch(fs, wanted, max_bytes=max_bytes)
        for s in part:
            blobs: dict[str, Any] = {}
            for role, p in s.files.items():
                if p:
                    blobs[role] = blobs_all.get(abs_path(ctx.root, p))
            try:
                for role, b in blobs.items():
                    if isinstance(b, Reject):
                        raise b
                    if isinstance(b, BaseException):
                        if isinstance(b, FileNotFoundError):
                            raise Reject(MISSING_FILE, f"{role} file {s.files[role]} not found")
                        raise Reject(READ_ERROR, f"{role} file {s.files[role]}: {type(b).__name__}: {b}")
                rows.append(build_row(s, blobs, ctx.options))
            except (Reject, MediaError) as e:
                bad.append(Problem(e.reason, e.detail, path=s.main_path, sample_id=s.sample_id).to_row(ctx.kind))
            except Exception as e:  # a bug or an unexpected file: quarantine, never lose the shard
                bad.append(Problem(READ_ERROR, f"{type(e).__name__}: {e}", path=s.main_path,
                                   sample_id=s.sample_id).to_row(ctx.kind))
            blobs.clear()
        blobs_all.clear()
    return rows, bad
