"""The one commit protocol of ingest and preprocess: workers write, the driver commits.

A stage sees it as :class:`UnitSink`, in the shape of Ray Data's ``Datasink``: ``write`` on a
worker, ``on_write_start`` and ``on_write_complete`` on the driver. Unlike a ``Datasink``, whose
``on_write_complete`` runs once when the whole write job is done, a unit is committed as soon as its
record reaches the driver, with a per-unit fingerprint, so that a killed run keeps every unit it
committed (Ray's job-level checkpointing lacks both):

- A **worker** computes one unit of work and writes its output files itself (:meth:`UnitSink.write`),
  each through a temp file + rename (:func:`write_table`, retried on transient
  storage errors). File names are deterministic per unit, so a retried task
  overwrites instead of appending. It returns a :class:`CommitRecord`: a few
  hundred bytes of counts, file names and timings, never row data. A stage may extend the
  record with its own fields (preprocess: where the unit ran); the engine reads only the base's.
- The **driver** (:class:`Committer`, behind the sink) writes the unit's marker
  ``<dir>/_shards/<unit>.json`` when the record arrives. A unit is committed
  when its marker exists with the unit's current fingerprint and its files
  exist; a rerun skips it. At the start of a run, :meth:`Committer.begin` deletes the data files of
  units planned by this run or the last one that have no marker (a killed run's leftovers), and
  nothing that no marker or planned unit of the folder names.
- ``_manifest.json`` is written last, from the markers alone.
"""
from __future__ import annotations

import errno
import posixpath
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, TypeVar

from mmbatch.engine import progress, storage

T = TypeVar("T")

WRITE_ATTEMPTS = 4           # a transient object-store error gets three more tries
WRITE_BACKOFF_S = 0.5


@dataclass
class CommitRecord:
    """What a worker returns for one unit: everything the driver needs, and no row data. A stage's
    extension (a subclass) adds its own fields; the marker holds them all."""
    unit: str                                   # unit id = marker name
    fingerprint: str
    input: str                                  # the input file (and row group) the unit read
    files: list[str] = field(default_factory=list)   # data files written, relative to the output dir
    rows_in: int = 0                            # input rows of the unit
    rows: int = 0                               # rows written
    quarantined: int = 0                        # rows quarantined (rows_in = rows + quarantined + dropped)
    dropped: int = 0                            # rows left out by design (split filter, unpaired)
    quarantine_file: str | None = None          # relative to the output dir
    reasons: dict = field(default_factory=dict)       # quarantine reason -> rows
    counts: dict = field(default_factory=dict)        # "split"/"label"/"presence" -> value -> rows written
    seconds: dict = field(default_factory=dict)       # stage -> busy seconds in the worker
    node: str = ""                              # Ray node id of the worker that ran the unit
    actors: dict = field(default_factory=dict)        # step ("unit"; "decode", "embed") -> {"pid", "gpus"} of its actor

    def to_marker(self) -> dict:
        return asdict(self)

    @classmethod
    def from_marker(cls, m: dict) -> "CommitRecord":
        """The record of a marker: keys this type lacks are left out (an older version's, another
        stage's), fields the marker lacks take their defaults."""
        known = {k: m[k] for k in cls.__dataclass_fields__ if k in m}
        return cls(**known)


# errnos of a storage error worth another try: timeouts, resets, a busy or throttling service (s3fs maps
# 503/SlowDown/ServiceUnavailable to EBUSY and 500/InternalError to EREMOTEIO)
TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                    errno.ECONNREFUSED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET,
                    errno.EHOSTUNREACH, getattr(errno, "EREMOTEIO", 121)}
# transport errors of the object-store clients (botocore, aiohttp) that are not OSErrors
TRANSIENT_NAMES = ("Timeout", "EndpointConnectionError", "ConnectionClosedError", "ServerDisconnected",
                   "ClientConnectorError", "ClientPayloadError", "ClientOSError")
_TRANSIENT_TEXT = re.compile(r"\b(SlowDown|Throttl\w*|TooManyRequests|RequestTimeout|ServiceUnavailable|"
                             r"InternalError|429|50[0234])\b")


def is_transient(e: BaseException) -> bool:
    """True for an error another try may not get: timeouts, connection resets, throttling, 5xx.
    Permission denied, no space left, not found and the like are not (nor anything unrecognised)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          FileExistsError)):
            return False
        if isinstance(e, (TimeoutError, ConnectionError)) or any(n in type(e).__name__ for n in TRANSIENT_NAMES):
            return True
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno in TRANSIENT_ERRNOS
        if _TRANSIENT_TEXT.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _naming(e: OSError, what: str) -> OSError:
    """``e`` with ``what`` (the operation and its path) in its message, same type where possible."""
    try:
        if e.errno is not None:
            return type(e)(e.errno, f"{what}: {e.strerror or e}", *([e.filename] if e.filename else []))
        return type(e)(f"{what}: {e}")
    except Exception:           # an OSError subclass with another constructor
        return OSError(f"{what}: {type(e).__name__}: {e}")


def call_with_retry(fn: Callable[[], T], what: str, attempts: int = WRITE_ATTEMPTS,
                    backoff_s: float = WRITE_BACKOFF_S) -> T:
    """``fn()``, retried with exponential backoff on transient storage errors (:func:`is_transient`).
    Any other error fails at once, its message naming ``what`` (e.g. "writing s3://b/x.parquet")."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                if isinstance(e, OSError):
                    raise _naming(e, what) from e
                raise
            if attempt == attempts:
                raise OSError(f"{what}: failed {attempts} times, last error: {e}") from e
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def write_table(fs, path: str, table, row_group_size: int | None = None,
                compression: dict[str, str] | None = None) -> None:
    """Atomic Parquet write (temp file + rename), retried on transient storage errors."""
    call_with_retry(lambda: storage.atomic_write_table(fs, path, table, row_group_size=row_group_size,
                                                       compression=compression), f"writing {path}")


class Committer:
    """Driver side of the protocol for one output directory; ``record``: the stage's record type."""

    def __init__(self, fs, out_dir: str, record: type[CommitRecord] = CommitRecord):
        self.fs, self.out_dir, self.record = fs, out_dir, record

    def marker(self, unit: str, fingerprint: str) -> CommitRecord | None:
        """The record of ``unit`` if it is committed with ``fingerprint`` (files present), else None."""
        m = storage.committed(self.fs, self.out_dir, unit, fingerprint)
        return self.record.from_marker(m) if m else None
    def on_write_complete(self, rec: CommitRecord) -> None:
        storage.write_marker(self.fs, self.out_dir, rec.unit, rec.to_marker())
        progress.unit_committed()

    def begin(self, keep_units: Iterable[str], data_dirs: Iterable[str] = ("",)) -> list[str]:
        """Before a run writes anything here: drop committed units not in ``keep_units`` (stale: their
        input or plan changed), then the files of units planned by this run or by the last one that have
        no marker (a killed run's output), then temp files; record this run's plan, so that the next run
        can recognise what this one leaves half done. Nothing else is touched: a name is removed only
        when a marker or a planned unit id of this folder names it (docs/data-safety.md). Returns the
        removed paths, relative to the folder."""
        keep = sorted(set(keep_units))
        stale, named = storage.remove_stale(self.fs, self.out_dir, keep)
        removed = [f"{storage.SHARDS_DIR}/{u}.json" for u in stale]
        present = set()                     # one listing per folder, not a request per planned file
        for d in {d.rstrip("/") for d in data_dirs}:
            folder = storage.join(self.out_dir, d) if d else self.out_dir
            present.update(posixpath.join(d, posixpath.basename(p)) for p in storage.list_parquet(self.fs, folder))
        planned = set(keep) | set(storage.read_plan(self.fs, self.out_dir))
        for rel in storage.unit_files(sorted(planned)):
            if rel in present and rel not in named:
                self.fs.rm(storage.join(self.out_dir, rel))
                removed.append(rel)
        storage.clean_tmp(self.fs, self.out_dir)
        storage.write_plan(self.fs, self.out_dir, keep)
        return removed


class UnitSink:
    """The commit protocol of one output directory in the shape of Ray Data's ``Datasink``:
    :meth:`write` runs in a worker, the other methods on the driver (over a :class:`Committer`)."""

    def __init__(self, fs, out_dir: str, record: type[CommitRecord] = CommitRecord):
        self.fs, self.out_dir = fs, out_dir
        self.committer = Committer(fs, out_dir, record)

    def on_write_start(self, keep_units: Iterable[str], data_dirs: Iterable[str] = ("",)) -> list[str]:
        """Before anything is written: remove stale units and a killed run's leftovers (:meth:`Committer.begin`)."""
        return self.committer.begin(keep_units, data_dirs)

    def committed(self, unit: str, fingerprint: str) -> CommitRecord | None:
        """The record of ``unit`` when an earlier run committed it with ``fingerprint``, else None."""
        return self.committer.marker(unit, fingerprint)

    def write(self, unit: str, table, quarantine=None, **options) -> tuple[str, str | None]:
        """Worker side: the unit's data file ``<unit>.parquet`` (``options``: :func:`write_table`'s) and,
        when ``quarantine`` has rows, its quarantine file, else a stale one removed. Returns (the data
        file, the quarantine file or None), relative to the output directory."""
        name = f"{unit}.parquet"
        write_table(self.fs, storage.join(self.out_dir, name), table, **options)
        q_rel = f"{storage.QUARANTINE_DIR}/{name}"
        q_path = storage.join(self.out_dir, q_rel)
        if quarantine is not None and quarantine.num_rows:
            write_table(self.fs, q_path, quarantine)
            return name, q_rel
        if self.fs.exists(q_path):
            self.fs.rm(q_path)
        return name, None

    def on_write_complete(self, rec: CommitRecord) -> None:
        """Driver side, as each unit's record arrives: its marker (the unit is committed)."""
        self.committer.on_write_complete(rec)
