"""Canonical and fused Parquet stay bit-identical across refactors: digests of the demo corpus's outputs,
recorded before the one-engine move (issue #32), compared on every run.

A digest covers each data file's name, its rows (Arrow IPC of the table, every column) and its schema
metadata, less the keys that hold this run's local paths. Record again only for a change that means to
alter outputs, and say so in its commit: ``python tests/test_output_digests.py --record``.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DIGESTS = Path(__file__).parent / "data" / "output_digests.json"
PER_CLASS = 6


def table_digest(path: Path) -> dict[str, str]:
    """SHA-256 of a Parquet file's rows (Arrow IPC of every column) and, apart, of its schema metadata
    less run-local paths and the unit fingerprint (which covers paths by design)."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"mmbatch_unit"}
    for key, value in meta.items():
        if value.startswith("{"):
            meta[key] = json.dumps(_without_paths(json.loads(value)), sort_keys=True)
    table = table.replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return {"rows": hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest(),
            "metadata": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()}


def _without_paths(obj):
    if isinstance(obj, dict):
        return {k: _without_paths(v) for k, v in obj.items() if k not in ("path", "input", "uri", "root")}
    if isinstance(obj, list):
        return [_without_paths(v) for v in obj]
    return obj


def folder_digests(root: Path) -> dict[str, dict[str, str]]:
    """{relative path: digest} of every data and quarantine file under ``root`` (markers and temp left out)."""
    return {p.relative_to(root).as_posix(): table_digest(p) for p in sorted(root.rglob("*.parquet"))
            if not any(part in ("_tmp", "_shards") for part in p.relative_to(root).parts)}


def build_outputs(root: Path) -> dict[str, dict[str, str]]:
    """Ingest the demo corpus (3 kinds) and preprocess the demo's and TIMIT's workflows under ``root``."""
    from mmbatch.config import workflow_from_dict
    from mmbatch.demo.corpus import write_demo_corpus
    from mmbatch.demo.run import DEMO_WORKFLOW, TIMIT_WORKFLOW
    from mmbatch.ingest.run import IngestOptions, run_ingest
    from mmbatch.preprocess import run_preprocess

    corpus = write_demo_corpus(root / "corpus", per_class=PER_CLASS)
    outputs = {}
    for kind in ("imagenet", "librispeech", "timit"):
        out = root / "canonical" / kind
        run_ingest(kind, str(getattr(corpus, kind)), str(out), IngestOptions(shard_rows=8), echo=False)
        outputs[f"canonical/{kind}"] = out
    for wf_dict in (DEMO_WORKFLOW, TIMIT_WORKFLOW):
        wf = workflow_from_dict(json.loads(json.dumps(wf_dict)), base_dir=root)
        run_preprocess(wf, progress=False)
        outputs[wf_dict["output"]["path"]] = Path(wf.output.path)
    return {name: folder_digests(path) for name, path in outputs.items()}


def test_canonical_and_fused_outputs_match_the_recorded_digests(ray_session, tmp_path):
    want = json.loads(DIGESTS.read_text())
    got = build_outputs(tmp_path)
    assert sorted(got) == sorted(want)
    for folder in want:
        assert sorted(got[folder]) == sorted(want[folder]), folder
        changed = [f for f in want[folder] if got[folder][f] != want[folder][f]]
        assert not changed, f"{folder}: {changed} differ from the recorded outputs"


if __name__ == "__main__":      # python tests/test_output_digests.py --record
    import tempfile

    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_output_digests.py --record")
    from mmbatch.engine.runtime import init_ray

    init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as d:
        digests = build_outputs(Path(d))
    DIGESTS.parent.mkdir(exist_ok=True)
    DIGESTS.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"recorded {sum(len(v) for v in digests.values())} file digests in {DIGESTS}")
