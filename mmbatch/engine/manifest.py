"""The manifest of an mmbatch output folder, and the one way to list the folder's data files.

``<folder>/_manifest.json`` is written last: its presence means "complete" (mmbatch.engine.storage). Ingest
writes one into a canonical folder, preprocess into a fused folder, in one format:

- ``stage``: ``"ingest"`` or ``"preprocess"``;
- ``kind``: for ingest the corpus kind (``imagenet``, ``librispeech``, ``timit``, ``hf``, ``manifest``),
  for preprocess ``"fused"``;
- ``files``: the data files, relative to the folder (``part-00000.parquet``); never ``quarantine/``
  files (those are ``quarantine_files``) nor a fused output's partner features under ``_features/``;
- ``counts``: ``split``, ``label`` and ``quarantine_reasons`` (value -> rows), plus per stage: ingest
  adds the ``skipped_*`` numbers of its source, preprocess adds ``presence`` (modality -> rows);
- ``metadata``: preprocess: the mmbatch metadata of the fused files (less ``schema_version``); ingest: {};
- every other key as the stage wrote it (ingest: ``input``, ``options``, ``info``, ``ingested``, ...;
  preprocess: ``rows``, ``unit_fingerprints``, ``leakage``, ...), in :attr:`Manifest.extra`.

Older manifests are read too: ingest wrote ``counts.splits`` / ``counts.labels``; preprocess wrote
``counts.split`` / ``counts.label``, a top-level ``quarantine_reasons`` and no ``stage``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mmbatch.engine import storage
from mmbatch.errors import UsageError

NAME = storage.MANIFEST
STAGES = ("ingest", "preprocess")


@dataclass
class Manifest:
    """One output folder's manifest (the module docstring describes the format)."""

    stage: str                              # "ingest" or "preprocess"
    kind: str                               # ingest: the corpus kind; preprocess: "fused"
    files: Optional[list[str]]              # data files, relative; None where a hand-written manifest names none
    counts: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """A manifest from its JSON object, in the current format or an older one."""
        d = dict(d)
        counts = dict(d.pop("counts", None) or {})
        for old, new in (("splits", "split"), ("labels", "label")):        # ingest's older spelling
            if old in counts:
                counts[new] = counts.pop(old)
        if "quarantine_reasons" in d:                                       # preprocess's older place
            counts.setdefault("quarantine_reasons", d.pop("quarantine_reasons"))
        kind = d.pop("kind", "") or ""
        stage = d.pop("stage", None) or ("preprocess" if kind == "fused" else "ingest")
        files = d.pop("files", None)
        return cls(stage=stage, kind=kind, files=list(files) if files is not None else None, counts=counts,
                   metadata=dict(d.pop("metadata", None) or {}), extra=d)

    def to_dict(self) -> dict:
        """The JSON object :meth:`write` writes."""
        out = {**self.extra, "stage": self.stage, "kind": self.kind, "counts": self.counts, "metadata": self.metadata}
        if self.files is not None:
            out["files"] = self.files
        return out

    def get(self, key: str, default: Any = None) -> Any:
        """The value of any key of :meth:`to_dict` (``leakage``, ``unit_fingerprints``, ``info``, ...)."""
        return self.to_dict().get(key, default)

    @classmethod
    def read(cls, uri: str) -> Optional["Manifest"]:
        """The manifest of the folder ``uri`` (local path or fsspec URI), or None where it has none."""
        return cls.read_at(*storage.url_to_fs(uri))

    @classmethod
    def read_at(cls, fs, root: str) -> Optional["Manifest"]:
        """The manifest of the folder ``root`` of ``fs``, or None where it has none (or not a JSON object)."""
        got = storage.read_json(fs, storage.join(root, NAME))
        return cls.from_dict(got) if isinstance(got, dict) else None

    def write(self, fs, root: str) -> None:
        """Write ``<root>/_manifest.json`` (atomically: readers see the old one, none, or this one)."""
        if self.stage not in STAGES:
            raise ValueError(f"manifest stage must be one of {STAGES}, got {self.stage!r}")
        storage.write_json(fs, storage.join(root, NAME), self.to_dict())

    def paths(self, fs, root: str) -> list[str]:
        """The data files this manifest names, as paths of ``fs`` under ``root``; where it names none (a
        manifest written by hand), the committed files on disk."""
        if self.files is None:
            return storage.list_parquet(fs, root)
        return [storage.join(root, f) for f in self.files]


def data_files(uri: str, allow_incomplete: bool = False) -> tuple[Any, list[str], Optional[Manifest]]:
    """(filesystem, data file paths, manifest or None) of an mmbatch output folder or a single Parquet file.

    A folder's data files are the ones its manifest names (:meth:`Manifest.paths`). A folder without a
    manifest is incomplete (a job still running or stopped): a UsageError, unless ``allow_incomplete``,
    where the files are the committed ones on disk (``*.parquet`` directly under the folder, no
    ``_``/``.`` names, so never ``quarantine/`` nor ``_features/``), whatever a manifest says. A single
    file is its own data file. The list may be empty: each caller says what it expected."""
    fs, root = storage.url_to_fs(uri)
    if fs.isfile(root):
        return fs, [root], None
    manifest = Manifest.read_at(fs, root)
    if allow_incomplete:
        return fs, storage.list_parquet(fs, root), manifest
    if manifest is None:
        raise UsageError(f"{uri}: no {NAME}, the output is incomplete (a job still running or stopped); rerun "
                         "the command that writes it, or allow an incomplete output (--allow-incomplete, "
                         "allow_incomplete=True)")
    return fs, manifest.paths(fs, root), manifest
