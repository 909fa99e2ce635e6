"""Small real corpora on disk for the ingest tests (real JPEG/PNG/FLAC/SPHERE bytes)."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf

from mmbatch.demo.corpus import encode_flac, encode_jpeg, make_audio, make_image
from mmbatch.ingest.sources import sphere

SR = 16000


def jpeg(seed: int = 0, c: int = 0, w: int = 40, h: int = 30) -> bytes:
    return encode_jpeg(make_image(c, np.random.default_rng(seed), width=w, height=h))


def flac(seed: int = 0, seconds: float = 0.5) -> bytes:
    return encode_flac(make_audio(seed % 2, np.random.default_rng(seed), seconds=seconds))


def riff_wav(x: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


# --- ImageNet ---------------------------------------------------------------------------
# created in this (unsorted) order on purpose; sorted order is what labels follow
WNIDS = ["n02000003", "n01000001", "n03000002"]
SORTED_WNIDS = sorted(WNIDS)
NAMES = {"n01000001": "tench, Tinca tinca", "n02000003": "goldfish, Carassius auratus",
         "n03000002": "great white shark"}


def imagenet_train(base: Path, per_class: int = 2) -> dict[str, str]:
    """train/<wnid>/<wnid>_<n>.JPEG; returns {sample_id: wnid}."""
    out = {}
    for c, w in enumerate(WNIDS):
        for i in range(per_class):
            sid = f"{w}_{10 + 7 * i}"
            write(base / "train" / w / f"{sid}.JPEG", jpeg(seed=100 * c + i, c=c))
            out[sid] = w
    return out


def synset_mapping(wnids=SORTED_WNIDS) -> str:
    return "".join(f"{w} {NAMES[w]}\n" for w in wnids)


def imagenet_kaggle(root: Path, per_class: int = 2) -> tuple[Path, dict[str, str]]:
    """Kaggle layout: ILSVRC/Data/CLS-LOC/{train,val}, LOC_val_solution.csv, LOC_synset_mapping.txt."""
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    labels = imagenet_train(data, per_class)
    val = {"ILSVRC2012_val_00000001": "n03000002", "ILSVRC2012_val_00000002": "n01000001",
           "ILSVRC2012_val_00000003": "n02000003"}
    rows = ["ImageId,PredictionString"]
    for i, (sid, w) in enumerate(val.items()):
        write(data / "val" / f"{sid}.JPEG", jpeg(seed=900 + i, c=WNIDS.index(w)))
        rows.append(f"{sid},{w} 10 12 30 28 {w} 1 2 3 4")
    write(root / "LOC_val_solution.csv", "\n".join(rows) + "\n")
    write(root / "LOC_synset_mapping.txt", synset_mapping())
    labels.update(val)
    return root, labels


def meta_mat(path: Path, id_to_wnid: dict[int, str], words: dict[str, str], extra_nonleaf: bool = True) -> None:
    """A devkit-style meta.mat: struct array ``synsets`` (ILSVRC2012_ID, WNID, words, gloss, num_children, ...)."""
    import scipy.io

    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
             ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    recs = [(np.array([[i]], dtype=np.uint16), np.array([w]), np.array([words[w]]), np.array(["a leaf"]),
             np.array([[0]], dtype=np.uint16), np.zeros((1, 0), dtype=np.uint16), np.array([[0]], dtype=np.uint16),
             np.array([[2]], dtype=np.uint16)) for i, w in sorted(id_to_wnid.items())]
    if extra_nonleaf:
        n = max(id_to_wnid) + 1
        recs.append((np.array([[n]], dtype=np.uint16), np.array(["n00001740"]), np.array(["entity"]),
                     np.array(["a root"]), np.array([[len(id_to_wnid)]], dtype=np.uint16),
                     np.array([list(id_to_wnid)], dtype=np.uint16), np.array([[19]], dtype=np.uint16),
                     np.array([[0]], dtype=np.uint16)))
    arr = np.empty((len(recs), 1), dtype=dtype)
    for k, r in enumerate(recs):
        arr[k, 0] = r
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"synsets": arr})


# devkit ID order differs from sorted-wnid order (as in the real devkit: ID 490 = sorted index 65)
DEVKIT_IDS = {1: "n03000002", 2: "n01000001", 3: "n02000003"}


def imagenet_devkit(root: Path, per_class: int = 2) -> tuple[Path, dict[str, str]]:
    """train/ foldered, val/ flat, ILSVRC2012_devkit_t12/data/{ground truth, meta.mat}; no synset mapping."""
    labels = imagenet_train(root, per_class)
    gt_ids = [3, 1, 2, 1]            # val_00000001 .. val_00000004
    for n, i in enumerate(gt_ids, start=1):
        sid = f"ILSVRC2012_val_{n:08d}"
        write(root / "val" / f"{sid}.JPEG", jpeg(seed=700 + n))
        labels[sid] = DEVKIT_IDS[i]
    data = root / "ILSVRC2012_devkit_t12" / "data"
    write(data / "ILSVRC2012_validation_ground_truth.txt", "".join(f"{i}\n" for i in gt_ids))
    meta_mat(data / "meta.mat", DEVKIT_IDS, {w: NAMES[w] for w in WNIDS})
    return root, labels


# --- TIMIT -------------------------------------------------------------------------------
TIMIT = {  # speaker -> (subset, dialect region, expected split)
    "FCJF0": ("TRAIN", "DR1", "train"), "MDAB1": ("TRAIN", "DR2", "train"),
    "FAKS0": ("TEST", "DR1", "dev"), "MJMP0": ("TEST", "DR2", "test"),
    "MZZZ0": ("TEST", "DR3", None),   # a TEST speaker in neither list: not ingested
}
TIMIT_UTTS = ("SA1", "SX101", "SI1200")
PHN = ["h#", "sh", "ix", "hv", "eh", "dcl", "jh", "ih", "q", "ax-h", "bcl", "zh", "ao", "pau", "h#"]


def timit(root: Path, *, lower: bool = False, byte_format: str = "01", kaggle: bool = False,
          speakers: dict = TIMIT) -> tuple[Path, dict]:
    """TIMIT with SPHERE audio; returns (INPUT, {sample_id: facts}) with the exact sample counts written."""
    base = root / "timit"
    top = base / "data" if kaggle else base
    facts = {}
    for k, (spk, (subset, dr, split)) in enumerate(speakers.items()):
        for j, utt in enumerate(TIMIT_UTTS):
            rng = np.random.default_rng(10 * k + j)
            n = 8000 + 1600 * j + 160 * k
            x = make_audio(k % 2, rng, seconds=n / SR + 0.01)[:n]
            words = ["she", "had", "your", "suit"]
            wb = np.linspace(0, n, len(words) + 1).astype(int)
            pb = np.linspace(0, n, len(PHN) + 1).astype(int)
            parts = [subset, dr, spk]
            if lower:
                parts = [p.lower() for p in parts]
            d = top.joinpath(*parts)
            name = utt.lower() if lower else utt
            ext = (lambda e: e.lower()) if lower else (lambda e: e)
            write(d / f"{name}.{ext('WAV')}", sphere.encode(x, SR, byte_format=byte_format))
            if kaggle:
                write(d / f"{name}.WAV.wav", riff_wav(x))
            text = f"She had your {utt} suit."
            write(d / f"{name}.{ext('TXT')}", f"0 {n} {text}\n")
            write(d / f"{name}.{ext('WRD')}", "".join(f"{wb[i]} {wb[i + 1]} {w}\n" for i, w in enumerate(words)))
            write(d / f"{name}.{ext('PHN')}", "".join(f"{pb[i]} {pb[i + 1]} {p}\n" for i, p in enumerate(PHN)))
            facts[f"{spk}-{utt}"] = {"split": split, "dr": dr, "n": n, "text": text, "x": x,
                                     "word_bounds": wb, "phone_bounds": pb, "dir": d}
    if kaggle:
        write(base / "train_data.csv", "index,test_or_train,dialect_region,speaker_id,filename,path_from_data_dir\n")
        write(base / "test_data.csv", "index,test_or_train,dialect_region,speaker_id,filename,path_from_data_dir\n")
    return base, facts


# --- reading an ingest output ------------------------------------------------------------------
def read_rows(out) -> dict:
    """{sample_id: row} over the committed shards listed in the manifest (not quarantine/)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmbatch.engine.manifest import Manifest

    m = Manifest.read(str(out)).to_dict()
    t = pa.concat_tables([pq.read_table(str(Path(out) / f)) for f in m["files"]])
    return {r["sample_id"]: r for r in t.to_pylist()}


def read_quarantine(out) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(str(Path(out) / "quarantine")).to_pylist()
