"""ImageNet (ILSVRC2012) and any class-folder image tree.

Layouts understood (``INPUT`` is the folder holding ``train``/``val``, the
Kaggle root holding ``ILSVRC/Data/CLS-LOC``, or a class-folder tree itself):

- ``train/<wnid>/*.JPEG``: label = index of the wnid in **sorted** order over
  the train wnids (torchvision ``ImageFolder``, HF ``imagefolder`` and
  ``imagenet-1k`` agree);
- ``val/<wnid>/*`` (foldered), or flat ``val/ILSVRC2012_val_*.JPEG`` labelled
  by Kaggle ``LOC_val_solution.csv`` or by the devkit
  ``data/ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat`` (its
  ILSVRC2012_IDs are *not* sorted-wnid order: they are mapped to wnids first);
- ``test/`` flat images are ingested unlabelled.

The class list (label = index in sorted-wnid order) comes from the train folders, else
``LOC_synset_mapping.txt``, else the devkit ``meta.mat``'s leaf synsets (``num_children == 0``:
the 1,000 ILSVRC2012 classes; a val-only download with the devkit, as torchvision's ``ImageNet``
reads it), else foldered val. ``label_name`` comes from ``LOC_synset_mapping.txt`` (else meta.mat
words, else the wnid). ``sample_id`` is the file stem; the image bytes are stored as-is.
"""
from __future__ import annotations

import csv
import io
import posixpath
import re
from collections import Counter

from mmbatch.errors import UsageError
from mmbatch.schema import label_indices
from mmbatch.ingest.sources import common
from mmbatch.ingest.sources.common import Plan, Problem, Sample

KIND = "imagenet"
SPLIT_DIRS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
_VAL_NUMBER = re.compile(r"_val_(\d+)$", re.IGNORECASE)


# --- pure parsers -------------------------------------------------------------------
def parse_synset_mapping(text: str) -> dict[str, str]:
    """``n01440764 tench, Tinca tinca`` lines -> {wnid: name}."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if parts:
            out[parts[0]] = parts[1].strip() if len(parts) > 1 else parts[0]
    return out


def parse_val_solution(text: str) -> dict[str, str]:
    """Kaggle ``LOC_val_solution.csv`` -> {ImageId: wnid} (the first token of PredictionString)."""
    out = {}
    for row in csv.DictReader(io.StringIO(text)):
        image_id = (row.get("ImageId") or "").strip()
        pred = (row.get("PredictionString") or "").split()
        if image_id and pred:
            out[image_id] = pred[0]
    return out


def parse_ground_truth(text: str) -> list[int]:
    """Devkit ground truth: one ILSVRC2012_ID per line, in val file order."""
    return [int(x) for x in text.split()]


def parse_meta_mat(data: bytes) -> dict[int, tuple[str, str]]:
    """Devkit ``meta.mat`` -> {ILSVRC2012_ID: (wnid, words)} for the leaf synsets."""
    import numpy as np
    import scipy.io

    m = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)
    syn = np.atleast_1d(m["synsets"]).ravel()
    names = syn.dtype.names or ()
    out: dict[int, tuple[str, str]] = {}
    for rec in syn:
        if "num_children" in names and int(np.asarray(rec["num_children"]).ravel()[0]) != 0:
            continue
        sid = int(np.asarray(rec["ILSVRC2012_ID"]).ravel()[0])
        wnid = str(np.asarray(rec["WNID"]).ravel()[0])
        words = str(np.asarray(rec["words"]).ravel()[0]) if "words" in names else wnid
        out[sid] = (wnid, words)
    return out


def val_index(stem: str) -> int | None:
    """1-based position of ``ILSVRC2012_val_00000042`` in the ground truth (42), else None."""
    m = _VAL_NUMBER.search(stem)
    return int(m.group(1)) if m else None


def is_image(rel: str) -> bool:
    return rel.lower().endswith(common.IMAGE_EXTS)


def stem(rel: str) -> str:
    return posixpath.splitext(posixpath.basename(rel))[0]


# --- planning -------------------------------------------------------------------------
def _find_named(files: dict, name: str) -> str | None:
    hits = [r for r in files if posixpath.basename(r) == name]
    return min(hits, key=lambda r: (r.count("/"), r)) if hits else None


def _split_layout(images: list[str]) -> tuple[str | None, dict[str, list[tuple[str, list[str]]]], list[str]]:
    """Find the data root (the prefix holding train/val/test) and group images by split dir.

    Returns (prefix or None when there is no split dir at all, {split: [(rel, rest parts)]},
    images outside the chosen prefix).
    """
    located = []
    for rel in images:
        parts = rel.split("/")
        for i, p in enumerate(parts[:-1]):
            if p.lower() in SPLIT_DIRS:
                located.append((rel, "/".join(parts[:i]), SPLIT_DIRS[p.lower()], parts[i + 1:]))
                break
    if not located:
        return None, {}, []
    prefix = Counter(x[1] for x in located).most_common(1)[0][0]
    by_split: dict[str, list] = {}
    inside = set()
    for rel, pre, split, rest in located:
        if pre == prefix:
            by_split.setdefault(split, []).append((rel, rest))
            inside.add(rel)
    return prefix, by_split, [r for r in images if r not in inside]


def plan(uri: str, opts, exclude=()) -> Plan:
    fs, root = common.resolve_root(uri)
    listing = common.list_tree(fs, root, allow_outside=opts.allow_outside, exclude=exclude)
    files = listing.files
    images = sorted(r for r in files if is_image(r))
    if not images:
        raise UsageError(f"imagenet: no image files (.JPEG/.jpg/.png...) found under {uri!r}; "
                         "is this an ImageNet-style folder (train/<wnid>/*.JPEG)?")
    problems = common.listing_problems(listing, lambda r: stem(r) if is_image(r) else None)
    skipped: dict[str, int] = {}

    prefix, by_split, stray = _split_layout(images)
    if prefix is None:  # the input is a class-folder tree itself
        default_split = opts.split or "train"
        by_split = {default_split: [(r, r.split("/")) for r in images]}
        layout = "class-folders"
    else:
        layout = "splits"
        if stray:
            skipped["images_outside_layout"] = len(stray)

    def read(rel: str) -> bytes:
        with fs.open(posixpath.join(root, rel), "rb") as f:
            return f.read()

    mapping_rel = _find_named(files, SYNSET_MAPPING)
    names: dict[str, str] = parse_synset_mapping(read(mapping_rel).decode("utf-8", "replace")) if mapping_rel else {}

    # flat validation images are labelled by Kaggle's LOC_val_solution.csv or the devkit's ground truth + meta.mat
    flat_val = [(rel, rest) for rel, rest in by_split.get("validation", []) if len(rest) == 1]
    sol_rel = _find_named(files, VAL_SOLUTION) if flat_val else None
    gt_rel = _find_named(files, DEVKIT_GROUND_TRUTH) if flat_val else None
    meta_rel = _find_named(files, DEVKIT_META) if flat_val else None
    meta = parse_meta_mat(read(meta_rel)) if meta_rel else {}
    meta_words = {w: words for w, words in meta.values()}

    # the class list, in this order of preference: the train folders; Kaggle's synset mapping; the
    # devkit's leaf synsets (what torchvision's ImageNet does for a val-only download); val folders
    train_wnids = sorted({rest[0] for rel, rest in by_split.get("train", []) if len(rest) >= 2})
    if train_wnids:
        classes = train_wnids
    elif names:
        classes = sorted(names)
    elif meta:
        classes = sorted(meta_words)
    else:
        classes = sorted({rest[0] for items in by_split.values() for _, rest in items if len(rest) >= 2})
    index = label_indices(classes)

    val_labels: dict[str, str] = {}
    val_label_source = None
    if flat_val:
        if sol_rel:
            val_labels = parse_val_solution(read(sol_rel).decode("utf-8-sig", "replace"))
            val_label_source = sol_rel
        elif gt_rel and meta_rel:
            ids = parse_ground_truth(read(gt_rel).decode("ascii", "replace"))
            ordered = sorted(flat_val, key=lambda x: x[0])
            for pos, (rel, _) in enumerate(ordered, start=1):
                n = val_index(stem(rel)) or pos
                if 1 <= n <= len(ids) and ids[n - 1] in meta:
                    val_labels[stem(rel)] = meta[ids[n - 1]][0]
            val_label_source = f"{gt_rel} + {meta_rel}"
        missing_detail = ("no label in " + val_label_source) if val_label_source else \
            (f"flat val image with no label file: need {VAL_SOLUTION} or the devkit {DEVKIT_GROUND_TRUTH} + "
             f"{DEVKIT_META}" + (" (ground truth found, meta.mat missing)" if gt_rel else ""))

    def label_name(w: str) -> str:
        return names.get(w) or meta_words.get(w) or w

    samples: list[Sample] = []
    for split, items in sorted(by_split.items()):
        for rel, rest in items:
            e = files[rel]
            sid = stem(rel)
            wnid = None
            if len(rest) >= 2:
                wnid = rest[0]
            elif split == "validation":
                wnid = val_labels.get(sid)
                if wnid is None:
                    problems.append(Problem(common.MISSING_LABEL, missing_detail, path=rel, sample_id=sid))
                    continue
            elif split != "test":
                problems.append(Problem(common.MISSING_LABEL, "image is not inside a class folder",
                                        path=rel, sample_id=sid))
                continue
            if wnid is not None and wnid not in index:
                problems.append(Problem(common.UNKNOWN_LABEL, f"class {wnid!r} is not among the "
                                        f"{len(classes)} known classes", path=rel, sample_id=sid))
                continue
            samples.append(Sample(
                key=rel, sample_id=sid, split=split,
                label=index[wnid] if wnid is not None else None,
                label_name=label_name(wnid) if wnid is not None else None,
                wnid=wnid, files={"image": rel}, nbytes=e.size, stamp=common.stamp(e)))

    info = {"layout": layout, "data_root": prefix, "classes": classes,
            "label_names": [label_name(w) for w in classes], "val_labels": val_label_source}
    return Plan(kind=KIND, uri=uri, root=root, samples=samples, problems=problems, skipped=skipped, info=info)


# --- reading --------------------------------------------------------------------------------
def build_row(s: Sample, blobs: dict, options: dict) -> dict:
    row = common.empty_row(KIND, s)
    image, facts = common.image_fields(blobs["image"], s.files["image"])
    row["image"] = image
    return common.finish_extra(row, {**s.extra, **facts})
