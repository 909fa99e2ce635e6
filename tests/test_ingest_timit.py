"""TIMIT ingest: LDC upper/lower case, Kaggle layout, SPHERE byte orders, splits, alignments, phone folding."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from corpora_ingest import PHN, TIMIT, TIMIT_UTTS, read_rows, timit
from mmbatch.engine.manifest import Manifest
from mmbatch.ingest.run import IngestOptions, run_ingest
from mmbatch.media import decode_audio, is_sphere
from mmbatch.ingest.sources import sphere
from mmbatch.ingest.sources import timit as T
from mmbatch.ingest.sources.common import Reject


# --- pure helpers (no Ray) --------------------------------------------------------------
def test_paths_splits_and_text():
    assert T.parse_path("TRAIN/DR1/FCJF0/SA1.WAV")["role"] == "wav"
    p = T.parse_path("timit/test/dr3/mzzz0/si1200.phn")
    assert (p["subset"], p["dr"], p["speaker"], p["utt"], p["role"]) == ("TEST", "DR3", "MZZZ0", "SI1200", "phn")
    assert T.parse_path("data/TRAIN/DR1/FCJF0/SA1.WAV.wav")["role"] == "riff"
    assert T.parse_path("data/TRAIN/DR1/FCJF0/SA1.TXT.wav") is None
    assert T.parse_path("README.DOC") is None and T.parse_path("TRAIN/DR9/FCJF0/SA1.WAV") is None
    assert T.split_of("TRAIN", "FCJF0") == "train"
    assert T.split_of("TEST", "FAKS0") == "dev" and T.split_of("TEST", "mjmp0") == "test"
    assert T.split_of("TEST", "MZZZ0") is None
    assert len(T.DEV_SPEAKERS) == 50 and len(T.CORE_TEST_SPEAKERS) == 24
    assert T.parse_txt("0 46797 She had your dark suit in greasy wash water all year.\n") == \
        "She had your dark suit in greasy wash water all year."
    with pytest.raises(Reject) as e:
        T.parse_txt("0 46797\n")
    assert e.value.reason == "empty_transcript"
    segs = T.parse_segments("0 3050 h#\n3050 4559 sh\n", 16000)
    assert segs == [{"start": 0.0, "end": 3050 / 16000, "symbol": "h#"},
                    {"start": 3050 / 16000, "end": 4559 / 16000, "symbol": "sh"}]
    assert T.parse_segments("0 800 h#\n", 8000)[0]["end"] == 0.1
    with pytest.raises(Reject):
        T.parse_segments("0 x h#\n")


def test_phone_folding():
    assert len(T.PHONE_MAP) == 60            # 61 symbols less q
    cases = {"ax-h": ("ax", "ah"), "bcl": ("vcl", "sil"), "zh": ("zh", "sh"), "h#": ("sil", "sil"),
             "ao": ("ao", "aa"), "pau": ("sil", "sil"), "ix": ("ix", "ih"), "em": ("m", "m"), "axr": ("er", "er"),
             "ux": ("uw", "uw"), "nx": ("n", "n"), "el": ("el", "l"), "en": ("en", "n"), "epi": ("epi", "sil")}
    for p61, (p48, p39) in cases.items():
        assert T.fold_phone(p61, 61) == p61
        assert T.fold_phone(p61, 48) == p48
        assert T.fold_phone(p61, 39) == p39
    assert T.fold_phone("q", 61) == "q"
    assert T.fold_phone("q", 48) is None and T.fold_phone("q", 39) is None
    assert len({v[0] for v in T.PHONE_MAP.values()}) == 48
    assert len({v[1] for v in T.PHONE_MAP.values()}) == 39
    segs = [{"start": 0.0, "end": 1.0, "symbol": "q"}, {"start": 1.0, "end": 2.0, "symbol": "dcl"}]
    assert T.fold_phones(segs, 39) == [{"start": 1.0, "end": 2.0, "symbol": "sil"}]


# --- ingest runs ---------------------------------------------------------------------------


def check_rows(rows, facts, phones: int, include_sa: bool):
    ingestible = {k: f for k, f in facts.items() if f["split"] and (include_sa or "-SA" not in k)}
    assert set(rows) == set(ingestible)
    for sid, f in ingestible.items():
        r = rows[sid]
        spk, utt = sid.split("-")
        assert r["speaker"] == spk and r["gender"] == spk[0].lower()
        assert r["split"] == f["split"] and r["dialect_region"] == f["dr"] and r["sentence_type"] == utt[:2]
        assert r["text"] == f["text"]
        assert r["sample_rate"] == 16000 and r["num_samples"] == f["n"]
        assert r["duration"] == pytest.approx(f["n"] / 16000)
        wb = f["word_bounds"]
        assert [(w["start"], w["end"]) for w in r["words"]] == [(wb[i] / 16000, wb[i + 1] / 16000) for i in range(4)]
        assert [w["symbol"] for w in r["words"]] == ["she", "had", "your", "suit"]
        pb = f["phone_bounds"]
        want = [(pb[i] / 16000, pb[i + 1] / 16000, T.fold_phone(p, phones)) for i, p in enumerate(PHN)]
        assert [(p["start"], p["end"], p["symbol"]) for p in r["phones"]] == [w for w in want if w[2] is not None]
        assert is_sphere(r["audio"]["bytes"])                        # SPHERE bytes stored as-is
        x, sr = decode_audio(r["audio"]["bytes"])
        assert sr == 16000 and np.abs(x - f["x"]).max() < 1e-3


def test_ldc_upper_case(ray_session, tmp_path):
    base, facts = timit(tmp_path)
    out = tmp_path / "out"
    s = run_ingest("timit", str(base), str(out), IngestOptions(), echo=False)
    # 4 ingestible speakers x (SX, SI); SA left out; MZZZ0 (TEST, not dev/core) not ingested nor counted
    assert (s.rows_in, s.ingested, s.quarantined) == (8, 8, 0)
    assert s.splits == {"train": 4, "dev": 2, "test": 2}
    assert s.skipped == {"skipped_sa": 4, "skipped_non_core": 3, "skipped_riff_copies": 0}
    check_rows(read_rows(out), facts, 61, include_sa=False)
    m = Manifest.read(str(out)).to_dict()
    assert m["counts"]["skipped_non_core"] == 3 and m["counts"]["skipped_sa"] == 4 and m["rows_in"] == 8
    assert "q" in [p["symbol"] for p in read_rows(out)["FCJF0-SX101"]["phones"]]


def test_ldc_lower_case_big_endian_with_sa_39_phones(ray_session, tmp_path):
    base, facts = timit(tmp_path, lower=True, byte_format="10")
    assert (base / "train" / "dr1" / "fcjf0" / "sa1.wav").exists()
    out = tmp_path / "out"
    s = run_ingest("timit", str(base), str(out), IngestOptions(include_sa=True, phones=39), echo=False)
    assert (s.ingested, s.quarantined) == (12, 0) and s.skipped["skipped_sa"] == 0
    rows = read_rows(out)
    check_rows(rows, facts, 39, include_sa=True)
    assert all(p["symbol"] != "q" for r in rows.values() for p in r["phones"])
    assert rows["FCJF0-SA1"]["audio"]["path"] == "train/dr1/fcjf0/sa1.wav"
    assert '"sample_byte_format": "10"' in rows["FCJF0-SA1"]["extra"]


def test_kaggle_layout_no_double_ingest_48_phones(ray_session, tmp_path):
    base, facts = timit(tmp_path, kaggle=True)
    out = tmp_path / "out"
    s = run_ingest("timit", str(base), str(out), IngestOptions(phones=48), echo=False)
    assert (s.rows_in, s.ingested, s.quarantined) == (8, 8, 0)          # not 16: .WAV.wav copies skipped
    assert s.skipped["skipped_riff_copies"] == len(TIMIT) * len(TIMIT_UTTS)
    rows = read_rows(out)
    check_rows(rows, facts, 48, include_sa=False)
    assert all(r["audio"]["path"].endswith(".WAV") for r in rows.values())

    # where only the RIFF copy exists it is used (soundfile reads it)
    d = facts["FCJF0-SX101"]["dir"]
    (d / "SX101.WAV").unlink()
    s2 = run_ingest("timit", str(base), str(out), IngestOptions(phones=48), echo=False)
    assert s2.ingested == 8 and s2.shards_skipped < s2.shards_total
    r = read_rows(out)["FCJF0-SX101"]
    assert r["audio"]["path"].endswith("SX101.WAV.wav") and r["num_samples"] == facts["FCJF0-SX101"]["n"]


def test_sphere_shorten_quarantined(ray_session, tmp_path):
    base, facts = timit(tmp_path, speakers={"FCJF0": TIMIT["FCJF0"]})
    wav = facts["FCJF0-SX101"]["dir"] / "SX101.WAV"
    wav.write_bytes(sphere.encode(facts["FCJF0-SX101"]["x"], sample_coding="pcm,embedded-shorten-v2.00"))
    out = tmp_path / "out"
    s = run_ingest("timit", str(base), str(out), IngestOptions(), echo=False)
    assert (s.rows_in, s.ingested, s.quarantined) == (2, 1, 1)
    assert s.reasons == {"sphere_shorten": 1}
    q = pq.read_table(str(out / "quarantine")).to_pylist()
    assert [(r["sample_id"], r["reason"], r["path"]) for r in q] == [
        ("FCJF0-SX101", "sphere_shorten", "TRAIN/DR1/FCJF0/SX101.WAV")]
    assert "shorten" in q[0]["detail"]
    shutil.rmtree(out)
