"""Model registry in a folder or any fsspec URI (s3://, gs://, ...).

Layout (every JSON file written atomically through :mod:`mmbatch.engine.storage`)::

    <root>/versions/v0001/model/...       model files, copied from the training output
    <root>/versions/v0001/workflow.yaml   the workflow that produced it
    <root>/versions/v0001/version.json    metrics, data fingerprints, mmbatch version, time;
                                          written last: a version without it does not exist
    <root>/versions/v0001/_writer.json    who claimed the number (written first, put-if-absent)
    <root>/aliases/champion.json          {"version", "since", "reason", "lineage"}
    <root>/history/000001-register.json   one file per event (register, promote, rollback),
                                          numbered under the lock: append-only on object stores too
    <root>/last_cycle.json                outcome of the latest `mmbatch retrain` cycle

``lineage`` in the champion alias is the stack of champions: ``promote`` pushes,
``rollback`` pops, so two rollbacks go back two promotions.

Writers hold a lock (:meth:`Registry.lock`), re-entrant within one Registry:

- local folders: an OS file lock (``filelock``) on ``<root>/_lock``; the
  operating system releases it when the holder dies. The holder writes who it
  is to ``<root>/_lock.owner.json`` so a loser can say who holds it.
- object stores: numbered lock generations ``<root>/_locks/0000000001.json``, ...;
  the highest one is the lock. A writer takes it by creating the next generation
  with exclusive create (fsspec mode ``"xb"``: an ``If-None-Match: *`` conditional
  PUT with s3fs, checked once per Registry to be honoured by the store; on a store
  that ignores it, a check-then-write and a warning that concurrent writers are not
  excluded there) once the highest one is released or stale. The holder refreshes
  its own generation every ``stale_after / 4`` seconds (retrying transient errors,
  never giving up while it holds the lock) and marks it released at the end. One not
  refreshed for its holder's ``stale_after`` seconds (default 15 min, recorded in it)
  is taken to be a dead process's and is followed by the next generation. No writer
  overwrites a generation it does not hold or deletes the highest one; a new holder
  deletes the ones below its own.

Before each write the holder checks that its lock is still the highest generation
(and was refreshed within ``3/4 * stale_after``); if not it raises :class:`LockLost`
(the CLI prints it and exits 1) and writes nothing more. Whatever the lock does, a
version number is claimed with a put-if-absent of ``versions/vNNNN/_writer.json``
before anything is written there, and history events are created the same way, so two
writers can never both write ``vNNNN``.

A loser gets :class:`RegistryLocked` (a :class:`~mmbatch.errors.UsageError`:
the CLI prints its message and exits 2) naming the holder.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import yaml

from mmbatch import __version__
from mmbatch.engine import storage
from mmbatch.engine.commit import call_with_retry
from mmbatch.errors import LockLost, UsageError

log = logging.getLogger("mmbatch.registry")

VERSIONS, ALIASES, HISTORY = "versions", "aliases", "history"
VERSION_FILE, MODEL_DIR, WORKFLOW_FILE = "version.json", "model", "workflow.yaml"
CHAMPION = "champion"
LAST_CYCLE = "last_cycle.json"
LOCAL_LOCK, LOCK_OWNER, LOCKS = "_lock", "_lock.owner.json", "_locks"
WRITER_FILE = "_writer.json"          # versions/vNNNN/_writer.json: the put-if-absent claim of the number
DEFAULT_LOCK_TIMEOUT = 30.0
DEFAULT_STALE_AFTER = 900.0
_VERSION_RE = re.compile(r"^v?(\d+)$")


class RegistryLocked(UsageError):
    """Another writer holds the registry lock."""


@dataclass
class ModelVersion:
    """One committed version (the content of its version.json, plus where it lives)."""
    version: str
    uri: str                      # the version folder
    model_uri: str                # the model files (pass this to evaluate / warm start)
    created: str = ""
    metrics: dict = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)
    mmbatch_version: str = ""
    source: str = ""
    workflow_name: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def normalize_version(v: str | int) -> str:
    """``3``, ``"3"``, ``"v3"``, ``"v0003"`` -> ``"v0003"``."""
    m = _VERSION_RE.match(str(v).strip())
    if not m:
        raise UsageError(f"not a version: {v!r} (expected v0001, v1 or 1)")
    return f"v{int(m.group(1)):04d}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _owner_info(owner: str) -> dict:
    return {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
            "created": time.time(), "refreshed": time.time()}


def _describe_holder(info: Optional[dict]) -> str:
    if not info:
        return "another writer"
    since = _dt.datetime.fromtimestamp(info.get("created", 0), _dt.timezone.utc).isoformat(timespec="seconds")
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {since})"


class Registry:
    """A model registry rooted at ``uri`` (created on the first write)."""

    def __init__(self, uri: str, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                 stale_after: float = DEFAULT_STALE_AFTER):
        uri = str(uri)
        if "://" not in uri:
            uri = os.path.abspath(os.path.expanduser(uri))   # model URIs must work from any cwd
        self.uri = uri.rstrip("/") or "/"
        self.fs, self.root = storage.url_to_fs(self.uri)
        self.root = self.root.rstrip("/") or "/"
        self.lock_timeout = lock_timeout
        self.stale_after = stale_after
        self._depth = 0
        self._guard = threading.RLock()
        self._held: Optional[_LocalLock | _ObjectLock] = None   # while self.lock() is held
        self._conditional: Optional[bool] = None        # see conditional_writes()

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # --- paths ------------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def _uri(self, *parts: str) -> str:
        """A URI for a path inside the registry, with the original protocol."""
        if "://" in self.uri:
            return storage.join(self.uri, *parts)
        return os.path.join(self.uri, *parts)

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    # --- reading ----------------------------------------------------------------------
    def _version_numbers(self) -> list[int]:
        """Every version folder, committed or not (numbers are never reused)."""
        nums = []
        for n in self._names(self._p(VERSIONS)):
            m = re.match(r"^v(\d+)$", n)
            if m:
                nums.append(int(m.group(1)))
        return sorted(nums)

    def _load(self, version: str) -> Optional[ModelVersion]:
        meta = storage.read_json(self.fs, self._p(VERSIONS, version, VERSION_FILE))
        if not meta:
            return None
        known = {k: meta.get(k) for k in ("created", "metrics", "fingerprints", "mmbatch_version",
                                          "source", "workflow_name", "extra") if meta.get(k) is not None}
        return ModelVersion(version=version, uri=self._uri(VERSIONS, version),
                            model_uri=self._uri(VERSIONS, version, MODEL_DIR), **known)

    def list(self) -> list[ModelVersion]:
        """Committed versions, oldest first."""
        out = []
        for n in self._version_numbers():
            mv = self._load(f"v{n:04d}")
            if mv is not None:
                out.append(mv)
        return out

    def get(self, version: str | int) -> ModelVersion:
        """A committed version; ``"champion"`` names the current champion."""
        if str(version).strip().lower() == CHAMPION:
            mv = self.champion()
            if mv is None:
                raise UsageError(f"registry {self.uri} has no champion yet")
            return mv
        v = normalize_version(version)
        mv = self._load(v)
        if mv is None:
            known = ", ".join(m.version for m in self.list()) or "none"
            raise UsageError(f"registry {self.uri} has no version {v} (versions: {known})")
        return mv

    def alias(self, name: str = CHAMPION) -> Optional[dict]:
        return storage.read_json(self.fs, self._p(ALIASES, f"{name}.json"))

    def champion(self) -> Optional[ModelVersion]:
        a = self.alias(CHAMPION)
        return self._load(a["version"]) if a and a.get("version") else None

    def history(self) -> list[dict]:
        """Every recorded event, oldest first."""
        try:
            paths = sorted(p for p in self.fs.ls(self._p(HISTORY), detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return []
        events = []
        for p in paths:
            ev = storage.read_json(self.fs, p)
            if ev is not None:
                events.append(ev)
        return events

    def find(self, **fingerprints: str) -> list[ModelVersion]:
        """Committed versions whose recorded fingerprints include all of ``fingerprints``."""
        return [mv for mv in self.list()
                if all(mv.fingerprints.get(k) == v for k, v in fingerprints.items())]

    def last_cycle(self) -> Optional[dict]:
        return storage.read_json(self.fs, self._p(LAST_CYCLE))

    # --- writing (each under the lock) ------------------------------------------------
    def register(self, model_dir: str, metrics: dict, fingerprints: Optional[dict] = None,
                 workflow: Any = None, extra: Optional[dict] = None) -> str:
        """Copy ``model_dir`` into a new version; returns its name (``v0001``, ...)."""
        src_fs, src = storage.url_to_fs(str(model_dir))
        if not src_fs.isdir(src) or not src_fs.find(src):
            raise UsageError(f"model folder {model_dir} does not exist or is empty")
        metrics = {str(k): (float(v) if isinstance(v, (int, float)) else v) for k, v in (metrics or {}).items()}
        wf_text, wf_name = _workflow_text(workflow)
        with self.lock():
            nums = self._version_numbers()
            version = f"v{(nums[-1] + 1 if nums else 1):04d}"
            vdir = self._p(VERSIONS, version)
            self._held.check(f"creating {version}")
            claim = {"version": version, "owner": self._held.owner, "host": socket.gethostname(),
                     "pid": os.getpid(), "time": _now()}
            if not self._claim(storage.join(vdir, WRITER_FILE), claim):      # the fence: put-if-absent
                raise LockLost(f"registry {self.uri}: another writer created {version} while this one held the "
                               f"lock, so its lock was lost; stopped before writing {version}. Run it again.")
            _copy_tree(src_fs, src, self.fs, storage.join(vdir, MODEL_DIR))
            if wf_text is not None:
                storage.atomic_write_bytes(self.fs, storage.join(vdir, WORKFLOW_FILE), wf_text.encode())
            meta = {"version": version, "created": _now(), "metrics": metrics,
                    "fingerprints": dict(fingerprints or {}), "mmbatch_version": __version__,
                    "source": str(model_dir), "workflow_name": wf_name, "extra": dict(extra or {})}
            self._held.check(f"committing {version}")
            storage.write_json(self.fs, storage.join(vdir, VERSION_FILE), meta)   # commit point
            self.record("register", version=version, metrics=metrics)
        log.info("registered %s in %s", version, self.uri)
        return version

    def promote(self, version: str | int, reason: str = "manual") -> str:
        """Make ``version`` the champion (no-op when it already is). Returns it."""
        with self.lock():
            mv = self.get(version)
            cur = self.alias(CHAMPION) or {}
            if cur.get("version") == mv.version:
                return mv.version
            lineage = list(cur.get("lineage") or ([cur["version"]] if cur.get("version") else []))
            lineage.append(mv.version)
            self._held.check(f"promoting {mv.version}")
            storage.write_json(self.fs, self._p(ALIASES, f"{CHAMPION}.json"),
                               {"version": mv.version, "since": _now(), "reason": reason, "lineage": lineage})
            self.record("promote", version=mv.version, previous=cur.get("version"), reason=reason)
        return mv.version

    def rollback(self, reason: str = "rollback") -> str:
        """Champion -> the previous champion. Returns the new champion."""
        with self.lock():
            cur = self.alias(CHAMPION) or {}
            lineage = list(cur.get("lineage") or [])
            if len(lineage) < 2:
                what = f"{cur['version']} is the first champion" if cur.get("version") else "there is no champion"
                raise UsageError(f"nothing to roll back to in {self.uri}: {what}")
            dropped = lineage.pop()
            target = lineage[-1]
            if self._load(target) is None:
                raise UsageError(f"cannot roll back to {target}: its version.json is missing")
            self._held.check(f"rolling back to {target}")
            storage.write_json(self.fs, self._p(ALIASES, f"{CHAMPION}.json"),
                               {"version": target, "since": _now(), "reason": reason, "lineage": lineage})
            self.record("rollback", version=target, previous=dropped, reason=reason)
        return target

    def record(self, event: str, **data: Any) -> dict:
        """Append one event to the history (takes the lock if not held)."""
        with self.lock():
            hdir = self._p(HISTORY)
            seqs = [int(n.split("-", 1)[0]) for n in self._names(hdir) if re.match(r"^\d+-.*\.json$", n)]
            seq = (max(seqs) + 1) if seqs else 1
            ev = {"seq": seq, "event": event, "time": _now(), "host": socket.gethostname(),
                  "user": _user(), **data}
            self._held.check(f"recording the {event} event")
            if not self._claim(storage.join(hdir, f"{seq:06d}-{event}.json"), ev):
                raise LockLost(f"registry {self.uri}: another writer recorded history event {seq} while this one "
                               f"held the lock, so its lock was lost; stopped before recording {event}. Run it again.")
        return ev

    def write_last_cycle(self, info: dict) -> None:
        with self.lock():
            self._held.check(f"writing {LAST_CYCLE}")
            storage.write_json(self.fs, self._p(LAST_CYCLE), {"time": _now(), **info})

    # --- the lock ---------------------------------------------------------------------
    @contextmanager
    def lock(self, timeout: Optional[float] = None) -> Iterator["Registry"]:
        """Hold the registry's writer lock; raises :class:`RegistryLocked` after ``timeout`` s.

        Re-entrant: nested ``with registry.lock()`` blocks (and the write methods
        called inside one) do not wait on themselves.
        """
        timeout = self.lock_timeout if timeout is None else timeout
        # In-process: one thread at a time (RLock: the holding thread may nest).
        got = self._guard.acquire(timeout=timeout) if timeout > 0 else self._guard.acquire(blocking=False)
        if not got:
            raise RegistryLocked(self._locked_message({"pid": os.getpid(), "host": socket.gethostname(),
                                                       "created": time.time()}, timeout))
        try:
            if self._depth == 0:
                self._held = self._acquire(timeout)
            self._depth += 1
        except BaseException:
            self._guard.release()
            raise
        try:
            yield self
        finally:
            self._depth -= 1
            try:
                if self._depth == 0 and self._held is not None:
                    held, self._held = self._held, None
                    held.release()
            finally:
                self._guard.release()

    def _acquire(self, timeout: float):
        self.fs.makedirs(self.root, exist_ok=True)
        if storage.is_local(self.fs):
            return self._acquire_local(timeout)
        return self._acquire_object(timeout)

    def _acquire_local(self, timeout: float) -> "_LocalLock":
        import filelock

        lk = filelock.FileLock(self._p(LOCAL_LOCK))
        try:
            lk.acquire(timeout=max(timeout, 0.0), poll_interval=0.05)
        except filelock.Timeout:
            holder = storage.read_json(self.fs, self._p(LOCK_OWNER))
            raise RegistryLocked(self._locked_message(holder, timeout)) from None
        owner = uuid.uuid4().hex
        storage.write_json(self.fs, self._p(LOCK_OWNER), _owner_info(owner))
        return _LocalLock(self, lk, owner)

    def _acquire_object(self, timeout: float) -> "_ObjectLock":
        """Take the next lock generation once the current one is released or stale (see the module doc)."""
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            gens = call_with_retry(self._lock_generations, f"listing {self._p(LOCKS)}")
            top = gens[-1] if gens else 0
            holder = call_with_retry(lambda: self._read_lock(top), f"reading {self._lock_path(top)}") if top else None
            if self._takeable(holder):
                started = time.monotonic()
                info = {**_owner_info(owner), "gen": top + 1, "stale_after": self.stale_after}
                if self._claim(self._lock_path(top + 1), info):
                    self._drop_locks(gens)
                    return _ObjectLock(self, top + 1, info, started)
                continue                                # another writer took that generation: look again
            if time.monotonic() >= deadline:
                raise RegistryLocked(self._locked_message(holder, timeout))
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0.01)))

    def _lock_path(self, gen: int) -> str:
        return self._p(LOCKS, f"{gen:010d}.json")

    def _lock_generations(self) -> list[int]:
        """The lock generations present on the store, ascending (listed afresh, never from a cache)."""
        return sorted(int(n[:-5]) for n in self._names(self._p(LOCKS)) if re.match(r"^\d+\.json$", n))

    def _read_lock(self, gen: int) -> Optional[dict]:
        """A lock generation's record: None when absent, {} when it is not mmbatch's JSON."""
        try:
            info = json.loads(self.fs.cat_file(self._lock_path(gen)))   # one GET: no cached size
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    def _takeable(self, holder: Optional[dict]) -> bool:
        """Whether the current generation may be followed: none yet, released, or stale (a dead holder's).
        Stale by the holder's own ``stale_after`` (recorded in it), the time it promised to refresh within."""
        if holder is None or holder.get("released"):
            return True
        idle = time.time() - float(holder.get("refreshed", 0) or 0)
        limit = float(holder.get("stale_after") or self.stale_after)
        if idle <= limit:
            return False
        log.warning("breaking a stale registry lock held by %s (not refreshed for %.0f s, stale after %g s)",
                    _describe_holder(holder), idle, limit)
        return True

    def _drop_locks(self, gens: list[int]) -> None:
        """Delete superseded generations (all below the one just taken): no holder can own them any more."""
        for g in gens:
            try:
                self.fs.rm(self._lock_path(g))
            except Exception as e:                      # tidying only: a later holder tries again
                log.debug("could not delete old registry lock generation %s: %s", g, e)

    def _claim(self, path: str, obj: dict) -> bool:
        """Create ``path`` holding ``obj`` if absent; True when it holds ``obj`` afterwards (ours). A retry
        of a create whose reply was lost finds its own object, so it is read back rather than trusted."""
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        try:
            call_with_retry(lambda: self._create_exclusive(path, data), f"creating {path}")
        except FileExistsError:
            pass
        try:
            held = call_with_retry(lambda: self.fs.cat_file(path), f"reading {path}")
        except FileNotFoundError:
            return False
        return held == data

    def _create_exclusive(self, path: str, data: bytes) -> None:
        """Create ``path`` only if absent (FileExistsError otherwise), never visible half-written. Local disk:
        written aside, then hard-linked to its name (``link`` fails if the name exists). Object stores:
        fsspec mode "xb", which s3fs sends as a conditional PUT (``If-None-Match: *``); a store that does not
        honour it (checked once per Registry by :meth:`conditional_writes`) gets a check-then-write and a
        warning saying so."""
        if storage.is_local(self.fs):
            name = f"{uuid.uuid4().hex}.{posixpath.basename(path)}"
            tmp = storage.join(posixpath.dirname(path), storage.TMP_DIR, name)
            os.makedirs(posixpath.dirname(tmp), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            finally:
                os.unlink(tmp)
            return
        if self.conditional_writes():
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return
        if self.fs.exists(path):
            raise FileExistsError(path)
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def conditional_writes(self) -> bool:
        """Whether this store refuses a second exclusive create of one key (put-if-absent), probed once
        with a throw-away object: a store that ignores ``If-None-Match`` would let two writers both
        "create" the lock. Where it cannot, mmbatch warns that it cannot exclude concurrent writers."""
        if self._conditional is None:
            probe = self._p(f"_lock.probe.{uuid.uuid4().hex}")
            try:
                for _ in range(2):
                    with self.fs.open(probe, "xb") as f:
                        f.write(b"probe")
                self._conditional = False                   # the second create went through
            except FileExistsError:
                self._conditional = True
            except (ValueError, NotImplementedError, TypeError):   # the backend rejects mode "xb"
                self._conditional = False
            finally:
                try:
                    self.fs.rm(probe)
                except FileNotFoundError:
                    pass
            if not self._conditional:
                log.warning("registry %s: this store has no conditional write (put-if-absent), so its lock is a "
                            "check-then-write that cannot exclude two writers starting together: run one retrain, "
                            "register, promote or rollback at a time", self.uri)
        return self._conditional

    def _names(self, path: str) -> list[str]:
        """The names directly under ``path`` (a fresh listing: s3fs would answer from its cache)."""
        try:
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False, refresh=True)]
        except FileNotFoundError:
            return []

    def _locked_message(self, holder: Optional[dict], timeout: float) -> str:
        return (f"registry {self.uri} is locked by {_describe_holder(holder)}: another retrain, register, "
                f"promote or rollback is running (waited {timeout:g} s). Try again when it has finished.")


class _LocalLock:
    """The OS file lock on ``<root>/_lock``. The OS keeps it for this process until it is released, so
    no other writer can take it over; the owner file only names the holder to a waiting writer."""

    def __init__(self, reg: Registry, lk, owner: str):
        self.reg, self.lk, self.owner = reg, lk, owner

    def check(self, what: str) -> None:
        """Nothing to check: an OS lock is not broken while its holder lives."""

    def release(self) -> None:
        try:
            self.reg.fs.rm(self.reg._p(LOCK_OWNER))
        except FileNotFoundError:
            pass
        finally:
            self.lk.release()


class _ObjectLock:
    """Lock generation ``gen`` on an object store, held by this process, and its heartbeat thread.

    Only its holder writes a generation's object: refreshing it every ``stale_after / 4`` s, then marking
    it released. A writer breaking a stale lock creates the next generation instead (put-if-absent), so
    nothing is removed or overwritten from under a holder; the holder has lost the lock once a higher
    generation exists, and :meth:`check` (before each write) says so.
    """

    def __init__(self, reg: Registry, gen: int, info: dict, refreshed: float):
        self.reg, self.gen, self.info = reg, gen, info
        self.owner, self.path = info["owner"], reg._lock_path(gen)
        self.interval = max(reg.stale_after / 4.0, 0.05)
        self.refreshed = refreshed          # monotonic time before the last successful write of the object
        self.lost = False
        self._mutex = threading.Lock()      # a late refresh never overwrites the release
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mmbatch-registry-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Refresh every ``interval`` s. A refresh that fails (transient errors are retried with backoff
        first) is logged and tried again at the next beat: only losing the lock ends the heartbeat."""
        while not self._stop.wait(self.interval):
            try:
                call_with_retry(self._refresh, f"refreshing the registry lock {self.path}",
                                backoff_s=self.interval / 8)
            except LockLost as e:
                log.error("%s", e)
                return
            except Exception as e:
                log.warning("registry lock %s: could not refresh it (%s); next try in %.1f s",
                            self.path, e, self.interval)

    def _refresh(self) -> None:
        started = time.monotonic()
        with self._mutex:
            if self._stop.is_set():
                return
            self._verify("refreshing its lock")
            self._write({"refreshed": time.time()})
        self.refreshed = started

    def _write(self, fields: dict) -> None:
        self.reg.fs.pipe_file(self.path, json.dumps({**self.info, **fields}).encode())

    def _verify(self, what: str) -> None:
        """LockLost unless this generation is still the highest one."""
        if not self.lost:
            self.lost = self.reg._lock_generations()[-1:] != [self.gen]
        if self.lost:
            raise LockLost(f"registry {self.reg.uri}: this writer's lock was taken over by another writer (it went "
                           f"more than {self.reg.stale_after:g} s without a refresh: a stall or a lost connection); "
                           f"stopped before {what}. Run it again once the other writer has finished.")

    def check(self, what: str) -> None:
        """Before each write: LockLost if another writer took the lock over, or may do so now (it was not
        refreshed for ``3/4 * stale_after``: the rest is the margin for the write itself)."""
        call_with_retry(lambda: self._verify(what), f"checking the registry lock {self.path}")
        idle = time.monotonic() - self.refreshed
        if idle > 0.75 * self.reg.stale_after:
            raise LockLost(f"registry {self.reg.uri}: this writer could not refresh its lock for {idle:.1f} s, so "
                           f"another writer may take it over (after {self.reg.stale_after:g} s); stopped before "
                           f"{what}. Run it again.")

    def release(self) -> None:
        """Mark this generation released: its own object, and only while it is still the highest."""
        self._stop.set()
        with self._mutex:
            try:
                call_with_retry(lambda: self._verify("releasing it"), f"checking the registry lock {self.path}")
                call_with_retry(lambda: self._write({"released": time.time()}), f"releasing {self.path}")
            except LockLost:
                pass                                    # taken over: the other writer's now
            except Exception as e:
                log.warning("could not release the registry lock %s (%s): the next writer takes it once it "
                            "is %g s old", self.path, e, self.reg.stale_after)
        self._thread.join(timeout=1)


# --- helpers ----------------------------------------------------------------------------
def _user() -> str:
    try:
        import getpass
        return getpass.getuser()
    except Exception:  # pragma: no cover
        return "unknown"


def _workflow_text(workflow: Any) -> tuple[Optional[str], str]:
    if workflow is None:
        return None, ""
    if isinstance(workflow, str):
        try:
            name = (yaml.safe_load(workflow) or {}).get("name", "")
        except (yaml.YAMLError, AttributeError):
            name = ""
        return workflow, str(name or "")
    if hasattr(workflow, "model_dump"):
        from mmbatch.config import dump_workflow
        return dump_workflow(workflow), getattr(workflow, "name", "")
    if isinstance(workflow, dict):
        return yaml.safe_dump(workflow, sort_keys=False), str(workflow.get("name", ""))
    raise TypeError(f"workflow must be a Workflow, a dict or YAML text, got {type(workflow).__name__}")


def _copy_tree(src_fs, src: str, dst_fs, dst: str) -> int:
    """Copy every file under ``src`` to ``dst`` (any filesystems); returns the file count."""
    src = src.rstrip("/")
    n = 0
    for f in sorted(src_fs.find(src)):
        rel = posixpath.relpath(f, src) if not storage.is_local(src_fs) else os.path.relpath(f, src)
        rel = rel.replace(os.sep, "/")
        target = storage.join(dst, rel)
        dst_fs.makedirs(posixpath.dirname(target), exist_ok=True)
        with src_fs.open(f, "rb") as r, dst_fs.open(target, "wb") as w:
            shutil.copyfileobj(r, w, 1 << 20)
        n += 1
    return n


# --- CLI ----------------------------------------------------------------------------------
def _fmt_metric(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def render_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _promoted(mv: ModelVersion) -> str:
    d = mv.extra.get("decision") if isinstance(mv.extra, dict) else None
    if not isinstance(d, dict) or "promote" not in d:
        return "-"
    return "yes" if d["promote"] else "no"


def render_list(reg: Registry) -> str:
    versions = reg.list()
    if not versions:
        return f"registry {reg.uri}: no versions yet"
    champ = (reg.alias(CHAMPION) or {}).get("version")
    rows = []
    for mv in versions:
        rows.append([mv.version + (" *" if mv.version == champ else ""), mv.created.replace("T", " ")[:19],
                     _fmt_metric(mv.metrics.get("accuracy")), _fmt_metric(mv.metrics.get("macro_f1")),
                     mv.fingerprints.get("features", "-"), mv.workflow_name or "-", _promoted(mv)])
    text = render_table(rows, ["VERSION", "CREATED (UTC)", "ACCURACY", "MACRO_F1", "FEATURES", "WORKFLOW",
                               "PROMOTED"])
    return text + f"\n\n* champion: {champ or 'none'}   ({len(versions)} versions in {reg.uri})"


def render_show(reg: Registry, mv: ModelVersion, events: int = 10) -> str:
    champ = (reg.alias(CHAMPION) or {})
    lines = [f"version:   {mv.version}" + ("  (champion)" if champ.get("version") == mv.version else ""),
             f"created:   {mv.created}", f"model:     {mv.model_uri}", f"source:    {mv.source}",
             f"workflow:  {mv.workflow_name or '-'}", f"mmbatch:   {mv.mmbatch_version}"]
    lines.append("metrics:")
    lines += [f"  {k}: {_fmt_metric(v) if isinstance(v, (int, float)) else v}" for k, v in sorted(mv.metrics.items())]
    lines.append("fingerprints:")
    lines += [f"  {k}: {v}" for k, v in sorted(mv.fingerprints.items())]
    if mv.extra:
        lines.append("extra:")
        lines += [f"  {k}: {json.dumps(v, default=str)}" for k, v in sorted(mv.extra.items())]
    hist = [e for e in reg.history() if e.get("version") == mv.version or e.get("previous") == mv.version]
    if hist:
        lines.append("history:")
        lines += [f"  {e['time']}  {e['event']:<8} {e.get('version', '')}"
                  + (f" (was {e['previous']})" if e.get("previous") else "")
                  + (f"  {e['reason']}" if e.get("reason") else "") for e in hist[-events:]]
    return "\n".join(lines)


def registry_cli(action: str, uri: str, version: Optional[str] = None,
                 lock_timeout: Optional[float] = None) -> int:
    """``mmbatch registry list|show|promote|rollback``; prints tables, returns the exit code.

    promote/rollback wait up to ``lock_timeout`` seconds for the lock (default
    ``$MMBATCH_REGISTRY_LOCK_TIMEOUT`` or 10).
    """
    if lock_timeout is None:
        lock_timeout = float(os.environ.get("MMBATCH_REGISTRY_LOCK_TIMEOUT", "10"))
    reg = Registry(uri, lock_timeout=lock_timeout)
    if not reg.exists():
        raise UsageError(f"no registry at {uri} (it is created by `mmbatch retrain` or Registry.register)")
    if action == "list":
        print(render_list(reg))
    elif action == "show":
        mv = reg.get(version or CHAMPION)
        print(render_show(reg, mv))
    elif action == "promote":
        if not version:
            raise UsageError("promote needs a version, e.g. mmbatch registry promote out/registry v0003")
        before = (reg.alias(CHAMPION) or {}).get("version")
        v = reg.promote(version, reason="manual promote")
        print(f"champion: {v}" + (f" (was {before})" if before and before != v else
                                  " (unchanged)" if before == v else ""))
    elif action == "rollback":
        before = (reg.alias(CHAMPION) or {}).get("version")
        v = reg.rollback(reason="manual rollback")
        print(f"champion: {v} (rolled back from {before})")
    else:
        raise UsageError(f"unknown registry action {action!r}")
    return 0
