"""Ray Data stages of ``mmbatch preprocess`` (batch in, batch out; no driver logic).

- :class:`ExtractUnits` (actor pool, one per CPU): when no extractor needs a model
  (hog_color, logmel_stats, hashing), the whole job is this one stage: it reads a
  work unit (a row group), decodes + embeds it (:func:`decode_batch`) and stages it
  (:func:`write_pieces`).
- :func:`decode_batch` (CPU tasks, when a model stage follows): decodes every
  modality; model-free extractors run to completion here. Model extractors only
  decode here; their compact decoded values travel to ...
- :class:`EncodeStage` (actor pool, GPU when placed on one): loads the model
  once per actor and embeds the decoded values.
- :func:`write_pieces` (tasks): writes each batch's rows as staged Parquet
  pieces per input shard and returns one summary row per piece; the driver
  commits a shard once all its rows are accounted for.

Per-stage busy time is carried in ``_t_<stage>`` columns (seconds per row) so
the driver can print a per-stage table and name the bottleneck.
"""
from __future__ import annotations

import io
import os
import signal
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbatch import storage
from mmbatch.fusion import embeddings_to_arrow
from mmbatch.schema import MODALITIES, QUARANTINE, emb_column, has_column

SHARD_COL = "_shard"
ERR_COL = "_err"
META_COLS = ["sample_id", "source", "split", "label", "label_name"]

_EXTRACTORS: dict[str, Any] = {}


def get_extractor(modality: str, cfg: dict):
    """One extractor per (modality, config) per worker process."""
    key = storage.fingerprint([modality, cfg])
    ex = _EXTRACTORS.get(key)
    if ex is None:
        from mmbatch import config as C
        from mmbatch.features.registry import build_extractor
        from mmbatch.runtime import pin_threads

        pin_threads()
        model = {"image": C.ImageFeatures, "audio": C.AudioFeatures, "text": C.TextFeatures}[modality]
        ex = _EXTRACTORS[key] = build_extractor(modality, model.model_validate(cfg))
    return ex


# --- the source: one task per (input shard, row group) ------------------------------
def row_group_sizes(fs, path: str) -> list[int]:
    """Rows per row group of one Parquet file (its footer only)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path, filesystem=fs).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def work_units(row_groups: dict[str, list[int]]) -> list[dict]:
    """One work unit per row group of every input shard (``path -> rows per row group``,
    see :func:`row_group_sizes`), largest first.

    Row groups, not files, are the unit of work so that tasks are short (a few
    seconds) and the last task of a job does not keep one core busy while the
    others idle; largest first so that the short ones fill the gaps at the end.
    """
    units = [{"path": f, "row_group": i, "rows": n} for f, sizes in row_groups.items() for i, n in enumerate(sizes)]
    return sorted(units, key=lambda u: -u["rows"])


def read_units(batch: pa.Table, dataset_uri: str, columns: list[str]) -> pa.Table:
    """Read the row groups named by ``batch`` (columns ``path``, ``row_group``) inside the task.

    Raw media bytes go straight from storage into the decoding process: no object-store copy.
    """
    import pyarrow.parquet as pq

    fs, _ = storage.url_to_fs(dataset_uri)
    parts = []
    for path, rg in zip(batch.column("path").to_pylist(), batch.column("row_group").to_pylist()):
        t = pq.ParquetFile(path, filesystem=storage.arrow_fs(fs)).read_row_group(rg, columns=columns)
        parts.append(t.append_column("path", pa.array([path] * t.num_rows, pa.string())))
    return pa.concat_tables(parts)


def read_and_decode(batch: pa.Table, dataset_uri: str, columns: list[str], batch_size: int, specs: dict,
                    modalities: list[str], label_map: dict | None = None):
    """:func:`read_units` then :func:`decode_batch` in slices of ``batch_size`` rows, in one task.

    One function rather than two fused Ray Data stages: Ray Data bundles a fused stage's
    input up to the largest batch size of the fusion, which would put every row group
    of the job into one task.
    """
    table = read_units(batch, dataset_uri, columns)
    for start in range(0, table.num_rows, batch_size):
        yield decode_batch(table.slice(start, batch_size), specs, modalities, label_map)


class ExtractUnits:
    """Read, decode + embed and stage one work unit, as a long-lived actor (one per CPU).

    The whole CPU path of a run whose extractors need no model, in one Ray Data stage.
    Actors rather than tasks: Ray Data queues each actor's next unit while it works on the
    current one, where a task pool leaves a worker idle ~0.15 s between tasks (completion
    poll + new lease), ~5-9 % of a CPU-bound job made of ~2 s tasks.
    """

    def __init__(self, read: dict, decode: dict, write: dict, batch_size: int):
        self.read, self.decode, self.write, self.batch_size = read, decode, write, batch_size
        self.calls = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        _maybe_fault(self.calls)
        parts = read_and_decode(batch, batch_size=self.batch_size, **self.read, **self.decode)
        return write_pieces(pa.concat_tables(list(parts)), **self.write)


# --- packing decoded values between stages ------------------------------------------
def pack_value(v: Any) -> bytes:
    if isinstance(v, str):
        return b"s" + v.encode("utf-8")
    buf = io.BytesIO()
    np.save(buf, np.asarray(v), allow_pickle=False)
    return b"n" + buf.getvalue()


def unpack_value(b: bytes) -> Any:
    if b[:1] == b"s":
        return b[1:].decode("utf-8")
    return np.load(io.BytesIO(b[1:]), allow_pickle=False)


def _raw_items(batch: pa.Table, modality: str) -> list:
    if modality not in batch.column_names:
        return [None] * batch.num_rows
    col = batch.column(modality).combine_chunks()
    if modality == "text":
        return col.to_pylist()
    return col.field("bytes").to_pylist()


def _present(items: list) -> np.ndarray:
    return np.array([x is not None and len(x) > 0 for x in items], dtype=bool)


def _add_error(errors: list, i: int, modality: str, err) -> None:
    if errors[i] is None:
        errors[i] = f"{modality}:{err[0]}\t{err[1]}"


def decode_batch(batch: pa.Table, specs: dict, modalities: list[str], label_map: dict | None = None) -> pa.Table:
    """Decode (and, for model-free extractors, embed) every requested modality."""
    t0 = time.perf_counter()
    n = batch.num_rows
    out: dict[str, Any] = {SHARD_COL: batch.column("path")}
    for c in META_COLS:
        out[c] = batch.column(c)
    if label_map:
        keys = batch.column(label_map["column"]).to_pylist()
        mapping = label_map["mapping"]
        out["label"] = pa.array([mapping.get(str(k)) if k is not None else None for k in keys], pa.int64())
        out["label_name"] = pa.array([str(k) if k is not None else None for k in keys], pa.string())
    errors: list = [None] * n
    for m in modalities:
        ex = get_extractor(m, specs[m])
        items = _raw_items(batch, m)
        present = _present(items)
        idx = np.flatnonzero(present)
        dec = ex.decode([items[i] for i in idx])
        for j, err in enumerate(dec.errors):
            if err is not None:
                _add_error(errors, int(idx[j]), m, err)
        ok_local = [j for j, e in enumerate(dec.errors) if e is None]
        if ex.needs_model:
            packed: list = [None] * n
            for j in ok_local:
                packed[int(idx[j])] = pack_value(dec.values[j])
            out[f"_dec_{m}"] = pa.array(packed, pa.binary())
        else:
            emb = np.zeros((n, ex.dim), np.float32)
            if ok_local:
                emb[idx[ok_local]] = ex.encode([dec.values[j] for j in ok_local])
            out[emb_column(m)] = embeddings_to_arrow(emb, present)
        out[has_column(m)] = pa.array(present)
        out[f"_path_{m}"] = (batch.column(m).combine_chunks().field("path")
                             if m in ("image", "audio") and m in batch.column_names else pa.nulls(n, pa.string()))
    out[ERR_COL] = pa.array(errors, pa.string())
    out["_t_decode"] = pa.array(np.full(n, (time.perf_counter() - t0) / max(n, 1)))
    return pa.table(out)


class EncodeStage:
    """Actor: loads one model extractor once, embeds decoded values (GPU when placed on one)."""

    def __init__(self, modality: str, spec: dict, precision: str = "fp32"):
        import torch

        self.modality = modality
        self.extractor = get_extractor(modality, spec)
        # Placement: Ray sets CUDA_VISIBLE_DEVICES for actors given num_gpus; when the
        # cluster only *advertises* GPUs (or CUDA is missing) fall back to the CPU.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.extractor = self.extractor.to(self.device)
        self.calls = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        _maybe_fault(self.calls)
        t0 = time.perf_counter()
        m, n = self.modality, batch.num_rows
        col = f"_dec_{m}"
        packed = batch.column(col).to_pylist()
        idx = [i for i, b in enumerate(packed) if b is not None]
        emb = np.zeros((n, self.extractor.dim), np.float32)
        if idx:
            emb[idx] = self.extractor.encode([unpack_value(packed[i]) for i in idx])
        present = np.asarray(batch.column(has_column(m)).to_numpy(zero_copy_only=False), dtype=bool)
        batch = batch.drop_columns([col])
        batch = batch.append_column(emb_column(m), embeddings_to_arrow(emb, present))
        batch = batch.append_column(f"_dev_{m}", pa.array([self.device] * n))
        return batch.append_column(f"_t_{m}", pa.array(np.full(n, (time.perf_counter() - t0) / max(n, 1))))


# --- TEST-ONLY fault hook (tests/test_reliability.py): EncodeStage and ExtractUnits actors; inert
# unless the variable is set ----------
FAULT_ENV = "MMBATCH_TEST_KILL_ACTOR"   # "<flag file>" holding N: SIGKILL the actor at its N-th call, once


def _maybe_fault(calls: int) -> None:
    flag = os.environ.get(FAULT_ENV)
    if not flag:
        return
    try:
        with open(flag) as f:
            n = int(f.read().strip() or 1)
        if calls < n:
            return
        os.remove(flag)                  # first, so the restarted actor proceeds
    except (OSError, ValueError):
        return
    os.kill(os.getpid(), signal.SIGKILL)


def write_pieces(batch: pa.Table, staging: str, modalities: list[str], source_name: str) -> pa.Table:
    """Write this batch's rows as staged pieces per shard; return one summary row per shard."""
    t0 = time.perf_counter()
    fs, root = storage.url_to_fs(staging)
    timing = [c for c in batch.column_names if c.startswith("_t_")]
    devices = [c for c in batch.column_names if c.startswith("_dev_")]
    keep = META_COLS + [c for m in modalities for c in (emb_column(m), has_column(m))]
    rows = []
    shards = pc.unique(batch.column(SHARD_COL)).to_pylist()
    for shard in shards:
        part = batch.filter(pc.equal(batch.column(SHARD_COL), shard))
        bad = part.column(ERR_COL).is_valid()
        good, quar = part.filter(pc.invert(bad)), part.filter(bad)
        sid = shard_id(shard)
        piece = storage.join(root, sid, f"{uuid.uuid4().hex}.parquet")
        storage.atomic_write_table(fs, piece, good.select(keep))
        qpiece = None
        if quar.num_rows:
            qpiece = storage.join(root, sid, f"{uuid.uuid4().hex}.q.parquet")
            storage.atomic_write_table(fs, qpiece, _quarantine_rows(quar, modalities, source_name))
        row = {"shard": shard, "piece": piece, "qpiece": qpiece, "rows": good.num_rows,
               "quarantined": quar.num_rows}
        for c in timing:
            row[c] = float(pc.sum(part.column(c)).as_py() or 0.0)
        for c in devices:
            row[c] = ",".join(sorted(set(part.column(c).to_pylist())))
        row["_t_write"] = (time.perf_counter() - t0) * part.num_rows / max(batch.num_rows, 1)
        rows.append(row)
    return pa.Table.from_pylist(rows)


def _quarantine_rows(quar: pa.Table, modalities: list[str], source_name: str) -> pa.Table:
    errs = quar.column(ERR_COL).to_pylist()
    reasons, details, paths = [], [], []
    for i, e in enumerate(errs):
        head, _, detail = e.partition("\t")
        modality = head.split(":", 1)[0]
        reasons.append(head)
        details.append(detail)
        pcol = f"_path_{modality}"
        paths.append(quar.column(pcol)[i].as_py() if pcol in quar.column_names else None)
    return pa.table({
        "path": pa.array(paths, pa.string()), "sample_id": quar.column("sample_id"),
        "source": pa.array([source_name] * quar.num_rows, pa.string()),
        "stage": pa.array(["preprocess"] * quar.num_rows, pa.string()),
        "reason": pa.array(reasons, pa.string()), "detail": pa.array(details, pa.string()),
    }, schema=QUARANTINE)


def shard_id(shard_path: str) -> str:
    base = shard_path.rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(".parquet")] if base.endswith(".parquet") else base


__all__ = ["decode_batch", "EncodeStage", "write_pieces", "MODALITIES"]
