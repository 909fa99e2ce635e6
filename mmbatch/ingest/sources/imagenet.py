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


def _group_by_split(images: list[str], default_split: str | None) -> tuple[str | None, dict, str, dict[str, int]]:
    """(data root prefix, {split: [(rel, rest parts)]}, layout, skipped counts) of the image list."""
    prefix, by_split, stray = _split_layout(images)
    if prefix is None:  # the input is a class-folder tree itself
        return None, {default_split or "train": [(r, r.split("/")) for r in images]}, "class-folders", {}
    return prefix, by_split, "splits", ({"images_outside_layout": len(stray)} if stray else {})


def _class_list(by_split: dict, names: dict[str, str], meta_words: dict[str, str]) -> list[str]:
    """The class list, in this order of preference: the train folders; Kaggle's synset mapping; the
    devkit's leaf synsets (what torchvision's ImageNet does for a val-only download); val folders."""
    train_wnids = sorted({rest[0] for rel, rest in by_split.get("train", []) if len(rest) >= 2})
    if train_wnids:
        return train_wnids
    if names:
        return sorted(names)
    if meta_words:
        return sorted(meta_words)
    return sorted({rest[0] for items in by_split.values() for _, rest in items if len(rest) >= 2})


def _devkit_val_labels(flat_val: list, ids: list[int], meta: dict[int, tuple[str, str]]) -> dict[str, str]:
    """{stem: wnid} of flat val images from the devkit ground truth (ILSVRC2012_IDs in val order)."""
    out = {}
    for pos, (rel, _) in enumerate(sorted(flat_val, key=lambda x: x[0]), start=1):
        n = val_index(stem(rel)) or pos
        if 1 <= n <= len(ids) and ids[n - 1] in meta:
            out[stem(rel)] = meta[ids[n - 1]][0]
    return out


def _missing_val_label(source: str | None, gt_rel: str | None) -> str:
    """Why a flat val image has no label."""
    if source:
        return "no label in " + source
    return (f"flat val image with no label file: need {VAL_SOLUTION} or the devkit {DEVKIT_GROUND_TRUTH} + "
            f"{DEVKIT_META}" + (" (ground truth found, meta.mat missing)" if gt_rel else ""))


def _image_sample(split: str, rel: str, rest: list[str], e: common.Entry, val_labels: dict[str, str],
                  missing_detail: str | None, index: dict[str, int], classes: list[str],
                  label_name) -> Sample | Problem:
    """The sample of one image, or the problem that keeps it out."""
    sid = stem(rel)
    wnid = None
    if len(rest) >= 2:
        wnid = rest[0]
    elif split == "validation":
        wnid = val_labels.get(sid)
        if wnid is None:
            return Problem(common.MISSING_LABEL, missing_detail, path=rel, sample_id=sid)
    elif split != "test":
        return Problem(common.MISSING_LABEL, "image is not inside a class folder", path=rel, sample_id=sid)
    if wnid is not None and wnid not in index:
        return Problem(common.UNKNOWN_LABEL, f"class {wnid!r} is not among the "
                       f"{len(classes)} known classes", path=rel, sample_id=sid)
    return Sample(
        key=rel, sample_id=sid, split=split,
        label=index[wnid] if wnid is not None else None,
        label_name=label_name(wnid) if wnid is not None else None,
        wnid=wnid, files={"image": rel}, nbytes=e.size, stamp=common.stamp(e))


def plan(uri: str, opts, exclude=()) -> Plan:
    fs, root = common.resolve_root(uri)
    listing = common.list_tree(fs, root, allow_outside=opts.allow_outside, exclude=exclude)
    files = listing.files
    images = sorted(r for r in files if is_image(r))
    if not images:
        raise UsageError(f"imagenet: no image files (.JPEG/.jpg/.png...) found under {uri!r}; "
                         "is this an ImageNet-style folder (train/<wnid>/*.JPEG)?")
    problems = common.listing_problems(listing, lambda r: stem(r) if is_image(r) else None)
    prefix, by_split, layout, skipped = _group_by_split(images, opts.split)

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
    classes = _class_list(by_split, names, meta_words)
    index = label_indices(classes)

    val_labels: dict[str, str] = {}
    val_label_source = missing_detail = None
    if flat_val:
        if sol_rel:
            val_labels = parse_val_solution(read(sol_rel).decode("utf-8-sig", "replace"))
            val_label_source = sol_rel
        elif gt_rel and meta_rel:
            ids = parse_ground_truth(read(gt_rel).decode("ascii", "replace"))
            val_labels = _devkit_val_labels(flat_val, ids, meta)
            val_label_source = f"{gt_rel} + {meta_rel}"
        missing_detail = _missing_val_label(val_label_source, gt_rel)

    def label_name(w: str) -> str:
        return names.get(w) or meta_words.get(w) or w

    samples: list[Sample] = []
    for split, items in sorted(by_split.items()):
        for rel, rest in items:
            got = _image_sample(split, rel, rest, files[rel], val_labels, missing_detail, index, classes, label_name)
            (problems if isinstance(got, Problem) else samples).append(got)

    info = {"layout": layout, "data_root": prefix, "classes": classes,
            "label_names": [label_name(w) for w in classes], "val_labels": val_label_source}
    return Plan(kind=KIND, uri=uri, root=root, samples=samples, problems=problems, skipped=skipped, info=info)


# --- reading --------------------------------------------------------------------------------
def build_row(s: Sample, blobs: dict, options: dict) -> dict:
    row = common.empty_row(KIND, s)
    image, facts = common.image_fields(blobs["image"], s.files["image"])
    row["image"] = image
    return common.finish_extra(row, {**s.extra, **facts})
