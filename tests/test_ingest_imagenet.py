"""ImageNet ingest: sorted-wnid labels, both flat-val label files, foldered val, rerun skips, HF features."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from corpora_ingest import (DEVKIT_IDS, NAMES, SORTED_WNIDS, WNIDS, imagenet_devkit, imagenet_kaggle, jpeg,
                            meta_mat, read_rows)
from mmbatch import schema
from mmbatch.engine import storage
from mmbatch.engine.manifest import Manifest
from mmbatch.ingest.run import IngestOptions, run_ingest
from mmbatch.ingest.sources import imagenet




# --- pure parsers (no Ray) -----------------------------------------------------------------
def test_parsers(tmp_path):
    assert imagenet.parse_synset_mapping("n01440764 tench, Tinca tinca\nn01443537 goldfish\n") == {
        "n01440764": "tench, Tinca tinca", "n01443537": "goldfish"}
    assert imagenet.parse_val_solution(
        "ImageId,PredictionString\nILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295\n"
    ) == {"ILSVRC2012_val_00008726": "n02119789"}
    assert imagenet.parse_ground_truth("490\n361\n") == [490, 361]
    assert imagenet.val_index("ILSVRC2012_val_00000042") == 42
    assert imagenet.val_index("cat") is None
    meta_mat(tmp_path / "meta.mat", DEVKIT_IDS, {w: NAMES[w] for w in WNIDS})
    meta = imagenet.parse_meta_mat((tmp_path / "meta.mat").read_bytes())
    assert meta == {i: (w, NAMES[w]) for i, w in DEVKIT_IDS.items()}   # the non-leaf synset is left out


def test_kaggle_layout_labels_rerun_and_hf_features(ray_session, tmp_path):
    root, labels = imagenet_kaggle(tmp_path / "kaggle", per_class=2)
    out = tmp_path / "out"
    s = run_ingest("imagenet", str(root), str(out), IngestOptions(), echo=False)
    assert (s.rows_in, s.ingested, s.quarantined) == (9, 9, 0)
    assert s.splits == {"train": 6, "validation": 3}
    rows = read_rows(out)
    assert set(rows) == set(labels)
    for sid, w in labels.items():
        r = rows[sid]
        assert r["wnid"] == w
        assert r["label"] == SORTED_WNIDS.index(w)          # torchvision ImageFolder order
        assert r["label_name"] == NAMES[w]                   # LOC_synset_mapping.txt
        assert r["source"] == "imagenet"
        assert r["split"] == ("validation" if sid.startswith("ILSVRC2012_val") else "train")
        rel = r["image"]["path"]
        assert (root / rel).read_bytes() == r["image"]["bytes"]   # bytes stored as-is, path relative to INPUT
    assert rows["ILSVRC2012_val_00000001"]["label"] == 2 and rows["ILSVRC2012_val_00000002"]["label"] == 0
    assert json.loads(rows["ILSVRC2012_val_00000001"]["extra"])["image_format"] == "JPEG"

    manifest = Manifest.read(str(out)).to_dict()
    assert manifest["ingested"] == 9 and manifest["info"]["classes"] == SORTED_WNIDS
    assert manifest["schema_version"] == schema.SCHEMA_VERSION
    assert sorted(os.listdir(out / storage.QUARANTINE_DIR)) == ["planning.parquet"]
    meta = schema.read_mmbatch_meta(pq.read_schema(str(out / manifest["files"][0])))
    assert meta["kind"] == "imagenet" and meta["stage"] == "ingest"

    # rerun: every shard already committed
    s2 = run_ingest("imagenet", str(root), str(out), IngestOptions(), echo=False)
    assert s2.shards_skipped == s2.shards_total == s.shards_total and s2.ingested == 9
    # one changed file: only its shard is redone
    victim = root / rows["ILSVRC2012_val_00000003"]["image"]["path"]
    victim.write_bytes(jpeg(seed=4242, w=50, h=20))
    s3 = run_ingest("imagenet", str(root), str(out), IngestOptions(), echo=False)
    assert s3.shards_skipped == s3.shards_total - 1
    assert read_rows(out)["ILSVRC2012_val_00000003"]["image"]["bytes"] == victim.read_bytes()

    # HF datasets sees Image features and decodes them
    datasets = pytest.importorskip("datasets")
    files = sorted(str(out / f) for f in manifest["files"])
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert type(ds.features["image"]).__name__ == "Image"
    assert ds.num_rows == 9
    im = ds[0]["image"]
    assert im.size[0] > 0 and im.mode == "RGB"


def test_devkit_ground_truth_uses_meta_mat_ids(ray_session, tmp_path):
    root, labels = imagenet_devkit(tmp_path / "devkit", per_class=1)
    out = tmp_path / "out"
    s = run_ingest("imagenet", str(root), str(out), IngestOptions(), echo=False)
    assert (s.rows_in, s.ingested, s.quarantined) == (7, 7, 0)
    rows = read_rows(out)
    # GT ids [3, 1, 2, 1] -> meta.mat wnids -> sorted-wnid indices, which differ from the ids
    expect = {"ILSVRC2012_val_00000001": "n02000003", "ILSVRC2012_val_00000002": "n03000002",
              "ILSVRC2012_val_00000003": "n01000001", "ILSVRC2012_val_00000004": "n03000002"}
    for sid, w in expect.items():
        assert labels[sid] == w
        assert rows[sid]["wnid"] == w
        assert rows[sid]["label"] == SORTED_WNIDS.index(w)
        assert rows[sid]["label_name"] == NAMES[w]      # no synset mapping: words from meta.mat
        assert rows[sid]["split"] == "validation"
    assert [rows[f"ILSVRC2012_val_{n:08d}"]["label"] for n in (1, 2, 3, 4)] == [1, 2, 0, 2]
    assert DEVKIT_IDS[1] == "n03000002" and SORTED_WNIDS.index("n03000002") == 2   # ID 1 is not index 0


def test_foldered_val_and_bare_class_tree(ray_session, tmp_path):
    from mmbatch.demo.corpus import CLASS_NAMES, WNIDS as DEMO_WNIDS, write_imagenet

    base = write_imagenet(tmp_path, per_class=3)
    out = tmp_path / "out"
    s = run_ingest("imagenet", str(base), str(out), IngestOptions(shard_rows=1), echo=False)
    assert s.quarantined == 0 and s.ingested == 12
    assert s.splits == {"train": 8, "validation": 4}
    assert s.shards_total == 12                                # shard_rows=1
    assert s.labels == {n: 3 for n in CLASS_NAMES}
    for r in read_rows(out).values():
        assert r["label"] == sorted(DEMO_WNIDS).index(r["wnid"])
        assert r["image"]["path"].split("/")[1] == r["wnid"]
    # fewer, bigger shards next time: the old ones are removed, only the new plan's files remain
    s_again = run_ingest("imagenet", str(base), str(out), IngestOptions(), echo=False)
    assert s_again.shards_total < s.shards_total and s_again.ingested == 12
    m = Manifest.read(str(out)).to_dict()
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(m["files"])
    assert sorted(p.stem for p in (out / storage.SHARDS_DIR).glob("*.json")) == \
        sorted(f[:-len(".parquet")] for f in m["files"])
    # a class-folder tree given directly (INPUT = train/): split from --split
    out2 = tmp_path / "out2"
    s2 = run_ingest("imagenet", str(base / "train"), str(out2), IngestOptions(split="train"), echo=False)
    assert s2.ingested == 8 and s2.splits == {"train": 8}
    assert {r["label"] for r in read_rows(out2).values()} == {0, 1, 2, 3}


def test_val_only_download_with_the_devkit_takes_classes_from_meta_mat(ray_session, tmp_path):
    """val/ILSVRC2012_val_*.JPEG + devkit ground truth + meta.mat, no train/ and no LOC_synset_mapping.txt:
    the classes are meta.mat's leaf synsets in sorted-wnid order (torchvision's ImageNet), including a
    class no val image has; ILSVRC2012_IDs (not in wnid order) map to wnids through meta.mat."""
    from corpora_ingest import write

    root = tmp_path / "imagenet-val"
    ids = {1: "n03000002", 2: "n01000001", 3: "n02000003", 4: "n04000004"}      # devkit ID -> wnid
    words = {**{w: NAMES[w] for w in WNIDS}, "n04000004": "tiger shark"}
    gt = [3, 1, 2, 1, 3]                                                        # val_00000001 .. _05
    for n in range(1, len(gt) + 1):
        write(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", jpeg(seed=900 + n))
    data = root / "ILSVRC2012_devkit_t12" / "data"
    write(data / "ILSVRC2012_validation_ground_truth.txt", "".join(f"{i}\n" for i in gt))
    meta_mat(data / "meta.mat", ids, words)                       # plus a non-leaf synset, left out
    out = tmp_path / "out"
    s = run_ingest("imagenet", str(root), str(out), IngestOptions(), echo=False)
    assert (s.rows_in, s.ingested, s.quarantined) == (5, 5, 0)
    classes = sorted(ids.values())
    assert Manifest.read(str(out)).to_dict()["info"]["classes"] == classes
    rows = read_rows(out)
    for n, i in enumerate(gt, start=1):
        r = rows[f"ILSVRC2012_val_{n:08d}"]
        assert r["wnid"] == ids[i] and r["split"] == "validation"
        assert r["label"] == classes.index(ids[i])
        assert r["label_name"] == words[ids[i]]
    assert [rows[f"ILSVRC2012_val_{n:08d}"]["label"] for n in range(1, 6)] == [1, 2, 0, 2, 1]
