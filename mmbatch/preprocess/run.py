"""`mmbatch preprocess`, the driver: plan, hand units to workers, commit their records, write the manifest.

The driver reads no media and no embeddings, only light columns a plan needs: the
label column for a label map (plan.py), the train split's texts for a tokens
vocabulary (mmbatch.preprocess.features.sequence), sample ids for dedup leakage
(mmbatch.dedup.leakage) and partners' light columns for pairing. Per dataset it plans units (row groups of
the canonical shards, plan.py), skips those committed with the same
fingerprint, removes a killed run's leftovers, and runs the rest on a pool of
actors (mmbatch.engine.units, a Ray Data job) that read, extract, fuse and write each unit's final
file (unit.py). Each unit comes back as a PreprocessRecord (a CommitRecord with where it ran); the
driver commits it through a UnitSink (mmbatch.engine.commit: its marker) and, at the end, writes
``_manifest.json`` from the records.

With pairing, partner datasets run first and write their features to
``OUT/_features/<dataset>/``; the driver then indexes their light columns
(fuse.PartnerIndex) and the primary dataset's units pair, fuse and write in
one pass. A run with nothing to do does not start Ray.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa

from mmbatch import __version__
from mmbatch.engine import ownership, storage
from mmbatch.engine.progress import bar as progress_bar
from mmbatch.engine.commit import UnitSink
from mmbatch.config import Workflow
from mmbatch.errors import UsageError
from mmbatch.preprocess.fuse import PartnerIndex
from mmbatch.preprocess.plan import FEATURES_DIR, META_COLS, DatasetPlan, feature_specs, plan_dataset, present_splits
from mmbatch.preprocess.summary import PreprocessSummary, render_summary, write_manifest
from mmbatch.preprocess.unit import (FusedUnitJob, PartnerFeaturesJob, PreprocessRecord, UnitJob, extractor,
                                     make_decoder, make_embedder, make_worker)
from mmbatch.engine.provenance import weights_digests
from mmbatch.schema import MODALITIES, embedding_type, emb_column, fused_schema, has_column, with_metadata

if TYPE_CHECKING:
    from mmbatch.engine.units import Resources, Step

log = logging.getLogger("mmbatch.preprocess")

# CPUs of a split shape's GPU actor in the Ray scheduler's count (it uses a little CPU to feed its GPU,
# fuse and write). 0: a GPU actor must never wait for a CPU that the decode workers hold, which would
# hang the job; asking none, it fits on every GPU node however many decode workers run there.
EMBED_CPUS = 0.0


def _roles(wf: Workflow, plans: list[DatasetPlan]) -> tuple[list[DatasetPlan], list[DatasetPlan]]:
    """(primaries: their rows are the fused samples, partners: their embeddings are attached)."""
    by = wf.pairing.by
    if by == "none":
        return plans, []
    if len(plans) < 2:
        raise UsageError(f"pairing.by={by!r} needs at least two datasets; got {len(plans)}")
    primary = wf.pairing.primary or plans[0].cfg.name
    names = [p.cfg.name for p in plans]
    if primary not in names:
        raise UsageError(f"pairing.primary={primary!r} is not a dataset name; allowed: {names}")
    return [p for p in plans if p.cfg.name == primary], [p for p in plans if p.cfg.name != primary]


def _features_schema(dims: dict, modalities: list[str], sequences: dict | None = None) -> pa.Schema:
    base = fused_schema({}, 0)
    fields = [base.field(c) for c in META_COLS]
    fields += [f for m in modalities for f in (sequences or {}).get(m, [pa.field(emb_column(m), embedding_type(dims[m]))])]
    fields += [pa.field(has_column(m), pa.bool_()) for m in modalities]
    return pa.schema(fields)


class _Runner:
    """Runs the units of one output directory and commits them; counts into the summary."""

    def __init__(self, wf: Workflow, out_fs, out_root: str, summary: PreprocessSummary):
        self.wf, self.fs, self.out_root, self.summary = wf, out_fs, out_root, summary
        self.said: set[str] = set()         # the placement's warnings, said once per run

    def run(self, plan: DatasetPlan, job: UnitJob, exclude: dict | None = None) -> list[PreprocessRecord]:
        uses_model = any(extractor(m, job.specs[m]).needs_model for m in job.modalities)
        units = plan.units(job.fingerprint(uses_model), exclude)
        fused = isinstance(job, FusedUnitJob)       # its rows are the run's output rows
        sink = UnitSink(self.fs, storage.join(self.out_root, job.out_rel) if job.out_rel else self.out_root,
                        PreprocessRecord)
        records: dict[str, PreprocessRecord] = {}
        pending = []
        for u in units:
            rec = sink.committed(u.id, u.fingerprint)
            if rec is not None:
                records[u.id] = rec
                self.summary.add(rec, fused, processed=False)
            else:
                pending.append(u)
        if pending:
            from mmbatch.engine.runtime import init_ray
            from mmbatch.engine.units import run_units

            init_ray(self.wf.ray.address, self.wf.ray.num_cpus, self.wf.ray.num_gpus, self.wf.ray.object_store_memory)
            place = _placement(self.wf, plan, job, len(pending))
            if place.note and place.note not in self.said:
                self.said.add(place.note)
                log.warning("%s", place.note)
            then = place.then
            for m in plan.modalities:
                split = then is not None and m in place.devices
                self.summary.placement.setdefault(m, {}).update(
                    stage=("decode: CPU workers; embed: one worker per GPU" if split else
                           "CPU workers" if then else "unit worker"),
                    shape=place.shape, device=place.devices.get(m, "cpu"),
                    num_gpus=then.resources.num_gpus if split else 0.0 if then else place.resources.num_gpus,
                    workers=place.workers or "one per unit",
                    **({"gpu_workers": then.workers or "one per unit"} if split else {}))
            what = "fuse" if fused else "features"
            with progress_bar(f"{plan.cfg.name}: extract + {what}", total=sum(u.rows for u in pending),
                              unit="rows") as bar:
                def on_result(unit, rec: PreprocessRecord) -> None:
                    sink.on_write_complete(rec)
                    records[unit.id] = rec
                    self.summary.add(rec, fused, processed=True)
                    bar.update(rec.rows_in)

                run_units(make_decoder if then else make_worker, job, pending, on_result, workers=place.workers,
                          resources=place.resources, name=lambda u: u.id,
                          label=f"mmbatch preprocess {plan.cfg.name}", step="decode" if then else "unit", then=then)
            for m in plan.modalities:
                p = self.summary.placement[m]
                if p.get("device") == "gpu" and "cpu" in p.get("devices", ()):
                    p["stage"] += " (GPU asked for; the model fell back to CPU: no CUDA in the worker)"
        return [records[u.id] for u in units]


@dataclass
class Placement:
    """Where one dataset's units run (:func:`_placement`)."""
    workers: int                        # actors of the first step (a unit worker, or the split shape's decode)
    resources: Resources                # of each of them
    then: Step | None = None            # the split shape's GPU step (embed, fuse, write), else None
    devices: dict = field(default_factory=dict)     # modality -> "gpu" where its model is given a GPU
    note: str = ""                      # a warning to say once, or ""

    @property
    def shape(self) -> str:
        """The shape as placed (features.gpu_shape): "split" or "fused"."""
        return "split" if self.then else "fused"


def _placement(wf: Workflow, plan: DatasetPlan, job: UnitJob, units: int) -> Placement:
    """Where the dataset's units run: one worker per CPU the cluster has or its autoscaler can add, at
    most one per unit of the ``units`` and ``ray.max_workers`` (mmbatch.engine.capacity.pool_size).
    When an extractor needs a model and GPUs are asked for
    (``features.*.num_gpus``) or the cluster has GPUs (an embedded Ray's ``ray.num_gpus``) or can start
    GPU nodes, the model gets a GPU; asking for it is what makes the autoscaler start GPU nodes.

    - ``features.gpu_shape: fused``: each worker holds a GPU fraction (it decodes on its CPU and
      embeds on its GPU share);
    - ``split``: the workers hold no GPU and only decode for the model; a second step of one actor
      per GPU the cluster can have (a whole GPU each, :data:`EMBED_CPUS` CPUs) embeds, fuses and writes
      (docs/data-path.md, "The GPU shape"). Without a GPU to be had: fused, with a warning."""
    from mmbatch.engine import capacity
    from mmbatch.engine.units import Resources, Step

    cluster = capacity.snapshot()

    def pool_size(r: Resources) -> int:
        return capacity.pool_size(cluster, r.num_cpus, r.num_gpus, units, wf.ray.max_workers)

    res, then, note, devices = Resources(num_cpus=1), None, "", {}
    model_mods = [m for m in plan.modalities if extractor(m, job.specs[m]).needs_model]
    if model_mods:
        asked = [getattr(wf.features, m).num_gpus for m in model_mods if getattr(wf.features, m).num_gpus]
        frac = min(1.0, max(asked)) if asked else capacity.gpu_share(cluster)
        if frac:
            devices = {m: "gpu" for m in model_mods}
            if wf.features.gpu_shape == "split":
                cap = (capacity.can_have(cluster) or {}).get("GPU")
                per_gpu = cap if cap and cap < 1 else 1.0       # an embedded Ray's ray.num_gpus: 0.5
                then = Step(make_embedder, pool_size(Resources(num_cpus=0, num_gpus=per_gpu)),
                            Resources(num_cpus=EMBED_CPUS, num_gpus=per_gpu), "embed")
            else:
                res = Resources(num_cpus=1, num_gpus=frac)
        elif wf.features.gpu_shape == "split":
            note = ("features.gpu_shape: split needs a GPU, and this cluster has none nor can start one "
                    "(nor does features.*.num_gpus ask for one): running the fused shape on CPU")
    return Placement(pool_size(res), res, then, devices, note)


def _check_completions(plans: list[DatasetPlan]) -> None:
    """Fail in the driver, before any worker starts, when a completion's tool is missing."""
    from mmbatch.convert.transforms import KINDS, CompleteModality

    for p in plans:
        for c in p.cfg.complete:
            src = KINDS[c.kind][0]
            if src not in p.columns and not c.source_column:
                raise UsageError(f"dataset '{p.cfg.name}': completion {c.kind} needs the {src!r} column; "
                                 f"add it to modalities or set source_column")
            CompleteModality(c.kind, c.source_column, c.target)     # checks tesseract / espeak-ng


def workflow_inputs(wf: Workflow) -> dict[str, str]:
    """What a workflow's preprocess reads: its datasets and any model weights it names."""
    inputs = {f"datasets.{i}.path": d.path for i, d in enumerate(wf.datasets)}
    inputs["features.image.weights"] = wf.features.image.weights
    inputs["features.audio.weights"] = wf.features.audio.weights
    inputs["features.text.model_path"] = wf.features.text.model_path
    return {k: v for k, v in inputs.items() if v}


def run_preprocess(wf: Workflow, progress: bool = True) -> PreprocessSummary:
    t0, cpu0 = time.time(), time.process_time()
    if not wf.datasets:
        raise UsageError("workflow has no datasets: add at least one under 'datasets:' "
                         "(name + path of an ingested dataset)")
    out_uri = wf.output.path
    out_fs, out_root = storage.url_to_fs(out_uri)
    ownership.check_disjoint({"output.path": out_uri}, workflow_inputs(wf))
    specs = feature_specs(wf)
    plans = [plan_dataset(d) for d in wf.datasets]
    _check_completions(plans)
    primaries, partners = _roles(wf, plans)
    ownership.claim(out_uri, "fused", wf.name)
    used = [m for m in MODALITIES if any(m in p.modalities for p in plans)]

    from mmbatch.preprocess.features.sequence import sequence_run_fields, with_vocabulary
    from mmbatch.preprocess.fusion import fused_dim
    from mmbatch.preprocess.splits import split_plan

    splits = split_plan(present_splits(primaries), wf.splits.val_fraction, wf.splits.test_fraction)
    specs = with_vocabulary(specs, plans, splits, wf.splits.seed)     # tokens: vocabulary of the train split
    descriptions = {m: extractor(m, specs[m]).describe() for m in used}
    dims = {m: descriptions[m]["dim"] for m in used}
    sequences = sequence_run_fields({m: extractor(m, specs[m]) for m in used})
    fdim = 0 if sequences else fused_dim(wf.fusion.method, dims, wf.fusion.dim)      # no `fused` column
    meta = _run_meta(wf, plans, splits, descriptions, dims, fdim)
    from mmbatch.dedup.leakage import find_leakage
    leak = find_leakage(wf.dedup.leakage, primaries, splits, wf.splits.seed, out_fs, out_root, wf.ray,
                        wf.dedup.thresholds)
    schema = _fused_output_schema(dims, fdim, sequences, bool(partners), meta)
    summary = PreprocessSummary(out=out_uri)
    runner = _Runner(wf, out_fs, out_root, summary)
    # "complete" no longer holds once any unit may change: the manifest goes before anything is
    # written or removed, and comes back last, from this run's records (as ingest does)
    storage.remove_manifest(out_fs, out_root)

    def job_for(p: DatasetPlan, job_type: type[UnitJob], out_rel: str, **kw) -> UnitJob:
        return job_type(dataset=p.cfg.name, out_uri=storage.join(out_uri, out_rel) if out_rel else out_uri,
                        out_rel=out_rel, columns=p.columns, specs={m: specs[m] for m in p.modalities},
                        modalities=p.modalities, dims=dims, label_map=p.label_map,
                        completions=[c.model_dump(mode="json") for c in p.cfg.complete],
                        row_group_size=wf.output.row_group_size, batch_size=wf.features.batch_size,
                        features={m: {**descriptions[m], "weights_content": weights_digests(specs[m])}
                                  for m in p.modalities}, **kw)

    partner_indexes = _run_partners(wf, runner, partners, job_for, dims, sequences)
    fused_records = _run_primaries(wf, runner, primaries, job_for, schema, splits, partner_indexes, leak)
    if wf.dedup.leakage != "off":
        summary.leakage = leak.manifest()
    summary.dropped = summary.features_rows - summary.rows_out
    summary.fingerprint = storage.fingerprint(sorted(r.fingerprint for r in fused_records))
    summary.driver_cpu_s = time.process_time() - cpu0
    write_manifest(out_fs, out_root, fused_records, summary, meta, t0,
                   workflow_hash=storage.fingerprint(wf.model_dump(mode="json")))
    summary.elapsed = time.time() - t0
    if progress:
        print(render_summary(summary))
    return summary


def _run_meta(wf: Workflow, plans: list[DatasetPlan], splits: dict, descriptions: dict, dims: dict,
              fdim: int) -> dict:
    """The run's metadata: in the fused schema of every file and in the manifest."""
    from mmbatch.preprocess.splits import FINAL_KEY

    return {
        "kind": "fused", "mmbatch_version": __version__, "features": descriptions, "dims": dims, "fused_dim": fdim,
        "fusion": wf.fusion.model_dump(mode="json"), "pairing": wf.pairing.model_dump(mode="json"),
        "datasets": {p.cfg.name: {"path": p.cfg.path, "modalities": p.modalities, "label_map": p.label_map}
                     for p in plans},
        FINAL_KEY: True, "split_plan": {**splits, "seed": wf.splits.seed},
    }


def _fused_output_schema(dims: dict, fdim: int, sequences: dict, paired: bool, meta: dict) -> pa.Schema:
    """The schema of the fused files (``paired_with`` when partners are attached), ``meta`` in it."""
    schema = fused_schema(dims, fdim, sequences)
    if paired:
        schema = schema.append(pa.field("paired_with", pa.string()))
    return with_metadata(schema, meta)


def _run_partners(wf: Workflow, runner: _Runner, partners: list[DatasetPlan], job_for, dims: dict,
                  sequences: dict) -> list[PartnerIndex]:
    """Run each partner dataset's units (their features under ``OUT/_features/<dataset>/``) and index
    their light columns for pairing: one PartnerIndex per partner."""
    out_fs, out_root = runner.fs, runner.out_root
    partner_indexes: list[PartnerIndex] = []
    for p in partners:
        out_rel = storage.join(FEATURES_DIR, p.cfg.name)
        UnitSink(out_fs, storage.join(out_root, out_rel)).on_write_start(
            [u.id for u in p.units({})], data_dirs=("", storage.QUARANTINE_DIR))
        job = job_for(p, PartnerFeaturesJob, out_rel, schema=_features_schema(dims, p.modalities, sequences))
        recs = runner.run(p, job)
        files = [storage.join(out_root, out_rel, f) for r in recs for f in r.files]
        partner_indexes.append(PartnerIndex.build(out_fs, p.cfg.name, p.modalities, files, wf.pairing.by,
                                                  wf.pairing.key))
        partner_indexes[-1].fingerprint = storage.fingerprint(sorted(r.fingerprint for r in recs))
    return partner_indexes


def _run_primaries(wf: Workflow, runner: _Runner, primaries: list[DatasetPlan], job_for, schema: pa.Schema,
                   splits: dict, partner_indexes: list[PartnerIndex], leak) -> list[PreprocessRecord]:
    """Run the primary datasets' units (extract, pair, fuse, write the fused files): their records."""
    out_fs, out_root = runner.fs, runner.out_root
    fused_records: list[PreprocessRecord] = []
    keep_units = [u.id for p in primaries for u in p.units({})]   # ids only (fingerprints differ below)
    UnitSink(out_fs, out_root).on_write_start(keep_units, data_dirs=("", storage.QUARANTINE_DIR))
    for p in primaries:
        job = job_for(p, FusedUnitJob, "", schema=schema, keep_splits=p.cfg.splits, split_plan=splits,
                      split_seed=wf.splits.seed, fusion=wf.fusion.model_dump(mode="json"),
                      pairing=wf.pairing.model_dump(mode="json"), partners=partner_indexes,
                      exclude=leak.for_dataset(p.cfg.name))
        fused_records += runner.run(p, job, exclude=leak.by_unit(p))
    return fused_records
