"""mmbatch.data on the shared real Ray: outputs read as Ray Data datasets, extractors as map_batches
classes giving the embeddings preprocess gives for the same rows, and README's example run as written."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import mmbatch
from mmbatch.config import workflow_from_dict
from mmbatch.data import Embed, read_canonical, read_fused
from mmbatch.errors import UsageError
from mmbatch.preprocess.fusion import embeddings_to_numpy
from mmbatch.ingest.run import IngestOptions, run_ingest
from mmbatch.preprocess import run_preprocess

README = Path(mmbatch.__file__).resolve().parents[1] / "README.md"
FEATURES = {"image": {"extractor": "hog", "size": 32}, "audio": {"max_seconds": 2.0}, "batch_size": 8}


@pytest.fixture(scope="module")
def outputs(ray_session, tmp_path_factory):
    """The layout README's example reads: out/canonical/{imagenet,librispeech} and out/features (images)."""
    from mmbatch.demo.corpus import write_imagenet, write_librispeech

    root = tmp_path_factory.mktemp("data_api")
    canon = root / "out" / "canonical"
    run_ingest("imagenet", str(write_imagenet(root / "corpus", per_class=6)), str(canon / "imagenet"),
               IngestOptions(shard_rows=8), echo=False)
    run_ingest("librispeech", str(write_librispeech(root / "corpus", per_class=4)), str(canon / "librispeech"),
               IngestOptions(shard_rows=8), echo=False)
    for name, out in (("imagenet", "features"), ("librispeech", "speech")):
        run_preprocess(workflow_from_dict({"datasets": [{"name": name, "path": str(canon / name)}],
                                           "features": FEATURES, "output": {"path": str(root / "out" / out)}}),
                       progress=False)
    return root


def table(ds) -> pa.Table:
    return pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))


@pytest.mark.parametrize("dataset,fused,modality", [("imagenet", "features", "image"),
                                                    ("librispeech", "speech", "audio"),
                                                    ("librispeech", "speech", "text")])
def test_embed_gives_preprocess_embeddings_for_the_same_rows(outputs, dataset, fused, modality):
    out = outputs / "out"
    ds = read_canonical(str(out / "canonical" / dataset)).map_batches(
        Embed, fn_constructor_args=(modality, FEATURES), batch_format="pyarrow", batch_size=None, concurrency=1)
    got = table(ds.select_columns(["sample_id", f"{modality}_emb", f"{modality}_error"]))
    want = table(read_fused(str(out / fused), columns=["sample_id", f"{modality}_emb"]))
    assert got.num_rows == want.num_rows > 0 and got.column(f"{modality}_error").null_count == got.num_rows
    dim = len(want.column(f"{modality}_emb")[0])
    g = dict(zip(got.column("sample_id").to_pylist(), embeddings_to_numpy(got.column(f"{modality}_emb"), dim)))
    w = dict(zip(want.column("sample_id").to_pylist(), embeddings_to_numpy(want.column(f"{modality}_emb"), dim)))
    assert sorted(g) == sorted(w)
    assert all(np.array_equal(g[k], w[k]) for k in w)          # bit for bit
    assert any(np.abs(v).sum() > 0 for v in w.values())


def test_readers_refuse_an_incomplete_or_wrong_output(outputs, tmp_path):
    import shutil

    out = outputs / "out"
    with pytest.raises(UsageError, match="not a fused output"):
        read_fused(str(out / "canonical" / "imagenet"))
    partial = tmp_path / "partial"
    shutil.copytree(out / "features", partial)
    (partial / "_manifest.json").unlink()                      # as a killed job leaves it
    with pytest.raises(UsageError, match="incomplete.*allow_incomplete=True"):
        read_fused(str(partial))
    assert read_fused(str(partial), allow_incomplete=True).count() == read_fused(str(out / "features")).count()


def test_read_fused_refuses_a_folder_whose_files_disagree_with_its_manifest(outputs, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from mmbatch.engine.provenance import UNIT_FP_KEY

    mixed = tmp_path / "mixed"
    shutil.copytree(outputs / "out" / "features", mixed)
    victim = sorted(mixed.glob("*.parquet"))[0]
    t = pq.read_table(victim)                      # as a file left by a run with other settings
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, UNIT_FP_KEY: b"another-run"}), victim)
    with pytest.raises(UsageError, match=victim.name):
        read_fused(str(mixed))
    assert read_fused(str(mixed), allow_incomplete=True).count() == read_fused(
        str(outputs / "out" / "features")).count()


def test_readme_example_runs(outputs, monkeypatch):
    code = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert code, "README has no Python example"
    monkeypatch.chdir(outputs)                                 # README's relative paths: out/...
    scope: dict = {}
    exec(compile(code[0], "README.md", "exec"), scope)         # noqa: S102 - our own README's example
    assert {"ds", "fused"} <= set(scope)
    assert scope["ds"].count() == read_canonical(os.path.join("out", "canonical", "imagenet")).count()
    assert "image_emb" in scope["ds"].schema().names and "fused" in scope["fused"].schema().names
