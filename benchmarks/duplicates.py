"""Scale of `mmbatch duplicates`: the same Ray pipeline on synthetic signatures.

    python -m benchmarks.duplicates                 # 50,000 and 200,000 rows (an image and a text each)
    python -m benchmarks.duplicates --repeat 2      # each size twice, interleaved; the faster run counts
    python -m benchmarks.duplicates --rows 10000 40000 --out benchmarks/results/duplicates_small
    python -m benchmarks.duplicates --accuracy      # recall and false pairs on the planted corpus (real media);
                                                    # rewrites mmbatch/dedup/heldout_curve.json

The issue allows synthetic signatures for the scale figure (the accuracy figures
use real media: tests/test_dedup_accuracy.py, docs/duplicates.md). Each Ray
signature task makes one shard of 10,000 rows: unit image embeddings of the real
signature's size, a MinHash of 12-18 shingle hashes per text (same banding and
verification as real text), exact copies (1 %) and near copies (3 %, pointing at
rows of any shard). Verification thumbnails are made on demand from the row's
origin, so memory stays flat. Everything after the signatures is the command's
own code: exact groups, candidates (k-means inverted lists, MinHash banding), verify tasks on
Ray, summary. Writes JSON and markdown under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from mmbatch.dedup import run as drun
from mmbatch.dedup import signatures as sig

SHARD_ROWS = 10_000
NEAR_EVERY = 33          # row i with i % 33 == 1 is a near copy of an earlier row
EXACT_EVERY = 100        # row i with i % 100 == 2 is an exact copy of an earlier row
PRIME = np.uint64((1 << 61) - 1)
EMB_DIM = sig.IMAGE_DCT ** 2 - 1     # the real image embedding's size
WORK_PHASES = ("signatures", "exact", "candidates", "verify")
SHIPPED_CURVES = Path(drun.__file__).with_name("heldout_curve.json")


def origin(i: np.ndarray) -> np.ndarray:
    """The row each row copies (itself for originals)."""
    i = np.asarray(i, np.int64)
    src = ((i * 2654435761) >> 9) % np.maximum(i, 1)       # a pseudo-random earlier row
    copy = ((i % NEAR_EVERY) == 1) | ((i % EXACT_EVERY) == 2)
    return np.where(copy & (i > 0), src, i)


def image_embedding(i: int) -> np.ndarray:
    o = int(origin(i))
    v = np.random.default_rng(o).normal(size=EMB_DIM)
    if o != i and i % EXACT_EVERY != 2:
        v = v + 0.1 * np.random.default_rng(i).normal(size=EMB_DIM)
    return v / np.linalg.norm(v)


CHROMA_GREY = np.zeros((sig.CHROMA, sig.CHROMA, 2), np.float16)      # the colour payload of a grey image


class LazyThumbs:
    """Verification payloads made when asked for: a thumbnail of noise seeded by the row's origin
    (+ a little noise of its own for a near copy), and a grey image's chroma."""

    def __init__(self, first: int, n: int):
        self.first, self.n = first, n

    def __getitem__(self, slot: int) -> np.ndarray:
        i = self.first + slot
        o = int(origin(i))
        t = np.random.default_rng(o).normal(size=(sig.THUMB, sig.THUMB))
        if o != i and i % EXACT_EVERY != 2:
            t = t + 0.05 * np.random.default_rng(i).normal(size=t.shape)
        return t.astype(np.float16), CHROMA_GREY


class Payloads:
    def __init__(self, thumbs: LazyThumbs, shingles: list):
        self.thumbs, self.shingles = thumbs, shingles

    def __getitem__(self, slot: int):
        n = self.thumbs.n
        return self.thumbs[slot] if slot < n else self.shingles[slot - n]


def shingles_of(i: int) -> np.ndarray:
    o = int(origin(i))
    rng = np.random.default_rng(10**9 + o)
    s = rng.integers(0, 2**32, size=int(rng.integers(12, 19)), dtype=np.uint64)
    if o != i and i % EXACT_EVERY != 2:
        s[len(s) // 2] = np.random.default_rng(i).integers(0, 2**32)      # one word edited
    return np.unique(s).astype(np.uint32)


def minhash(sh: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash values of one shingle set under datasketch's affine32 permutations (a, b)."""
    h = ((a[None, :] * sh.astype(np.uint64)[:, None] + b[None, :]) % PRIME) & np.uint64(0xFFFFFFFF)
    return h.min(axis=0).astype(np.uint32)


def synthetic_signatures(shard) -> tuple[pa.Table, Payloads]:
    """One synthetic shard's signature table and payloads (the shape of run.shard_signatures')."""
    from datasketch import MinHash

    k = int(shard.path)
    first, n = k * SHARD_ROWS, SHARD_ROWS
    idx = np.arange(first, first + n)
    a, b = (np.asarray(x, np.uint64) for x in MinHash(num_perm=sig.NUM_PERM, seed=1).permutations)
    sh = [shingles_of(int(i)) for i in idx]
    mh = np.stack([minhash(s, a, b) for s in sh])
    exact = origin(idx)
    keys = [f"i{o}" if i % EXACT_EVERY == 2 or o == i else f"i{i}" for i, o in zip(idx, exact)]
    tkeys = [f"t{o}" if i % EXACT_EVERY == 2 or o == i else f"t{i}" for i, o in zip(idx, exact)]
    emb = np.stack([image_embedding(int(i)) for i in idx]).astype(np.float32)
    ids = [f"s{i:07d}" for i in idx]
    splits = ["test" if i % 5 == 0 else "train" for i in idx]
    table = pa.table({
        "row": np.r_[np.arange(n), np.arange(n)], "sample_id": ids * 2, "split": splits * 2,
        "modality": ["image"] * n + ["text"] * n, "exact": keys + tkeys,
        "emb": pa.array(list(emb) + [None] * n, pa.list_(pa.float32())),
        "minhash": pa.array([None] * n + list(mh), pa.list_(pa.uint32())),
    }, schema=drun.SIG_SCHEMA)
    return table, Payloads(LazyThumbs(first, n), sh)


def measure(rows: int) -> dict:
    shards = [drun.Shard("synthetic", "memory://", str(k)) for k in range(rows // SHARD_ROWS)]
    t0 = time.perf_counter()
    res = drun.find_duplicates(shards, synthetic_signatures)
    pairs, summary = res.pairs, res.summary
    seconds = time.perf_counter() - t0
    mods = summary["modalities"]
    return {"rows": rows, "seconds": round(seconds, 3), "phases": summary["seconds"], "pairs": pairs.num_rows,
            **{f"{m}_{k}": mods[m][k] for m in ("image", "text") for k in ("exact", "near")}}


def run_one(rows: int, num_cpus: int | None) -> dict:
    """One size in a fresh process, as the command runs: Ray's start is part of the time."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "benchmarks.duplicates", "--one", str(rows)]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def labelled(corpus, res, modality: str, shards, issue_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(signals of every verified candidate pair of ``modality``, 1 where both rows descend from the
    same original) of one run on a planted corpus; ``issue_only``: only the pairs whose rows are
    originals, exact copies, look-alikes or the copies #35 lists (the tuning corpus also holds
    harsher ones: half size, x1.2 brightness, 8 kHz, OGG)."""
    from benchmarks import dedup_corpus as tc

    sc = res.scored.get(modality)
    if sc is None or not len(sc["a"]):
        return np.empty((0, 1)), np.empty(0, bool)
    ids = sc["ids"].to_pylist()
    ds = [shards[int(k)].dataset for k in sc["shard"]]
    o = [corpus.origin[(ds[i], ids[i], modality)] for i in range(len(ids))]
    kinds = [corpus.kinds[(ds[i], ids[i], modality)] for i in range(len(ids))]
    harsher = (set(tc.IMAGE_TRANSFORMS) | set(tc.AUDIO_TRANSFORMS)) - set(tc.ISSUE_IMAGE) - set(tc.ISSUE_AUDIO)
    ok = np.array([not (issue_only and k in harsher) for k in kinds], bool)
    keep = ok[sc["a"]] & ok[sc["b"]]
    pos = np.array([o[a] == o[b] for a, b in zip(sc["a"], sc["b"])], bool)
    return sc["signals"][keep], pos[keep]


TUNE_RECALL = 0.99        # the tuned threshold keeps this share of the tuning corpus's true pairs


def tune_threshold(score: np.ndarray, positive: np.ndarray, recall: float = TUNE_RECALL) -> float:
    """The highest threshold that keeps ``recall`` of the true pairs among the scored candidates,
    rounded down to 3 decimals. Set by the copies alone: copies are made by a few
    transformations and score alike in any corpus, while how close the look-alikes come depends
    on what a corpus holds (a threshold halfway to the tuning corpus's look-alikes let in the
    held-out corpus's)."""
    pos = np.sort(score[positive])
    if not len(pos):
        return float("nan")
    k = int(np.floor((1.0 - recall) * len(pos)))
    return float(np.floor(pos[k] * 1000) / 1000)


FINE_FROM = 0.5          # the curve's thresholds: every 0.001 from 1 down to here, every 0.01 below


def curve_grid(low: float) -> np.ndarray:
    """The thresholds of a curve, descending: every 0.001 from 1 down to FINE_FROM, then every 0.01,
    down to the first at or under ``low``."""
    lo = int(np.floor(low * 1000))
    fine_to = int(FINE_FROM * 1000)
    milli = list(range(1000, max(lo, fine_to) - 1, -1))
    if lo < fine_to:
        milli += list(range(fine_to - 10, 10 * (lo // 10) - 1, -10))
    return np.array(milli) / 1000


def pr_curve(score: np.ndarray, positive: np.ndarray, threshold: float, corpus: str) -> dict:
    """Precision and recall of the verified candidate pairs (``score``; ``positive``: a true pair) at
    each threshold of :func:`curve_grid` down to the lowest score (precision 1.0 where no candidate
    is in); exact at any threshold on the grid (thresholds are given to 3 decimals). Values rounded
    to 4 decimals, so the package can ship the table (heldout_curve.json)."""
    score = np.asarray(score, float)
    grid = curve_grid(min(float(score.min()) if len(score) else 1.0, threshold))
    every, true = np.sort(score), np.sort(score[np.asarray(positive, bool)])
    n_in = len(every) - np.searchsorted(every, grid, "left")
    tp = len(true) - np.searchsorted(true, grid, "left")
    precision = np.where(n_in > 0, tp / np.maximum(n_in, 1), 1.0)
    recall = tp / max(1, len(true))
    return {"thresholds": grid.round(3).tolist(), "precision": precision.round(4).tolist(),
            "recall": recall.round(4).tolist(), "threshold": threshold, "corpus": corpus,
            "candidates": len(every), "true_pairs": len(true)}


def write_shipped_curves(curves: dict, path: Path = SHIPPED_CURVES) -> None:
    """The held-out corpus's curves (modality -> :func:`pr_curve`) as the package's
    heldout_curve.json, which every report.html of `mmbatch duplicates` draws."""
    head = {"corpus": "held-out objects corpus of benchmarks/duplicates.py --accuracy",
            "made_by": "python -m benchmarks.duplicates --accuracy"}
    body = ",\n".join(f"  {json.dumps(m)}: {json.dumps(c)}" for m, c in curves.items())     # a line a modality
    path.write_text(json.dumps(head, indent=1)[:-2] + ',\n "modalities": {\n' + body + "\n }\n}\n")


def run_corpus(generator: str, sizes: tuple, root: Path, thresholds: dict | None):
    """Build one corpus and run the command's pipeline on it: (corpus, shards, result)."""
    from benchmarks import dedup_corpus as tc

    corpus = tc.build_corpus(root / generator, images=sizes[0], audio=sizes[1], texts=sizes[2], generator=generator)
    shards = drun.list_shards(list(corpus.paths.values()))
    res = drun.find_duplicates(shards, drun.shard_signatures, thresholds=thresholds)
    return corpus, shards, res


def accuracy(tune_sizes: tuple, held_sizes: tuple, out: Path) -> dict:
    """Thresholds tuned on the ``shapes`` corpus, then recall, false pairs and the leakage quarantine
    on both; the held-out (``objects``) run's precision/recall curves are (re)written to the
    package's mmbatch/dedup/heldout_curve.json, and the run writes its report.html."""
    import tempfile

    from benchmarks import dedup_corpus as tc

    doc = {"benchmark": "duplicates-accuracy", "corpora": {}}
    with tempfile.TemporaryDirectory() as tmp:
        corpus, shards, res = run_corpus("shapes", tune_sizes, Path(tmp), None)
        tuned = {}
        for m in drun.THRESHOLDS:
            sg, pos = labelled(corpus, res, m, shards, issue_only=True)
            tuned[m] = tune_threshold(sg[:, -1], pos) if len(pos) and pos.any() else drun.THRESHOLDS[m]
        tuned_res = drun.find_duplicates(shards, drun.shard_signatures, thresholds=tuned)
        doc["tuned_thresholds"] = tuned
        doc["corpora"]["shapes (tuning)"] = _corpus_doc(corpus, tc.score(corpus, tuned_res.groups), tune_sizes, res)
        doc["corpora"]["objects (held out)"] = held_out(held_sizes, tuned, Path(tmp), out)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    lines = accuracy_lines(doc, tune_sizes, held_sizes)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return doc


def held_out(sizes: tuple, tuned: dict, tmp: Path, out: Path) -> dict:
    """The held-out (``objects``) corpus run with the ``tuned`` thresholds: its figures; its
    precision/recall curves (re)written to the package's heldout_curve.json, and its outputs with
    report.html under ``<out>_heldout``."""
    from benchmarks import dedup_corpus as tc

    corpus, shards, res = run_corpus("objects", sizes, tmp, tuned)
    curves = {}
    for m in drun.THRESHOLDS:
        sg, pos = labelled(corpus, res, m, shards)
        if len(pos):
            curves[m] = pr_curve(sg[:, -1], pos, tuned[m], "held-out objects corpus")
    write_shipped_curves(curves)
    out.parent.mkdir(parents=True, exist_ok=True)
    drun.write_outputs(str(out.parent / (out.name + "_heldout")), res, shards, curves)
    return _corpus_doc(corpus, tc.score(corpus, res.groups), sizes, res)


def _corpus_doc(corpus, score: dict, sizes: tuple, res) -> dict:
    return {"originals": dict(zip(("images", "audio", "texts"), sizes)), "rows": corpus.rows, "score": score,
            "seconds": res.summary["seconds"]}


def accuracy_lines(doc: dict, tune_sizes, held_sizes) -> list[str]:
    tuned = ", ".join(f"{m} {t:.3f}" for m, t in doc["tuned_thresholds"].items())
    lines = [f"Thresholds tuned on the shapes corpus (the true pairs of #35's kinds of copies, recall "
             f"{TUNE_RECALL}): {tuned}; the held-out run uses them.", ""]
    for name, c in doc["corpora"].items():
        s = c["score"]
        lk = s["leakage"]
        lines += [f"**{name}**: {c['rows']} rows (originals: {c['originals']}).", "",
                  "| modality | exact pairs | exact recall | near pairs | near recall | false pairs |",
                  "|---|---:|---:|---:|---:|---:|"]
        for m, r in s["modalities"].items():
            lines.append(f"| {m} | {r['exact_pairs']} | {r['exact_recall']:.3f} | {r['near_pairs']} | "
                         f"{r['near_recall']:.3f} | {r['false_pairs']} |")
        lines += ["", f"Rows in false pairs: {s['rows_in_false_pairs']} of {s['rows']} "
                  f"({100 * s['false_row_fraction']:.2f} %). Leakage quarantine: {lk['caught']} of "
                  f"{lk['planted_test_rows']} planted test rows caught ({lk['caught_fraction']:.3f}), "
                  f"{lk['other_rows_taken']} other rows taken.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000])
    p.add_argument("--out", default="benchmarks/results/duplicates")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded Ray (default: all)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each size, interleaved (noisy machines); the fastest of each size counts")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)     # the child process
    p.add_argument("--accuracy", action="store_true", help="score the planted corpus instead of timing")
    p.add_argument("--corpus", type=int, nargs=3, default=[64, 24, 120], metavar=("IMAGES", "AUDIO", "TEXTS"),
                   help="originals per modality of the tuning (shapes) corpus (--accuracy)")
    p.add_argument("--heldout", type=int, nargs=3, default=[100, 40, 120], metavar=("IMAGES", "AUDIO", "TEXTS"),
                   help="originals per modality of the held-out (objects) corpus (--accuracy)")
    args = p.parse_args(argv)
    if args.accuracy:
        from mmbatch.engine.runtime import init_ray, shutdown_ray

        init_ray(num_cpus=args.num_cpus)
        try:
            accuracy(tuple(args.corpus), tuple(args.heldout), Path(args.out + "_accuracy"))
        finally:
            shutdown_ray()
        return 0
    if args.one:
        from mmbatch.engine.runtime import init_ray, shutdown_ray

        t0 = time.perf_counter()
        init_ray(num_cpus=args.num_cpus)
        try:
            r = measure(args.one)
        finally:
            shutdown_ray()
        r["seconds_with_ray_start"] = round(time.perf_counter() - t0, 3)
        print(json.dumps(r))
        return 0
    key = "seconds_with_ray_start"
    runs = []
    for _ in range(args.repeat):
        for n in args.rows:
            runs.append(run_one(n, args.num_cpus))
            print(json.dumps(runs[-1]), flush=True)
    results = [min((r for r in runs if r["rows"] == n), key=lambda r: r[key]) for n in args.rows]
    ratio = results[-1][key] / results[0][key] if len(results) > 1 else None
    work = [sum(r["phases"][k] for k in WORK_PHASES) for r in results]
    rows_ratio = results[-1]["rows"] / results[0]["rows"] if len(results) > 1 else None
    doc = {"benchmark": "duplicates", "machine": platform.platform(), "cpus": os.cpu_count(),
           "results": results, "runs": runs, "time_ratio": ratio, "rows_ratio": rows_ratio,
           "work_ratio": work[-1] / work[0] if len(work) > 1 else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    lines = ["| rows | command s (with Ray start) | signatures | exact groups | candidates | verify | image exact | "
             "image near | text exact | text near |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['rows']:,} | {r[key]:.1f} | {r['phases']['signatures']:.1f} | {r['phases']['exact']:.1f} | "
              f"{r['phases']['candidates']:.1f} | {r['phases']['verify']:.1f} | {r['image_exact']:,} | "
              f"{r['image_near']:,} | {r['text_exact']:,} | {r['text_near']:,} |" for r in results]
    if ratio:
        lines.append(f"\n{rows_ratio:.0f}x the rows: {ratio:.2f}x the command's time, {doc['work_ratio']:.2f}x the "
                     f"time of signatures + exact groups + candidates + verify ({os.cpu_count()} CPUs; "
                     f"the fastest of {args.repeat} interleaved run(s) of each size).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
