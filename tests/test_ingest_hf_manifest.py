"""hf (save_to_disk / Hub Parquet) and manifest (CSV / JSONL) ingest; HF features on the output."""
from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from corpora_ingest import flac, jpeg, read_rows, write
from mmbatch.engine.manifest import Manifest
from mmbatch.errors import UsageError
from mmbatch.ingest.run import IngestOptions, run_ingest
from mmbatch.ingest.sources import hf, manifest

datasets = pytest.importorskip("datasets")

CLASSES = ["cat", "dog", "eel"]


def hf_dataset(n: int, offset: int = 0):
    """A real `datasets.Dataset` with Image, Audio, ClassLabel and string columns (real JPEG/FLAC bytes)."""
    from datasets import Audio, ClassLabel, Dataset, DatasetInfo, Features, Image, Value

    feats = Features({"img": Image(), "speech": Audio(), "class": ClassLabel(names=CLASSES),
                      "transcript": Value("string"), "uid": Value("string"), "score": Value("float32")})
    rows = {"img": [{"bytes": jpeg(seed=offset + i, c=i % 4), "path": f"im{offset + i}.jpg"} for i in range(n)],
            "speech": [{"bytes": flac(seed=offset + i, seconds=0.25 + 0.05 * i), "path": f"a{offset + i}.flac"}
                       for i in range(n)],
            "class": [(offset + i) % 3 for i in range(n)],
            "transcript": [f"utterance number {offset + i}" for i in range(n)],
            "uid": [f"u{offset + i:03d}" for i in range(n)],
            "score": [0.5 * i for i in range(n)]}
    # built from Arrow directly: encoding Audio through `datasets` needs torchcodec, the storage does not
    table = pa.table(rows).cast(feats.arrow_schema)
    return Dataset(table, info=DatasetInfo(features=feats))




def test_column_helpers():
    assert hf.split_from_parquet_path("data/train-00000-of-00005.parquet", None) == "train"
    assert hf.split_from_parquet_path("default/test/0000.parquet", None) == "test"
    assert hf.split_from_parquet_path("x/part.parquet", "extra") == "extra"
    with pytest.raises(UsageError):
        from mmbatch.ingest.sources.common import parse_columns
        parse_columns("img:image")
    fields, extra = manifest.map_row({"img": "a.jpg", "image_path": "b.jpg", "note": "x"}, {"img": "image_path"})
    assert fields == {"image_path": "a.jpg"} and extra == {"image_path": "b.jpg", "note": "x"}
    assert manifest.parse_label("3") == (3, None) and manifest.parse_label("dog") == (None, "dog")
    assert manifest.parse_manifest('{"a": 1}\nnot json\n', "jsonl")[1][1].startswith("not JSON")


def test_save_to_disk_dataset_and_dict(ray_session, tmp_path):
    ds = hf_dataset(5)
    ds.save_to_disk(str(tmp_path / "single"))
    out = tmp_path / "out1"
    s = run_ingest("hf", str(tmp_path / "single"), str(out),
                   IngestOptions(columns="transcript=text,uid=sample_id", split="train"), echo=False)
    assert (s.rows_in, s.ingested, s.quarantined) == (5, 5, 0) and s.splits == {"train": 5}
    rows = read_rows(out)
    assert sorted(rows) == [f"u{i:03d}" for i in range(5)]
    for i in range(5):
        r = rows[f"u{i:03d}"]
        assert r["label"] == i % 3 and r["label_name"] == CLASSES[i % 3]      # ClassLabel -> label + names
        assert r["text"] == f"utterance number {i}"
        assert r["image"] == {"bytes": jpeg(seed=i, c=i % 4), "path": f"im{i}.jpg"}
        assert r["audio"]["bytes"] == flac(seed=i, seconds=0.25 + 0.05 * i)
        frames = sf.info(io.BytesIO(r["audio"]["bytes"])).frames
        assert r["num_samples"] == frames and r["duration"] == pytest.approx(frames / 16000)
        assert json.loads(r["extra"])["score"] == 0.5 * i                      # unmapped scalar -> extra
    assert Manifest.read(str(out)).to_dict()["info"]["label_names"] == CLASSES

    dd = datasets.DatasetDict({"train": hf_dataset(4), "test": hf_dataset(2, offset=10)})
    dd.save_to_disk(str(tmp_path / "dict"))
    out2 = tmp_path / "out2"
    s2 = run_ingest("hf", str(tmp_path / "dict"), str(out2), IngestOptions(), echo=False)
    assert s2.splits == {"train": 4, "test": 2} and s2.quarantined == 0
    rows = read_rows(out2)
    # default sample ids: <split>-<row>; no --columns: the ClassLabel/Image/Audio columns are found by type
    assert sorted(rows) == ["test-00000000", "test-00000001"] + [f"train-{i:08d}" for i in range(4)]
    assert rows["test-00000001"]["label_name"] == CLASSES[11 % 3]
    assert rows["train-00000002"]["image"]["bytes"] == jpeg(seed=2, c=2)
    assert rows["train-00000002"]["text"] == "utterance number 2"      # "transcript" is a known text name


def test_save_to_disk_in_shards_row_by_row(ray_session, tmp_path):
    """A shuffled dataset saved in 3 data files: every row keeps its own values, in the saved order."""
    ds = hf_dataset(7).shuffle(seed=3)
    order = ds["uid"]
    assert order != sorted(order)                                     # the saved order is not the build order
    ds.save_to_disk(str(tmp_path / "sharded"), num_shards=3)
    assert len(list((tmp_path / "sharded").glob("data-*.arrow"))) == 3
    out = tmp_path / "out"
    s = run_ingest("hf", str(tmp_path / "sharded"), str(out), IngestOptions(), echo=False)
    assert (s.ingested, s.quarantined) == (7, 0) and s.splits == {"train": 7}
    rows = read_rows(out)
    assert sorted(rows) == [f"train-{i:08d}" for i in range(7)]
    for pos, uid in enumerate(order):                                 # default ids follow the saved order
        i = int(uid[1:])
        r = rows[f"train-{pos:08d}"]
        assert r["text"] == f"utterance number {i}" and json.loads(r["extra"])["uid"] == uid
        assert (r["label"], r["label_name"]) == (i % 3, CLASSES[i % 3])
        assert r["image"]["bytes"] == jpeg(seed=i, c=i % 4) and r["audio"]["bytes"] == flac(seed=i, seconds=0.25 + 0.05 * i)
    assert Manifest.read(str(out)).to_dict()["info"]["label_names"] == CLASSES
    # the same folder again: nothing changed, every shard is skipped
    again = run_ingest("hf", str(tmp_path / "sharded"), str(out), IngestOptions(), echo=False)
    assert again.ingested == 7 and again.shards_skipped == again.shards_total


def test_hub_parquet_shards(ray_session, tmp_path):
    src = tmp_path / "hub" / "data"
    hf_dataset(3).to_parquet(str(src / "train-00000-of-00002.parquet"))
    hf_dataset(2, offset=3).to_parquet(str(src / "train-00001-of-00002.parquet"))
    hf_dataset(2, offset=20).to_parquet(str(src / "test-00000-of-00001.parquet"))
    out = tmp_path / "out"
    s = run_ingest("hf", str(tmp_path / "hub"), str(out), IngestOptions(columns="transcript=text,uid=sample_id"),
                   echo=False)
    assert (s.rows_in, s.ingested, s.quarantined) == (7, 7, 0)
    assert s.splits == {"train": 5, "test": 2}                        # from the shard file names
    rows = read_rows(out)
    assert sorted(rows) == ["u000", "u001", "u002", "u003", "u004", "u020", "u021"]
    assert rows["u004"]["split"] == "train" and rows["u021"]["split"] == "test"
    assert rows["u004"]["text"] == "utterance number 4" and rows["u004"]["label_name"] == CLASSES[4 % 3]
    assert rows["u004"]["image"]["bytes"] == jpeg(seed=4, c=0)
    # OUT inside INPUT is refused before anything is written (docs/data-safety.md)
    inner = tmp_path / "hub" / "ingested"
    opts = IngestOptions(columns="transcript=text,uid=sample_id")
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(UsageError, match="lies inside INPUT"):
        run_ingest("hf", str(tmp_path / "hub"), str(inner), opts, echo=False)
    assert not inner.exists() and sorted(p.name for p in src.iterdir()) == before
    with pytest.raises(UsageError, match="no column 'nope'"):
        run_ingest("hf", str(tmp_path / "hub"), str(tmp_path / "o3"), IngestOptions(columns="nope=text"),
                   echo=False)


def test_manifest_csv_paths_and_hf_load(ray_session, tmp_path):
    root = tmp_path / "m"
    write(root / "media" / "a.jpg", jpeg(seed=1))
    write(root / "media" / "b.jpg", jpeg(seed=2, c=2))
    write(root / "media" / "a.flac", flac(seed=1))
    write(tmp_path / "secret.jpg", jpeg(seed=3))
    os.symlink(tmp_path / "secret.jpg", root / "media" / "link.jpg")
    lines = [
        "sample_id,image_path,audio_path,text,label,split,speaker",
        "s1,media/a.jpg,media/a.flac,hello there,dog,train,spk1",
        "s2,media/b.jpg,,only an image,cat,validation,",
        "s3,,media/a.flac,audio and text,dog,,spk2",
        "s4,../secret.jpg,,escapes with ..,cat,train,",
        f"s5,{tmp_path / 'secret.jpg'},,absolute outside,cat,train,",
        "s6,media/link.jpg,,symlink outside,cat,train,",
        "s7,media/missing.jpg,,no such file,cat,train,",
        "s1,media/b.jpg,,duplicate id,cat,train,",
        "s9,,,,cat,train,",
    ]
    write(root / "manifest.csv", "\n".join(lines) + "\n")
    out = tmp_path / "out"
    s = run_ingest("manifest", str(root / "manifest.csv"), str(out), IngestOptions(split="test"), echo=False)
    assert (s.rows_in, s.ingested, s.quarantined) == (9, 3, 6)
    assert s.reasons == {"path_outside_root": 3, "missing_file": 1, "duplicate_id": 1, "empty_row": 1}
    q = {r["sample_id"]: r for r in pq.read_table(str(out / "quarantine")).to_pylist()}
    assert {k: q[k]["reason"] for k in ("s4", "s5", "s6", "s7")} == {
        "s4": "path_outside_root", "s5": "path_outside_root", "s6": "path_outside_root", "s7": "missing_file"}
    rows = read_rows(out)
    assert set(rows) == {"s1", "s2", "s3"}
    assert rows["s1"]["image"]["bytes"] == jpeg(seed=1) and rows["s1"]["audio"]["bytes"] == flac(seed=1)
    assert rows["s1"]["image"]["path"] == "media/a.jpg"
    # class names -> sorted-unique indices
    assert (rows["s1"]["label"], rows["s1"]["label_name"]) == (1, "dog")
    assert (rows["s2"]["label"], rows["s2"]["label_name"]) == (0, "cat")
    assert rows["s3"]["split"] == "test" and rows["s3"]["speaker"] == "spk2"     # --split fills the gap
    assert rows["s2"]["audio"] is None and rows["s3"]["image"] is None

    # HF datasets reads the output with Image/Audio features and decodes them
    files = [str(out / f) for f in Manifest.read(str(out)).to_dict()["files"]]
    d = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert type(d.features["image"]).__name__ == "Image" and type(d.features["audio"]).__name__ == "Audio"
    by_id = {sid: i for i, sid in enumerate(d["sample_id"])}
    undecoded_audio = d.cast_column("audio", datasets.Audio(decode=False))   # Audio decoding needs torchcodec
    assert undecoded_audio[by_id["s1"]]["image"].size == (40, 30)           # Image decodes to PIL
    raw = undecoded_audio[by_id["s1"]]["audio"]
    x, sr = sf.read(io.BytesIO(raw["bytes"]))
    assert sr == 16000 and len(x) == rows["s1"]["num_samples"]
    if datasets.config.TORCHCODEC_AVAILABLE:   # decoding Audio through datasets needs torchcodec
        assert d[by_id["s1"]]["audio"].get_all_samples().sample_rate == 16000

    # --allow-outside: the escaping paths are read
    out2 = tmp_path / "out2"
    s2 = run_ingest("manifest", str(root / "manifest.csv"), str(out2), IngestOptions(allow_outside=True),
                    echo=False)
    assert s2.reasons == {"missing_file": 1, "duplicate_id": 1, "empty_row": 1} and s2.ingested == 6
    assert read_rows(out2)["s4"]["image"]["bytes"] == jpeg(seed=3)


def test_manifest_jsonl(ray_session, tmp_path):
    root = tmp_path / "j"
    write(root / "x" / "1.flac", flac(seed=5))
    write(root / "x" / "2.flac", b"")
    recs = [{"id": "a", "audio": "x/1.flac", "transcript": "first", "label": 2, "gender": "F", "lang": "en"},
            {"id": "b", "audio": "x/2.flac", "transcript": "zero bytes", "label": 1}]
    text = "\n".join(json.dumps(r) for r in recs) + "\n{broken\n"
    write(root / "data.jsonl", text)
    out = tmp_path / "out"
    s = run_ingest("manifest", str(root), str(out), IngestOptions(), echo=False)   # the folder's one manifest
    assert (s.rows_in, s.ingested, s.quarantined) == (3, 1, 2)
    assert s.reasons == {"bad_row": 1, "empty_file": 1}
    r = read_rows(out)["a"]
    assert (r["text"], r["label"], r["gender"], r["split"]) == ("first", 2, "f", None)
    assert json.loads(r["extra"])["lang"] == "en"
