"""Groups instead of pair explosions, per-modality thresholds and the readable signals of
`mmbatch duplicates` (#35), on real generated media; no Ray (the verifier runs as plain calls)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks import dedup_corpus as tc
from mmbatch.dedup import run as drun
from mmbatch.errors import UsageError
from mmbatch.schema import CANONICAL, with_metadata

CLIPS = 5
COPIES = ("exact", "gain-6", "lead0-200", "wav22k", "combined")      # with the original: 6 a clip
LOOSE = 0.95          # copies score >= 0.97 here, the other voices <= 0.9


def local_verifier(payloads: list):
    def verify(m, sa, la, sb, lb):
        ids = sorted(set(sa.tolist()) | set(sb.tolist()))
        return drun.verify_pairs(m, sa, la, sb, lb, ids, *[payloads[i] for i in ids])
    return verify


def write(path, rows) -> drun.Shard:
    pq.write_table(pa.Table.from_pylist(rows, schema=with_metadata(CANONICAL)), str(path))
    return drun.Shard(path.parent.name, str(path.parent), str(path))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Each of 5 sentences as a train original and 5 test copies (one exact), in two shards; the
    same words from another voice (a look-alike) in train."""
    root = tmp_path_factory.mktemp("groups") / "ds"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(CLIPS):
        x, sr = tc.speak(tc.HELD_SENTENCES[i], tc.HELD_VOICES[i % 3])
        orig = tc.encode_audio(x, sr)
        rows.append({"sample_id": f"c{i}", "source": "manifest", "split": "train",
                     "audio": {"bytes": orig, "path": f"c{i}.flac"}})
        for how in COPIES:
            data = orig if how == "exact" else tc.transform_audio(x, sr, how, rng, "babble" if i % 2 else "hum")
            rows.append({"sample_id": f"c{i}-{how}", "source": "manifest", "split": "test",
                         "audio": {"bytes": data, "path": f"c{i}-{how}.wav"}})
        y, sr2 = tc.speak(tc.HELD_SENTENCES[i], tc.HELD_VOICES[3 + i % 3])
        rows.append({"sample_id": f"c{i}-voice", "source": "manifest", "split": "train",
                     "audio": {"bytes": tc.encode_audio(y, sr2), "path": f"c{i}-voice.flac"}})
    half = len(rows) // 2
    shards = [write(root / "part-00000.parquet", rows[:half]), write(root / "part-00001.parquet", rows[half:])]
    sigs = [drun.shard_signatures(s) for s in shards]
    return shards, [t for t, _ in sigs], [p for _, p in sigs]


def test_every_clip_copied_five_times_is_one_group(clips):
    shards, tables, payloads = clips
    # a threshold below the default's edge: this test is about the grouping, not the borderline copies
    pairs, groups, scored = drun.find_pairs(shards, tables, local_verifier(payloads), thresholds={"audio": LOOSE})
    g = {r["sample_id"]: r for r in groups.to_pylist()}
    assert len(g) == CLIPS * (len(COPIES) + 2)                       # every row has a group
    for i in range(CLIPS):
        members = [f"c{i}"] + [f"c{i}-{h}" for h in COPIES]
        assert {g[s]["group"] for s in members} == {g[f"c{i}"]["group"]}, i
        assert g[f"c{i}"]["first"] and g[f"c{i}"]["group_size"] == len(members)
        assert g[f"c{i}-voice"]["group"] != g[f"c{i}"]["group"] and g[f"c{i}-voice"]["group_size"] == 1
    # one pair per member after the first, each with the group's first row (not 15 pairs a group)
    recs = pairs.to_pylist()
    assert len(recs) == CLIPS * len(COPIES)
    assert all(r["a_sample_id"] == r["b_sample_id"].split("-")[0] for r in recs)
    assert all(r["group"] == g[r["a_sample_id"]]["group"] for r in recs)
    kinds = {r["b_sample_id"].split("-", 1)[1]: r["kind"] for r in recs if r["a_sample_id"] == "c0"}
    assert kinds == {"exact": "exact", **{h: "near" for h in COPIES[1:]}}
    for r in recs:                                  # which signals matched, readable per pair
        if r["kind"] == "near":
            assert r["audio_corr"] >= r["similarity"] >= LOOSE
            assert r["audio_lag_ms"] is not None and r["structure"] is None and r["text_jaccard"] is None
        else:
            assert r["similarity"] == 1.0 and r["audio_corr"] is None
    # leakage decided per group: every test copy, naming the group's train row
    leaks = drun.leaked_rows(groups)
    assert set(leaks) == {("ds", f"c{i}-{h}") for i in range(CLIPS) for h in COPIES}
    assert leaks[("ds", "c3-wav22k")] == ("test", [("audio", "ds", "c3")])
    assert len(scored["audio"]["a"]) == len(scored["audio"]["signals"]) >= CLIPS * (len(COPIES) - 1)


def test_thresholds_per_modality(clips):
    shards, tables, payloads = clips
    strict, groups, _ = drun.find_pairs(shards, tables, local_verifier(payloads), thresholds={"audio": 0.9999})
    near = [r for r in strict.to_pylist() if r["kind"] == "near"]
    assert all(r["similarity"] >= 0.9999 for r in near)          # only the gain-only copies are left
    assert len(near) < CLIPS * (len(COPIES) - 1) - 3 and strict.num_rows - len(near) == CLIPS
    assert max(groups.column("group_size").to_pylist()) < len(COPIES) + 1
    loose, _, _ = drun.find_pairs(shards, tables, local_verifier(payloads), thresholds={"audio": -1.0})
    assert loose.num_rows > CLIPS * len(COPIES)      # the other voices join once nothing is refused
    assert drun.check_thresholds({"image": 0.5})["image"] == 0.5
    assert drun.check_thresholds({"image": 0.5})["audio"] == drun.THRESHOLDS["audio"]
    with pytest.raises(UsageError, match="modalities are image, audio, text"):
        drun.check_thresholds({"video": 0.5})
    with pytest.raises(UsageError, match=r"threshold text=2.0: a number in \[-1, 1\]"):
        drun.check_thresholds({"text": 2.0})


def test_threshold_option_and_config_key(tmp_path, capsys):
    from mmbatch.cli import main
    from mmbatch.config import WorkflowError, workflow_from_dict

    assert main(["duplicates", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--threshold", "image"]) == 2
    assert "--threshold 'image': MODALITY=SCORE" in capsys.readouterr().err
    wf = workflow_from_dict({"dedup": {"leakage": "report", "thresholds": {"audio": 0.9}}})
    assert wf.dedup.thresholds == {"audio": 0.9}
    with pytest.raises(WorkflowError, match="thresholds"):
        workflow_from_dict({"dedup": {"thresholds": {"video": 0.9}}})
    with pytest.raises(WorkflowError, match=r"outside \[-1, 1\]"):
        workflow_from_dict({"dedup": {"thresholds": {"image": 3}}})


def test_tuning_rule_and_curve_in_the_report():
    """benchmarks/duplicates.py's threshold rule (keep 99 % of the true pairs) and the
    precision/recall curve that report.html draws with the threshold marked."""
    from benchmarks import duplicates as bd
    from mmbatch.dedup.report import render_report

    score = np.r_[np.linspace(0.95, 1.0, 200), np.linspace(0.2, 0.9, 50)]
    positive = np.r_[np.ones(200, bool), np.zeros(50, bool)]
    t = bd.tune_threshold(score, positive)
    assert 0.95 <= t <= score[:200][2] and (score[positive] >= t).mean() >= 0.99
    curve = bd.pr_curve(score, positive, t, "test")
    k = int(np.argmin(np.abs(np.asarray(curve["thresholds"]) - t)))
    assert curve["precision"][k] == 1.0 and curve["recall"][k] >= 0.99 and curve["recall"][-1] == 1.0
    summary = {"modalities": {}, "thresholds": drun.THRESHOLDS}
    page = render_report(drun.PAIR_SCHEMA.empty_table(), summary, [], {"image": curve})
    assert "Precision and recall" in page and page.count("data:image/png;base64,") == 1
    assert f"image {drun.THRESHOLDS['image']:.3f}" in page
