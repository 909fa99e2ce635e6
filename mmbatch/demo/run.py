"""`mmbatch demo`: every stage end to end on an embedded local Ray.

1. generate a small corpus in the ImageNet, LibriSpeech and TIMIT layouts;
2. ingest each into canonical Parquet;
3. preprocess: image features (ImageNet-style rows) paired by label with audio +
   text features (LibriSpeech-style rows, label = reader), fused per sample;
   TIMIT-style rows get their own feature set (label = gender);
4. train the fusion model and one baseline per modality with Ray Train, evaluate,
   write the HTML report;
5. modality completion: give the image rows a spoken class name (text-to-speech)
   and train image + audio, reported next to the image-only baseline.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from mmbatch.errors import EXIT_FAIL, EXIT_OK

DEMO_WORKFLOW = {
    "name": "demo",
    "description": "mmbatch demo: ImageNet-style images paired by label with LibriSpeech-style speech",
    "datasets": [
        {"name": "images", "path": "canonical/imagenet", "modalities": ["image"]},
        {"name": "speech", "path": "canonical/librispeech", "modalities": ["audio", "text"],
         "label_column": "speaker"},
    ],
    "features": {"image": {"extractor": "hog", "size": 64},
                 "audio": {"extractor": "logmel_stats"},
                 "text": {"extractor": "hashing", "dim": 256}},
    "pairing": {"by": "label", "primary": "images", "seed": 0},
    "fusion": {"method": "concat"},
    "output": {"path": "features"},
    "train": {"out": "train", "name": "fusion", "model": "early", "epochs": 12, "batch_size": 32,
              "num_workers": 2, "cpus_per_worker": 0.5, "baselines": True, "lr": 0.003},
    "retrain": {"registry": "registry"},
}

COMPLETION_WORKFLOW = {
    "name": "demo-completion",
    "description": "modality completion: ImageNet-style rows get a spoken class name (espeak-ng) as audio",
    "datasets": [{"name": "images", "path": "canonical/imagenet", "modalities": ["image", "audio"],
                  "complete": [{"kind": "text-to-speech", "source_column": "label_name"}]}],
    "features": DEMO_WORKFLOW["features"],
    "output": {"path": "features_completed"},
    "train": {**DEMO_WORKFLOW["train"], "name": "completed", "baselines": False},
}

TIMIT_WORKFLOW = {
    "name": "demo-timit",
    "datasets": [{"name": "timit", "path": "canonical/timit", "label_column": "gender"}],
    "features": {"audio": {"extractor": "logmel_stats"}, "text": {"extractor": "hashing", "dim": 256}},
    "output": {"path": "features_timit"},
}


def _step(title: str):
    print(f"\n== {title}", flush=True)
    return time.time()


def run_demo(out: str, per_class: int = 48, epochs: int = 12, num_cpus: int | None = None) -> int:
    from mmbatch.config import workflow_from_dict
    from mmbatch.convert import MissingTool
    from mmbatch.demo.corpus import write_demo_corpus
    from mmbatch.ingest.run import run_ingest
    from mmbatch.preprocess import run_preprocess
    from mmbatch.engine.runtime import init_ray
    from mmbatch.train.run import run_training

    from mmbatch.engine import ownership

    t_start = time.time()
    root = Path(out).resolve()
    ownership.claim(str(root), "demo", DEMO_WORKFLOW["name"])
    timings = {}

    t = _step(f"1/5 generating a demo corpus under {root / 'corpus'}")
    corpus = write_demo_corpus(root / "corpus", per_class=per_class)
    timings["generate"] = time.time() - t

    t = _step("2/5 starting an embedded local Ray and ingesting three corpora")
    init_ray(num_cpus=num_cpus)
    ingested = {}
    for kind, path in (("imagenet", corpus.imagenet), ("librispeech", corpus.librispeech), ("timit", corpus.timit)):
        s = ingested[kind] = run_ingest(kind, str(path), str(root / "canonical" / kind), echo=False)
        print(f"  {kind}: {s.ingested} rows in {s.shards_total} shards, {s.quarantined} quarantined -> {s.out}")
    timings["ingest"] = time.time() - t

    t = _step("3/5 preprocessing: features, pairing by label, fusion")
    wf_dict = json.loads(json.dumps(DEMO_WORKFLOW))
    wf_dict["train"]["epochs"] = epochs
    (root / "workflow.yaml").write_text(yaml.safe_dump(_absolute(wf_dict, root), sort_keys=False))
    wf = workflow_from_dict(wf_dict, base_dir=root)
    pre = run_preprocess(wf, progress=False)
    _preprocessed(pre, partners="speech rows (LibriSpeech-style) used only as pairing partners")
    timit_wf = workflow_from_dict(TIMIT_WORKFLOW, base_dir=root)
    pre_timit = run_preprocess(timit_wf, progress=False)
    _preprocessed(pre_timit)
    timings["preprocess"] = time.time() - t

    t = _step("4/5 training the fusion model and unimodal baselines with Ray Train")
    result = run_training(wf, baselines=True)
    timings["train"] = time.time() - t

    t = _step("5/5 modality completion: spoken class names for the image rows, then train image + audio")
    completion = pre_completion = None
    try:
        cwf_dict = json.loads(json.dumps(COMPLETION_WORKFLOW))
        cwf_dict["train"]["epochs"] = epochs
        cwf = workflow_from_dict(cwf_dict, base_dir=root)
        pre_completion = run_preprocess(cwf, progress=False)
        _preprocessed(pre_completion)
        completion = run_training(cwf, baselines=False)
    except MissingTool as e:   # espeak-ng absent: the rest of the demo stands on its own
        print(f"  skipped: {e}")
    timings["completion"] = time.time() - t
    timings["total"] = time.time() - t_start
    _print_outputs(root, ingested, pre, pre_timit, result, (pre_completion, completion), timings)
    checks = [Path(result.model_dir, "model.pt").exists(), Path(result.report_path).exists(),
              pre.rows_out > 0, pre.reconciles]
    return EXIT_OK if all(checks) else EXIT_FAIL


def _preprocessed(s, partners: str | None = None) -> None:
    """One line per preprocess job (`mmbatch preprocess` prints the full per-stage table). Rows of a
    pairing partner get features (under _features/) but no fused row of their own: ``partners`` says what
    they are, so the difference does not read as lost data."""
    line = f"  {s.rows_out} fused rows"
    if partners and s.features_rows > s.rows_out:
        line += f", plus {s.features_rows - s.rows_out} {partners}"
    print(f"{line}; {s.quarantined} quarantined; {s.elapsed:.1f} s -> {s.out}")


def _absolute(wf_dict: dict, root: Path) -> dict:
    """The workflow as written to disk, with absolute paths so it can be rerun from anywhere."""
    d = json.loads(json.dumps(wf_dict))
    for ds in d["datasets"]:
        ds["path"] = str(root / ds["path"])
    d["output"]["path"] = str(root / d["output"]["path"])
    d["train"]["out"] = str(root / d["train"]["out"])
    d["retrain"]["registry"] = str(root / d["retrain"]["registry"])
    return d


def _print_outputs(root, ingested, pre, pre_timit, result, completed, timings) -> None:
    """The demo's last screen: what it wrote, how long each step took, the result in one line, what to open.
    The result table itself was printed once, by the training step above."""
    pre_completion, completion = completed
    print("\n== mmbatch demo: outputs")
    rows = [
        ("corpus", root / "corpus"),
        ("canonical Parquet", root / "canonical"),
        ("fused features", pre.out),
        ("TIMIT features", pre_timit.out),
        ("model (torch.load weights_only)", result.model_dir),
        ("HTML report", result.report_path),
        ("workflow", root / "workflow.yaml"),
    ]
    if completion is not None:
        rows += [("completion: fused features", pre_completion.out),
                 ("completion: model", completion.model_dir),
                 ("completion: HTML report", completion.report_path)]
    for name, path in rows:
        print(f"  {name:<34} {path}")
    print("  ingest:      " + "; ".join(f"{k} {s.ingested} rows ({s.quarantined} quarantined)"
                                       for k, s in ingested.items()))
    print("  seconds:     " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print("\n== result (4 classes, chance 0.25; the table is above, under step 4/5)")
    print("  " + _result_line(result))
    if completion is not None:
        image_only = (result.baselines or {}).get("image", {}).get("accuracy")
        if image_only is not None:
            print(f"  modality completion (image rows + spoken class name): test accuracy "
                  f"{completion.metrics['accuracy']:.3f} vs image only {image_only:.3f}; the spoken clip says the\n"
                  "    class name, so it carries the label like a caption: this shows the completion path works,\n"
                  "    not that sonified labels are a modelling win.")
    print(f"\nnext: open {result.report_path}\n"
          f"      rerun a stage: mmbatch preprocess {root / 'workflow.yaml'} (committed units are skipped)")


def _result_line(result) -> str:
    """The fused model's test accuracy against the best single modality, in one line."""
    fused = result.metrics["accuracy"]
    base = {m: met["accuracy"] for m, met in (result.baselines or {}).items()}
    if not base:
        return f"fused model: test accuracy {fused:.3f}"
    best = max(base, key=base.get)
    return (f"fused model: test accuracy {fused:.3f}; best single modality ({best} only): {base[best]:.3f} "
            f"({100 * (fused - base[best]):+.1f} points)")
