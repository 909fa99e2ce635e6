"""Bad input: every broken row lands in quarantine with its reason, counts reconcile, unusable INPUT -> exit 2."""
from __future__ import annotations

import os
from collections import Counter

import pytest

from corpora_ingest import TIMIT, flac, imagenet_train, jpeg, png_bomb, read_quarantine, read_rows, timit, write
from mmbatch.engine.manifest import Manifest
from mmbatch.cli import main
from mmbatch.errors import UsageError
from mmbatch.ingest.run import IngestOptions, plan_ingest, run_ingest
from mmbatch.ingest.sources import common, sphere


def reasons_by_id(out) -> dict:
    return {(r["sample_id"] or r["path"]): r["reason"] for r in read_quarantine(out)}


def test_imagenet_bad_files(ray_session, tmp_path):
    root = tmp_path / "in"
    imagenet_train(root, per_class=2)
    d = root / "train" / "n01000001"
    write(d / "zero.JPEG", b"")
    write(d / "text.JPEG", "this is not an image\n")
    write(d / "bomb.png", png_bomb())
    full = jpeg(seed=77, w=320, h=240)
    write(d / "truncated.JPEG", full[: len(full) // 2])          # header intact: passes the probe
    write(root / "train" / "n02000003" / "n01000001_10.JPEG", jpeg(seed=5))   # same stem as a file in n01000001
    write(tmp_path / "elsewhere.JPEG", jpeg(seed=6))
    os.symlink(tmp_path / "elsewhere.JPEG", d / "outside.JPEG")
    os.symlink(d / "n01000001_10.JPEG", d / "inside_link.JPEG")   # a symlink inside INPUT is fine
    write(root / "train" / "loose.JPEG", jpeg(seed=8))            # no class folder
    out = tmp_path / "out"
    s = run_ingest("imagenet", str(root), str(out), IngestOptions(), echo=False)
    assert s.rows_in == s.ingested + s.quarantined
    assert (s.rows_in, s.ingested, s.quarantined) == (14, 8, 6)
    got = reasons_by_id(out)
    assert got == {"zero": "empty_file", "text": "not_an_image", "bomb": "decompression_bomb",
                   "outside": "path_outside_root", "n01000001_10": "duplicate_id", "loose": "missing_label"}
    q = {r["sample_id"]: r for r in read_quarantine(out)}
    # the first in sorted path order is kept: n01000001/n01000001_10.JPEG, not n02000003/...
    assert q["n01000001_10"]["path"] == "train/n02000003/n01000001_10.JPEG"
    assert q["outside"]["path"] == "train/n01000001/outside.JPEG" and "outside" in q["outside"]["detail"]
    assert all(r["detail"] and r["source"] == "imagenet" and r["stage"] == "ingest" for r in q.values())
    rows = read_rows(out)
    assert "truncated" in rows and "inside_link" in rows
    assert rows["n01000001_10"]["wnid"] == "n01000001"
    m = Manifest.read(str(out)).to_dict()
    assert m["rows_in"] == m["ingested"] + m["quarantined"] == 14
    assert Counter(m["counts"]["quarantine_reasons"]) == Counter(got.values())


def test_librispeech_bad_transcripts_and_audio(ray_session, tmp_path):
    base = tmp_path / "LibriSpeech"
    d = base / "dev-clean" / "84" / "121"
    write(base / "SPEAKERS.TXT", ";ID|SEX|SUBSET|MINUTES|NAME\n84 | F | dev-clean | 8.0 | A\n")
    for i in (0, 1, 4, 5, 6):
        write(d / f"84-121-{i:04d}.flac", flac(seed=i))
    write(d / "84-121-0007.flac", b"")                           # zero bytes
    write(d / "84-121-0008.flac", b"fLaC" + b"\0" * 100)          # corrupt
    write(d / "84-121-0009.flac", flac(seed=9))                  # no transcript line
    write(d / "84-121.trans.txt", b"84-121-0000 GOOD ONE\n"
                                  b"84-121-0001 CAF\xe9 AU LAIT\n"     # not UTF-8
                                  b"84-121-0002 NO AUDIO FOR THIS LINE\n"
                                  b"84-121-0004\n"                     # empty text
                                  b"84-121-0005 FIVE\n84-121-0006 SIX\n84-121-0007 ZERO\n84-121-0008 CORRUPT\n"
                                  b"84-121-0005 DUPLICATE LINE\n")
    out = tmp_path / "out"
    s = run_ingest("librispeech", str(base), str(out), IngestOptions(), echo=False)
    assert s.rows_in == s.ingested + s.quarantined
    assert s.ingested == 3                     # 0000, 0005, 0006
    assert reasons_by_id(out) == {
        "84-121-0001": "transcript_not_utf8", "84-121-0002": "missing_audio", "84-121-0004": "empty_transcript",
        "84-121-0007": "empty_file", "84-121-0008": "corrupt_audio", "84-121-0009": "missing_transcript",
        "84-121-0005": "duplicate_id"}
    assert read_rows(out)["84-121-0005"]["text"] == "FIVE"       # the first line wins


def test_timit_bad_files(ray_session, tmp_path):
    base, facts = timit(tmp_path, speakers={"FCJF0": TIMIT["FCJF0"], "MDAB1": TIMIT["MDAB1"]})
    d1, d2 = facts["FCJF0-SX101"]["dir"], facts["MDAB1-SX101"]["dir"]
    (d1 / "SX101.WAV").write_bytes(b"")                            # zero-byte audio
    (d1 / "SI1200.TXT").write_text("0 100\n")                      # empty transcript
    (d2 / "SX101.TXT").unlink()                                     # audio without transcript
    (d2 / "SI1200.WAV").unlink()                                    # transcript without audio
    write(d2 / "SX102.WAV", sphere.encode(facts["MDAB1-SX101"]["x"], byte_format="10",
                                          sample_coding="pcm,embedded-shorten-v2.00"))
    write(d2 / "SX102.TXT", "0 10 Compressed.\n")
    write(d2 / "SX103.WAV", sphere.encode(facts["MDAB1-SX101"]["x"]))
    write(d2 / "SX103.TXT", b"0 10 Caf\xe9.\n")                    # not UTF-8
    out = tmp_path / "out"
    s = run_ingest("timit", str(base), str(out), IngestOptions(include_sa=True), echo=False)
    assert s.rows_in == s.ingested + s.quarantined == 8
    assert reasons_by_id(out) == {
        "FCJF0-SX101": "empty_file", "FCJF0-SI1200": "empty_transcript", "MDAB1-SX101": "missing_transcript",
        "MDAB1-SI1200": "missing_audio", "MDAB1-SX102": "sphere_shorten", "MDAB1-SX103": "transcript_not_utf8"}
    assert s.ingested == 2 and s.quarantined == 6       # the SA1 of both speakers are fine


def test_unusable_input_is_a_usage_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    libri = tmp_path / "LibriSpeech" / "dev-clean" / "1" / "2"
    write(libri / "1-2-0000.flac", flac())
    write(libri / "1-2.trans.txt", "1-2-0000 HELLO\n")
    cases = [("imagenet", tmp_path / "missing", "does not exist"),
             ("imagenet", empty, "no image files"),
             ("librispeech", empty, "no transcripts"),
             ("timit", tmp_path / "LibriSpeech", "no TIMIT utterance files"),
             ("imagenet", tmp_path / "LibriSpeech", "no image files"),
             ("hf", empty, "no save_to_disk folder"),
             ("manifest", empty, "no .csv/.jsonl manifest"),
             ("audioset", empty, "unknown ingest kind")]
    for kind, path, msg in cases:
        with pytest.raises(UsageError, match=msg):
            plan_ingest(kind, str(path), str(tmp_path / "out"), IngestOptions())
    # every row unusable: still a usage error, nothing written
    write(empty / "LibriSpeech" / "dev-clean" / "1" / "2" / "1-2.trans.txt", "1-2-0000 HELLO\n")
    with pytest.raises(UsageError, match="missing_audio"):
        plan_ingest("librispeech", str(empty), str(tmp_path / "out"), IngestOptions())
    with pytest.raises(UsageError, match="--phones"):
        IngestOptions(phones=40).validate()
    assert not (tmp_path / "out").exists()


def test_cli_exit_codes(ray_session, tmp_path, capsys):
    clean = tmp_path / "clean"
    imagenet_train(clean, per_class=1)
    assert main(["ingest", "imagenet", str(clean), "--out", str(tmp_path / "o1")]) == 0
    assert "ingested" in capsys.readouterr().out
    assert Manifest.read(str(tmp_path / "o1")).to_dict()["ingested"] == 3

    dirty = tmp_path / "dirty"
    imagenet_train(dirty, per_class=1)
    write(dirty / "train" / "n01000001" / "broken.JPEG", b"\0\0\0garbage")
    assert main(["ingest", "imagenet", str(dirty), "--out", str(tmp_path / "o2"), "--shard-mb", "1"]) == 3
    out = capsys.readouterr().out
    assert "quarantined" in out and "not_an_image" in out

    assert main(["ingest", "timit", str(clean), "--out", str(tmp_path / "o3")]) == 2
    assert "no TIMIT utterance files" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


def test_make_shards_bounded_ordered_and_local():
    rng = __import__("random").Random(0)
    samples = [common.Sample(key=f"k{i:05d}", sample_id=str(i), nbytes=rng.randint(50, 150)) for i in range(3000)]
    shards = common.make_shards(samples, shard_bytes=10_000)
    assert [s.sample_id for g in shards for s in g] == [str(i) for i in range(3000)]      # order kept
    assert all(sum(s.nbytes for s in g) <= 10_000 for g in shards)
    assert 20 <= len(shards) <= 60                                                        # ~300 KB / (5-10 KB)
    # one file changes size: only the groups around it change
    changed = [common.Sample(**{**s.to_dict(), "nbytes": 149 if s.sample_id == "1500" else s.nbytes})
               for s in samples]
    before = {tuple(s.sample_id for s in g) for g in shards}
    after = {tuple(s.sample_id for s in g) for g in common.make_shards(changed, shard_bytes=10_000)}
    assert len(after - before) <= 3
    # small inputs: at least min_shards groups; row cap respected; one sample, one group
    small = samples[:10]
    assert len(common.make_shards(small, shard_bytes=1e9, min_shards=4)) >= 4
    assert max(len(g) for g in common.make_shards(samples, shard_bytes=1e9, shard_rows=7)) <= 7
    assert len(common.make_shards(samples[:1], shard_bytes=1e9, min_shards=4)) == 1
