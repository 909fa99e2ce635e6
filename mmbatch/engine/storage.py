"""File-system access (local paths and fsspec URIs) and atomic commits.

Every output mmbatch writes follows one protocol:
- a reader never sees a partial file. On a local disk a data file is written
  under ``<dir>/_tmp/`` and renamed into place (readers ignore ``_``-prefixed
  names). An object store has no atomic rename (fsspec's ``mv`` is a copy plus a
  delete), so there each object is written once, to its final key, by a single
  PUT or a multipart upload: S3 shows the object only once the upload completes;
- each committed shard gets a marker ``<dir>/_shards/<shard_id>.json`` holding
  its fingerprint and counts: a rerun skips shards whose marker matches;
- ``<dir>/_manifest.json`` is written last: its presence means "complete".
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import logging
import posixpath
import re
import uuid
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

_log = logging.getLogger("mmbatch.engine.storage")

MANIFEST = "_manifest.json"
SHARDS_DIR = "_shards"
TMP_DIR = "_tmp"
QUARANTINE_DIR = "quarantine"


# The package each object-store scheme needs, and the extra of mmbatch that installs it.
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


def configure(options: dict | None) -> None:
    """Options per scheme (the workflow's ``storage`` key, e.g. ``{"s3": {"endpoint_url": ...}}``) for every
    filesystem :func:`url_to_fs` makes from now on in this process; a scheme set again is updated. They are
    held here only: fsspec's global ``fsspec.config.conf`` is left alone, and credentials that may sit in them
    are never written anywhere (:func:`options` is shipped to workers in memory only). Without them,
    s3fs/gcsfs read the standard environment (``AWS_*``, profiles, ...)."""
    for scheme, opts in (options or {}).items():
        _OPTIONS[scheme] = {**_OPTIONS.get(scheme, {}), **opts}


def options() -> dict:
    """What :func:`configure` set in this process: workers get it with their job."""
    return {k: dict(v) for k, v in _OPTIONS.items()}


_OPTIONS: dict[str, dict] = {}


def _options_of(uri: str) -> dict[str, dict]:
    """``{protocol: options}`` for the protocols of ``uri`` (a chained URI has several) that
    :func:`configure` set, under any name of the same filesystem (options for s3 serve s3a:// too)."""
    if not _OPTIONS:
        return {}
    bits = uri.split("::")
    out = {}
    for i, bit in enumerate(bits):
        proto = bit.split("://", 1)[0] if "://" in bit else ("file" if i == len(bits) - 1 else bit)
        opts: dict = {}
        for name in (*_aliases(proto), proto):          # the name used in the URI wins
            opts.update(_OPTIONS.get(name, {}))
        if opts:
            out[proto] = opts
    return out


def _aliases(proto: str) -> tuple[str, ...]:
    try:
        names = fsspec.get_filesystem_class(proto).protocol
    except (ImportError, ValueError):          # url_to_fs says what is wrong
        return ()
    return tuple(names) if isinstance(names, (tuple, list)) else (names,)


def url_to_fs(uri: str):
    """(filesystem, path) for a local path or any fsspec URI, made with the options :func:`configure` set
    for its scheme (passed explicitly, as fsspec storage options). A scheme whose package is missing is a
    :class:`~mmbatch.errors.UsageError` naming the extra to install."""
    try:
        fs, path = fsspec.core.url_to_fs(str(uri), **_options_of(str(uri)))
    except ImportError as e:
        from mmbatch.errors import UsageError
        scheme = str(uri).split("://", 1)[0]
        pkg, extra = EXTRAS.get(scheme, (None, None))
        hint = f"pip install 'mmbatch[{extra}]' (or {pkg})" if extra else f"install the fsspec package for {scheme}://"
        raise UsageError(f"{uri}: {scheme}:// needs a package that is not installed: {hint}") from e
    return fs, path


def read_bytes(uri: str) -> bytes:
    """The bytes of a local path or fsspec URI (s3://, gs://, file://, ...), read through
    :func:`url_to_fs` (so with the options :func:`configure` set for its scheme)."""
    fs, path = url_to_fs(uri)
    return fs.cat_file(path)


def modified(info: dict) -> Any:
    """What changes when a file's bytes do, from its fsspec ``info``: the modification time (local,
    S3, GCS, ...) or, where a store gives none, its ETag / MD5; None when the store gives neither."""
    for k in ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag", "md5Hash"):
        if info.get(k) is not None:
            v = info[k]
            return v if isinstance(v, (int, float, str)) else str(v)
    return None


def uri(fs, path: str) -> str:
    """``path`` of ``fs`` with its scheme (``s3://bucket/key``); a local path as it is. A path handed
    to another process (a unit's input, a partner's file) must carry its scheme: without it, the
    other side would resolve ``bucket/key`` as a local path."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(*parts: str) -> str:
    return posixpath.join(*[str(p) for p in parts])


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def arrow_fs(fs):
    """The ``filesystem=`` argument for pyarrow: None (Arrow's native local I/O) for local paths,
    else the fsspec filesystem, whose wrapper costs more CPU per read (docs/performance.md)."""
    return None if is_local(fs) else fs


def fingerprint(obj: Any) -> str:
    """Stable short hash of any JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def atomic_write_bytes(fs, path: str, data: bytes) -> None:
    """``data`` at ``path``, never visible half-written: temp file + rename on a local disk, a single
    PUT of the final object on an object store."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    parent = posixpath.dirname(path)
    tmp = join(parent, TMP_DIR, f"{uuid.uuid4().hex}.{posixpath.basename(path)}")
    fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic on POSIX


def _is_float(t: pa.DataType) -> bool:
    while pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_floating(t)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary encoding: all but floats and lists of floats (embeddings).

    Parquet tries a dictionary first and falls back to plain once it grows too big; on
    embeddings (all values distinct) that try is wasted work and leaves a larger file.
    Measured on a fused shard of 300 rows x 4,668 floats: 0.08 s -> 0.03 s to write,
    5.4 MB -> 4.1 MB.
    """
    return [f.name for f in schema if not _is_float(f.type)]


def float_leaves(schema: pa.Schema) -> list[str]:
    """Leaf paths of the float and list-of-float columns (``fused.list.element``)."""
    floats = {f.name for f in schema if _is_float(f.type)}
    return [c for c in leaf_columns(schema) if c.split(".", 1)[0] in floats]


def leaf_columns(schema: pa.Schema) -> list[str]:
    """Parquet leaf column paths of an Arrow schema (``image.bytes``, ``words.list.element.start``)."""
    key = schema.to_string(show_schema_metadata=False)
    got = _LEAVES.get(key)
    if got is None:
        buf = pa.BufferOutputStream()
        pq.write_table(schema.remove_metadata().empty_table(), buf)
        pf = pq.ParquetFile(pa.BufferReader(buf.getvalue()))
        got = _LEAVES[key] = [pf.schema.column(i).path for i in range(len(pf.schema))]
    return got


_LEAVES: dict[str, list[str]] = {}


# Float columns (embeddings) are written byte-stream-split + LZ4 (against zstd: cheaper to write
# and read, a little larger; docs/performance.md has the figures).
FLOAT_CODEC = "lz4"


def atomic_write_table(fs, path: str, table: pa.Table, row_group_size: int | None = None,
                       compression: dict[str, str] | None = None) -> None:
    """Write ``table`` as Parquet at ``path`` (a temp file + rename on a local disk, one upload of the
    final object on an object store: :func:`_put_once`): float columns
    byte-stream-split + :data:`FLOAT_CODEC`, the others zstd, except the leaf columns
    ``compression`` maps to another codec (e.g. ``{"image.bytes": "none"}``)."""
    floats = float_leaves(table.schema)
    codec: str | dict = "zstd"
    if compression or floats:
        codec = {c: (compression or {}).get(c, FLOAT_CODEC if c in floats else "zstd")
                 for c in leaf_columns(table.schema)}
    kwargs = dict(row_group_size=row_group_size, compression=codec, use_dictionary=dictionary_columns(table.schema),
                  use_byte_stream_split=floats or False)
    if not is_local(fs):
        _put_once(fs, path, lambda local: pq.write_table(table, local, **kwargs))
        return
    tmp = join(posixpath.dirname(path), TMP_DIR, f"{uuid.uuid4().hex}.{posixpath.basename(path)}")
    fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
    pq.write_table(table, tmp, filesystem=fs, **kwargs)
    os.replace(tmp, path)  # atomic on POSIX


def _put_once(fs, path: str, write_local) -> None:
    """Object stores: write the file to a local temp file, then upload it once to its final key
    (``put_file``: one PUT, or a multipart upload that S3 shows only when complete). Writing through
    an open remote file instead would commit a truncated object if the writer failed midway."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmbatch-put-") as d:
        local = os.path.join(d, posixpath.basename(path))
        write_local(local)
        fs.put_file(local, path)


def open_input(fs, path: str):
    """A read handle for Parquet that fetches only the byte ranges Arrow asks for (the footer, then
    a row group's column chunks), never the whole object: the local path itself (Arrow's native,
    memory-mappable I/O); for s3:// an Arrow S3 file (:func:`arrow_s3`: ranged GETs straight into
    Arrow buffers); else an fsspec file with no read-ahead cache (one ranged GET per read)."""
    if is_local(fs):
        return path
    path = fs._strip_protocol(path)
    native = arrow_s3(fs, path)
    if native is not None:
        try:
            return native.open_input_file(path)
        except OSError:         # e.g. credentials only botocore knows how to get: s3fs says what is wrong
            pass
    return fs.open(path, "rb", block_size=READ_BLOCK, cache_type="none")


# s3fs options that Arrow's S3 client can take too; with any other (profile, session, SSE, requester
# pays, ...) reads stay on s3fs
_ARROW_S3_OPTIONS = {"endpoint_url", "key", "secret", "token", "anon", "client_kwargs", "use_ssl",
                     "default_block_size", "default_cache_type", "default_fill_cache", "skip_instance_cache",
                     "use_listings_cache", "listings_expiry_time", "max_paths"}


def arrow_s3(fs, path: str):
    """pyarrow's S3FileSystem with the settings of the s3fs filesystem ``fs`` (endpoint, keys, region;
    the rest from the same standard environment and profiles botocore reads) for the bucket of ``path``,
    or None where ``fs`` is no s3fs or has options Arrow cannot take. Measured reading 28 MB row groups
    from moto: peak memory 1.1x a local memory-mapped read, against 1.5x through s3fs, whose response
    bytes are copied again on their way to Arrow (docs/object-storage.md)."""
    opts = dict(getattr(fs, "storage_options", {}) or {})
    protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    client = opts.get("client_kwargs") or {}
    if "s3" not in protos or set(opts) - _ARROW_S3_OPTIONS or set(client) - {"endpoint_url", "region_name"}:
        return None
    endpoint = (opts.get("endpoint_url") or client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    region = client.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    bucket = None if (region or endpoint) else path.split("/", 1)[0]     # AWS itself: the bucket's region
    key = (endpoint, region, bucket, opts.get("key"), opts.get("secret"), opts.get("token"), bool(opts.get("anon")))
    if key not in _ARROW_S3:
        try:
            from pyarrow import fs as pafs
            if bucket:
                region = pafs.resolve_s3_region(bucket)
        except (ImportError, OSError):              # a pyarrow built without S3; a bucket it cannot see
            return None
        kw: dict = {"anonymous": bool(opts.get("anon")), "region": region}
        if endpoint:
            scheme, _, host = endpoint.rpartition("://")
            kw.update(endpoint_override=host, scheme=scheme or "https")
        if opts.get("key"):
            kw.update(access_key=opts["key"], secret_key=opts.get("secret"), session_token=opts.get("token"))
        _ARROW_S3[key] = pafs.S3FileSystem(**kw)
    return _ARROW_S3[key]


_ARROW_S3: dict[tuple, Any] = {}


READ_BLOCK = 1 << 20


def jsonable(x: Any) -> Any:
    """``x`` as strict JSON values: str keys, lists for tuples, sorted lists for sets, ``.item()`` of
    NumPy/torch scalars, inf/nan as strings (``json`` would write the non-standard ``Infinity``/``NaN``),
    anything else as ``str(x)``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (set, frozenset)):
        return sorted(jsonable(v) for v in x)
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return jsonable(x.item())
    return str(x)


def write_json(fs, path: str, obj: Any) -> None:
    atomic_write_bytes(fs, path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(fs, path: str) -> Any | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def list_parquet(fs, directory: str) -> list[str]:
    """Committed data files directly under ``directory`` (sorted, no ``_``/``.`` names)."""
    try:
        entries = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for p in entries:
        name = posixpath.basename(p.rstrip("/"))
        if name.endswith(".parquet") and not name.startswith(("_", ".")):
            out.append(p)
    return sorted(out)


# --- names that markers and plans hold (validated before a cleanup follows them) ------------
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


def plain_name(name: object) -> bool:
    """True for one plain file or folder name: no separator, not ``.``/``..``, no leading ``_``/``.``."""
    return isinstance(name, str) and bool(_PLAIN.match(name)) and name not in (".", "..") and len(name) <= 255


def _named(marker: object) -> list:
    """Every entry a unit marker's ``files`` and ``quarantine_file`` hold, as found."""
    if not isinstance(marker, dict):
        return []
    listed = marker.get("files") or []
    return [*(listed if isinstance(listed, list) else [listed]),
            *([marker["quarantine_file"]] if marker.get("quarantine_file") else [])]


def marker_files(marker: object, where: str = "") -> list[str]:
    """The data files a unit marker names (``files`` and ``quarantine_file``), relative to its folder.
    Only ``NAME.parquet`` and ``quarantine/NAME.parquet`` with a plain NAME are kept; any other entry
    (``../x``, ``/abs``, another bucket) is dropped with a warning, never followed."""
    out = []
    for f in _named(marker):
        if is_data_name(f):
            if f not in out:
                out.append(f)
        else:
            _log.warning("ignoring %r named by the marker %s: not a data file name of its folder", f, where)
    return out


def marker_is_clean(marker: object) -> bool:
    """True when every name the marker holds is a data file name of its folder."""
    return all(is_data_name(f) for f in _named(marker))


def is_data_name(rel: object) -> bool:
    """True for ``NAME.parquet`` or ``quarantine/NAME.parquet`` with a plain NAME."""
    if not isinstance(rel, str) or not rel.endswith(".parquet"):
        return False
    parts = rel.split("/")
    if len(parts) == 2 and parts[0] != QUARANTINE_DIR:
        return False
    return len(parts) <= 2 and plain_name(parts[-1])


def unit_files(units: Iterable[str]) -> list[str]:
    """The data file names a unit id writes (``ID.parquet``, ``quarantine/ID.parquet``), for ids that
    are plain names."""
    return [f for u in units if plain_name(u) for f in (f"{u}.parquet", f"{QUARANTINE_DIR}/{u}.parquet")]


def read_marker(fs, out_dir: str, shard_id: str) -> dict | None:
    return read_json(fs, join(out_dir, SHARDS_DIR, f"{shard_id}.json"))


def write_marker(fs, out_dir: str, shard_id: str, marker: dict) -> None:
    fs.makedirs(join(out_dir, SHARDS_DIR), exist_ok=True)
    write_json(fs, join(out_dir, SHARDS_DIR, f"{shard_id}.json"), marker)


def committed(fs, out_dir: str, shard_id: str, fp: str) -> dict | None:
    """The marker of a unit committed with fingerprint ``fp`` whose files exist, else None. A marker
    naming anything but its folder's data files (marker_files) is not a commit."""
    m = read_marker(fs, out_dir, shard_id)
    if not (isinstance(m, dict) and m.get("fingerprint") == fp and marker_is_clean(m)):
        return None
    return m if all(fs.exists(join(out_dir, f)) for f in marker_files(m)) else None


def remove_stale(fs, out_dir: str, keep_shards: Iterable[str]) -> tuple[list[str], set[str]]:
    """Delete committed units (their files + markers) not in ``keep_shards``, reading each marker once.
    Only the data file names a marker may hold are followed (marker_files). Returns (the removed unit
    ids, the data files the kept markers name)."""
    keep = set(keep_shards)
    removed, named = [], set()
    for marker_path in marker_paths(fs, out_dir):
        sid = posixpath.basename(marker_path)[: -len(".json")]
        files = marker_files(read_json(fs, marker_path), marker_path)
        if sid in keep:
            named.update(files)
            continue
        for f in files:
            p = join(out_dir, f)
            if fs.exists(p):
                fs.rm(p)
        fs.rm(marker_path)
        removed.append(sid)
    return removed, named


PLAN = "_plan.json"         # the unit ids the last run in a folder planned (mmbatch.engine.commit.Committer.begin)


def read_plan(fs, out_dir: str) -> list[str]:
    """The unit ids the last run in ``out_dir`` planned (plain names only)."""
    got = read_json(fs, join(out_dir, PLAN))
    units = got.get("units") if isinstance(got, dict) else None
    return [u for u in units if plain_name(u)] if isinstance(units, list) else []


def write_plan(fs, out_dir: str, units: list[str]) -> None:
    write_json(fs, join(out_dir, PLAN), {"units": list(units)})


def clean_tmp(fs, out_dir: str) -> None:
    for d in (join(out_dir, TMP_DIR), join(out_dir, QUARANTINE_DIR, TMP_DIR), join(out_dir, SHARDS_DIR, TMP_DIR)):
        if fs.exists(d):
            fs.rm(d, recursive=True)


def marker_paths(fs, out_dir: str) -> list[str]:
    """Paths of every unit marker under ``out_dir`` (``_shards/ID.json``; ``_``-names are not markers)."""
    try:
        entries = fs.ls(join(out_dir, SHARDS_DIR), detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in entries if p.endswith(".json") and not posixpath.basename(p).startswith("_"))


def remove_manifest(fs, out_dir: str) -> None:
    """Remove ``<out_dir>/_manifest.json``: the folder is no longer known complete."""
    path = join(out_dir, MANIFEST)
    if fs.exists(path):
        fs.rm(path)
