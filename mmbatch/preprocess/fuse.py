"""Pairing without the driver holding embeddings, and the fused table of one unit (pure).

Pairing (``pairing.by``), how samples of different corpora become one multimodal sample:

- ``key``: exact match on a key column (default ``sample_id``).
- ``label``: the AV-MNIST construction -- every primary row gets, from each
  partner dataset, a row with the same label (and the same normalised split
  when the partner has rows of that split). The choice is a hash of
  (seed, partner dataset, primary sample_id) over the candidates in sample_id
  order, so it is reproducible for a given seed, independent of row order and
  of how the work is parallelised.

It is decided on light columns:
the driver reads ``sample_id``/``label``/``split`` (and the key) of a partner
dataset's committed feature files into a :class:`PartnerIndex` (a few bytes
per partner row: positions, never embeddings), which travels to the workers
once. Each worker picks its rows' partners from the index
(:meth:`PartnerIndex.choose`)
and reads the partner embeddings it needs from the partner files
(:class:`PartnerRows`, a bounded per-worker cache), so driver memory does not
grow with the partner's embeddings.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmbatch.engine import storage
from mmbatch.preprocess.fusion import embeddings_to_arrow, embeddings_to_numpy, fuse, stable_u64
from mmbatch.preprocess.features.sequence import columns_in_schema, row_arrays
from mmbatch.schema import MODALITIES, emb_column, has_column, normalize_split, seq_column

PARTNER_CACHE_BYTES = 256 * 2**20      # partner feature files kept per worker


@dataclass
class PartnerIndex:
    """Where every partner row lives (file, row) and how primary rows choose theirs."""
    name: str
    modalities: list[str]
    files: list[str]                 # partner feature files (paths in the output filesystem)
    file_of: np.ndarray              # int32 [n]: position -> file index, positions in sample_id order
    row_of: np.ndarray               # int32 [n]: position -> row within its file
    by: str                          # "label" | "key"
    groups: dict                     # label pairing: (label, split) -> positions; label -> positions
    keys: dict                       # key pairing: key value -> position
    fingerprint: str = ""            # of the partner units it indexes (part of the primary units' fingerprint)
    sequences: tuple = ()            # modalities stored as sequence features (mmbatch.preprocess.features.sequence)

    @classmethod
    def build(cls, fs, name: str, modalities: list[str], files: list[str], by: str, key: str) -> "PartnerIndex":
        cols = ["sample_id", "label", "split"] + ([key] if by == "key" and key not in ("sample_id",) else [])
        ids, labels, splits, keyvals, file_of, row_of = [], [], [], [], [], []
        for i, f in enumerate(files):
            t = pq.read_table(f, columns=list(dict.fromkeys(cols)), filesystem=storage.arrow_fs(fs))
            ids += t.column("sample_id").to_pylist()
            labels += t.column("label").to_pylist()
            splits += t.column("split").to_pylist()
            if by == "key":
                keyvals += t.column(key).to_pylist()
            file_of.append(np.full(t.num_rows, i, np.int32))
            row_of.append(np.arange(t.num_rows, dtype=np.int32))
        order = np.argsort(np.asarray(ids, dtype=object), kind="stable")      # independent of file order
        fo = np.concatenate(file_of)[order] if file_of else np.zeros(0, np.int32)
        ro = np.concatenate(row_of)[order] if row_of else np.zeros(0, np.int32)
        groups: dict = {}
        keys: dict = {}
        if by == "label":
            lists: dict = {}
            for pos, i in enumerate(order):
                lab = labels[i]
                if lab is None:
                    continue
                lists.setdefault((lab, normalize_split(splits[i])), []).append(pos)
                lists.setdefault(lab, []).append(pos)
            groups = {k: np.asarray(v, np.int64) for k, v in lists.items()}
        else:
            for pos, i in enumerate(order):
                keys.setdefault(keyvals[i], pos)
        names = pq.read_schema(files[0], filesystem=storage.arrow_fs(fs)).names if files else []
        seqs = tuple(m for m in modalities if emb_column(m) not in names and seq_column(m) in names)
        return cls(name, modalities, files, fo, ro, by, groups, keys, sequences=seqs)

    def choose(self, sample_ids: list, labels: list, splits: list, keys: list | None, seed: int) -> np.ndarray:
        """Partner position per primary row (-1: no partner)."""
        out = np.full(len(sample_ids), -1, np.int64)
        if self.by == "key":
            for i, k in enumerate(keys or []):
                out[i] = self.keys.get(k, -1)
            return out
        for i, (sid, lab, sp) in enumerate(zip(sample_ids, labels, splits)):
            if lab is None:
                continue
            cands = self.groups.get((lab, normalize_split(sp)))
            if cands is None:
                cands = self.groups.get(lab)
            if cands is not None and len(cands):
                out[i] = cands[stable_u64("pair", seed, self.name, sid) % len(cands)]
        return out


class PartnerRows:
    """Reads partner rows (embeddings, presence, sample_id) by position, file by file,
    keeping recently used partner files up to a byte budget."""

    def __init__(self, fs, budget: int = PARTNER_CACHE_BYTES):
        self.fs, self.budget = fs, budget
        self.cache: OrderedDict[str, pa.Table] = OrderedDict()

    def _table(self, path: str, columns: list[str]) -> pa.Table:
        t = self.cache.pop(path, None)
        if t is None:
            t = pq.read_table(path, columns=columns, filesystem=storage.arrow_fs(self.fs))
        self.cache[path] = t
        while len(self.cache) > 1 and sum(x.nbytes for x in self.cache.values()) > self.budget:
            self.cache.popitem(last=False)
        return t

    def take(self, index: PartnerIndex, positions: np.ndarray, dims: dict) -> tuple[dict, dict, list]:
        """(embeddings [n, dim] per partner modality, presence per modality, partner sample_id per row)."""
        n = len(positions)
        mods = [m for m in index.modalities if m in dims]
        embs = {m: np.full(n, None, object) if m in index.sequences else np.zeros((n, dims[m]), np.float32)
                for m in mods}
        present = {m: np.zeros(n, bool) for m in mods}
        ids: list = [None] * n
        ok = np.flatnonzero(positions >= 0)
        if not len(ok):
            return embs, present, ids
        files = index.file_of[positions[ok]]
        rows = index.row_of[positions[ok]]
        columns = ["sample_id"] + [c for m in mods for c in (
            seq_column(m) if m in index.sequences else emb_column(m), has_column(m))]
        for fi in np.unique(files):
            sel = files == fi
            t = self._table(index.files[int(fi)], columns).take(pa.array(rows[sel]))
            dest = ok[sel]
            got = t.column("sample_id").to_pylist()
            for j, d in enumerate(dest):
                ids[d] = got[j]
            for m in mods:
                if m in index.sequences:
                    embs[m][dest] = row_arrays(t.column(seq_column(m)))
                else:
                    embs[m][dest] = embeddings_to_numpy(t.column(emb_column(m)), dims[m])
                present[m][dest] = np.asarray(t.column(has_column(m)).to_numpy(zero_copy_only=False), bool)
        return embs, present, ids


def fused_table(meta: dict[str, pa.Array], embs: dict, present: dict, dims: dict, fusion: dict,
                schema: pa.Schema, paired_with: dict | None = None) -> pa.Table:
    """The fused rows of one unit: meta columns, each modality's embedding (null where absent),
    presence masks, the ``fused`` vector and, with pairing, ``paired_with``."""
    n = len(meta["sample_id"])
    mods = [m for m in MODALITIES if m in dims]
    full_present = {m: present.get(m, np.zeros(n, bool)) for m in mods}
    seqs = [m for m in mods if emb_column(m) not in schema.names]       # sequence features (no `fused`)
    cols = dict(meta)
    for m in mods:
        e = embs.get(m)
        if m in seqs:
            cols.update(columns_in_schema(m, e if e is not None else np.full(n, None, object), full_present[m],
                                          schema))
            continue
        cols[emb_column(m)] = embeddings_to_arrow(e if e is not None else np.zeros((n, dims[m]), np.float32),
                                                  full_present[m])
    for m in mods:
        cols[has_column(m)] = pa.array(full_present[m])
    if not seqs:
        cols["fused"] = embeddings_to_arrow(fuse(embs, full_present, dims, fusion["method"], fusion["dim"],
                                                 fusion["weights"], fusion["seed"]))
    if paired_with is not None:
        cols["paired_with"] = pa.array([json.dumps({k: v[i] for k, v in paired_with.items()}) for i in range(n)],
                                       pa.string())
    return pa.table(cols, schema=schema)
