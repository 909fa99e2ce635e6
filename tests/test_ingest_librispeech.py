"""LibriSpeech ingest: ids, parts as splits, reader/chapter, genders, texts, FLAC durations."""
from __future__ import annotations

import io

import pytest
import soundfile as sf

from corpora_ingest import read_rows
from mmbatch.engine import storage
from mmbatch.engine.manifest import Manifest
from mmbatch.ingest.run import IngestOptions, run_ingest
from mmbatch.ingest.sources import librispeech
from mmbatch.ingest.sources.common import Reject


def test_parsers():
    assert librispeech.parse_trans_line(b"1272-128104-0000 MISTER QUILTER IS THE APOSTLE\n") == (
        "1272-128104-0000", "MISTER QUILTER IS THE APOSTLE")
    assert librispeech.parse_trans_line(b"19-198-0001 A  B\r\n") == ("19-198-0001", "A  B")
    with pytest.raises(Reject) as e:
        librispeech.parse_trans_line(b"19-198-0002")
    assert e.value.reason == "empty_transcript"
    with pytest.raises(Reject) as e:
        librispeech.parse_trans_line(b"19-198-0003 CAF\xe9")
    assert e.value.reason == "transcript_not_utf8"
    assert librispeech.utt_id_of(b"19-198-0003 CAF\xe9") == "19-198-0003"
    text = (";ID  |SEX| SUBSET           |MINUTES| NAME\n"
            "14   | F | train-clean-360  | 25.03 | Kristin LeMoine\n"
            "16   | F | train-clean-360  | 25.11 | Alys AtteWater\n"
            "17   | M | train-clean-360  | 25.04 | Gord Mackenzie\n")
    assert librispeech.parse_speakers(text) == {"14": "f", "16": "f", "17": "m"}
    assert librispeech.part_of("/data/LibriSpeech", "dev-clean/84/121123/84-121123-0000.flac") == "dev-clean"
    assert librispeech.part_of("/data/LibriSpeech/dev-clean", "84/121123/84-121123-0000.flac") == "dev-clean"


def expected(base):
    """{utt: (part, reader, chapter, text, frames, sr)} read back from the files the generator wrote."""
    out = {}
    for trans in base.rglob("*.trans.txt"):
        part = trans.parents[2].name
        for line in trans.read_text().splitlines():
            utt, text = line.split(" ", 1)
            info = sf.info(str(trans.parent / f"{utt}.flac"))
            reader, chapter, _ = utt.split("-")
            out[utt] = (part, reader, chapter, text, info.frames, info.samplerate)
    return out


def test_librispeech_corpus_and_part_folder(ray_session, tmp_path):
    from mmbatch.demo.corpus import READER_SEX, READERS, write_librispeech

    base = write_librispeech(tmp_path, per_class=3)
    want = expected(base)
    out = tmp_path / "out"
    s = run_ingest("librispeech", str(base), str(out), IngestOptions(), echo=False)
    assert (s.rows_in, s.ingested, s.quarantined) == (12, 12, 0)
    assert s.splits == {"train-clean-5": 8, "dev-clean-2": 4}
    rows = read_rows(out)
    assert set(rows) == set(want)
    sex = {r: g.lower() for r, g in zip(READERS, READER_SEX)}
    for utt, (part, reader, chapter, text, frames, sr) in want.items():
        r = rows[utt]
        assert r["split"] == part
        assert r["speaker"] == reader and r["chapter"] == chapter
        assert r["gender"] == sex[reader]
        assert r["text"] == text
        assert r["label"] is None and r["image"] is None
        assert r["num_samples"] == frames and r["sample_rate"] == sr == 16000
        assert r["duration"] == pytest.approx(frames / sr)
        assert sf.info(io.BytesIO(r["audio"]["bytes"])).frames == frames
        assert r["audio"]["path"] == f"{part}/{reader}/{chapter}/{utt}.flac"

    # a driver killed mid-run: no manifest, one shard never committed -> the rerun redoes only that shard
    (out / storage.MANIFEST).unlink()
    (out / storage.SHARDS_DIR / "part-00001.json").unlink()
    s_resume = run_ingest("librispeech", str(base), str(out), IngestOptions(), echo=False)
    assert (s_resume.shards_total - s_resume.shards_skipped, s_resume.ingested) == (1, 12)
    assert Manifest.read(str(out)).to_dict()["ingested"] == 12

    # INPUT = one part folder: SPEAKERS.TXT is found next to it
    out2 = tmp_path / "out2"
    s2 = run_ingest("librispeech", str(base / "dev-clean-2"), str(out2), IngestOptions(), echo=False)
    assert s2.ingested == 4 and s2.splits == {"dev-clean-2": 4}
    t = list(read_rows(out2).values())
    assert all(r["gender"] == sex[r["speaker"]] for r in t)
    assert all(r["audio"]["path"].startswith(r["speaker"] + "/") for r in t)   # relative to INPUT
