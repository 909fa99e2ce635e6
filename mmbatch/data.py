"""mmbatch for Ray Data users: mmbatch's outputs as ``ray.data.Dataset``, its extractors as callable classes.

    import ray
    from mmbatch.data import Embed, read_canonical, read_fused

    # after `mmbatch demo --out out`: its ingest output and its preprocess output, with its image features
    ds = read_canonical("out/canonical/imagenet").map_batches(
        Embed, fn_constructor_args=("image", {"image": {"extractor": "hog", "size": 64}}),
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1))     # adds image_emb, image_error
    fused = read_fused("out/features")                                          # image_emb is the same there

:class:`Embed` gives the embeddings that ``mmbatch preprocess`` gives for the same rows and the same
``features`` settings (the demo's: ``image: {extractor: hog, size: 64}``, ``batch_size: 64``): the same
extractor, in chunks of the same ``features.batch_size`` rows (a model's float results depend on the
batch it ran in). A row that cannot be decoded keeps a null embedding and its
reason in ``<modality>_error`` (preprocess quarantines such rows).

On a small machine leave a CPU free for Ray Data's read tasks: Embed actors holding every CPU starve
them (the job waits for ever).

The readers start Ray when it is not running (:func:`mmbatch.engine.runtime.ensure_ray`) so that its workers
import this package even when the current folder holds a folder named ``mmbatch`` (the folder above a
clone). If you call ``ray.init()`` yourself, pass ``job_config=mmbatch.engine.runtime.worker_path_job_config()``.

Both readers read the files the output's ``_manifest.json`` lists: an output without one is incomplete
(a job still running or killed) and is refused unless ``allow_incomplete=True``, which reads the files
committed on disk (mmbatch.engine.manifest.data_files).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa

from mmbatch.errors import UsageError
from mmbatch.engine.manifest import Manifest, data_files
from mmbatch.schema import emb_column


def _files(path: str, allow_incomplete: bool) -> tuple[Any, list[str], Optional[Manifest]]:
    """(filesystem, data files, manifest or None) of an mmbatch output folder (mmbatch.engine.manifest.data_files)."""
    fs, files, manifest = data_files(path, allow_incomplete)
    if not files:
        raise UsageError(f"{path}: no Parquet files")
    return fs, files, manifest


def read_canonical(path: str, *, columns: Optional[list[str]] = None, allow_incomplete: bool = False, **kwargs):
    """What ``mmbatch ingest`` wrote (canonical rows: sample_id, image, audio, text, label, ...) as a
    Dataset; ``kwargs`` go to ``ray.data.read_parquet``."""
    fs, files, _ = _files(path, allow_incomplete)
    return _read(files, fs, columns, kwargs)


def _read(files: list[str], fs, columns: Optional[list[str]], kwargs: dict):
    import ray

    from mmbatch.engine.runtime import ensure_ray
    ensure_ray()                 # before Ray Data starts it: workers must import this package, not a cwd folder
    ds = ray.data.read_parquet(files, filesystem=fs, **kwargs)
    return ds.select_columns(columns) if columns else ds


def read_fused(path: str, *, columns: Optional[list[str]] = None, allow_incomplete: bool = False, **kwargs):
    """What ``mmbatch preprocess`` wrote (per-modality embeddings, presence flags, ``fused``) as a Dataset.

    Checked first as ``mmbatch train`` checks it (:func:`mmbatch.engine.provenance.check_fused`): the manifest
    lists exactly the files present and every file was made with the manifest's settings; else a
    UsageError names the files that disagree and how. ``allow_incomplete=True`` reads what is committed."""
    from mmbatch.engine.provenance import check_fused_uri

    fs, files, manifest = _files(path, allow_incomplete)
    if manifest is not None and manifest.kind != "fused":
        raise UsageError(f"{path}: not a fused output (manifest kind {manifest.kind!r}); "
                         "use read_canonical for what `mmbatch ingest` wrote")
    check_fused_uri(path, allow_incomplete=allow_incomplete)
    return _read(files, fs, columns, kwargs)


class Embed:
    """A callable class for ``ds.map_batches(Embed, fn_constructor_args=(modality, features),
    batch_format="pyarrow")``: adds ``<modality>_emb`` (null where the row has no such value or it cannot
    be decoded) and ``<modality>_error`` (the reason, else null).

    ``features`` is the workflow's ``features:`` mapping (default settings when omitted). A model
    extractor runs on the GPU when the worker has one (``num_gpus=`` in map_batches), else on the CPU.
    """

    def __init__(self, modality: str, features: Optional[dict] = None):
        from mmbatch.config import FeaturesConfig
        from mmbatch.preprocess.unit import extractor

        cfg = FeaturesConfig.model_validate(features or {})
        self.modality, self.batch_size = modality, cfg.batch_size
        self.extractor = extractor(modality, getattr(cfg, modality).model_dump(mode="json"))
        if self.extractor.needs_model:
            import torch
            self.extractor = self.extractor.to("cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mmbatch.preprocess.fusion import embeddings_to_arrow
        from mmbatch.preprocess.unit import raw_items

        items, _ = raw_items(batch, self.modality)
        emb = np.zeros((batch.num_rows, self.extractor.dim), np.float32)
        ok = np.fromiter((x is not None and len(x) > 0 for x in items), bool, count=batch.num_rows)
        errors: list[Optional[str]] = [None] * batch.num_rows
        idx = np.flatnonzero(ok)
        for start in range(0, len(idx), self.batch_size):          # the chunks preprocess uses
            part = idx[start:start + self.batch_size]
            emb[part], errs = self.extractor.extract([items[i] for i in part])
            for i, err in zip(part, errs):
                if err is not None:
                    ok[i], errors[i] = False, err[0]
        return (batch.append_column(emb_column(self.modality), embeddings_to_arrow(emb, ok))
                .append_column(f"{self.modality}_error", pa.array(errors, pa.string())))
