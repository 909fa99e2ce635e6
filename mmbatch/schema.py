"""The one place that owns mmbatch's Arrow schemas.

Every stage reads and writes these: ingest writes CANONICAL rows and
QUARANTINE rows; preprocess reads CANONICAL and writes FUSED rows (schema built
by :func:`fused_schema` from the embedding sizes); training reads FUSED rows.
No stage invents column names: import them from here.
"""
from __future__ import annotations

import json
from typing import Mapping

import pyarrow as pa
import xxhash

SCHEMA_VERSION = "1"

# Parquet key-value metadata keys written by mmbatch (values are JSON strings).
META_KEY = b"mmbatch"            # {"schema_version", "kind", ...stage specific}
HF_META_KEY = b"huggingface"     # HuggingFace `datasets` feature description

# --- building blocks ---------------------------------------------------------
MEDIA = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SEGMENT = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("symbol", pa.string())])
SEGMENTS = pa.list_(SEGMENT)

SPLITS = ("train", "validation", "test")

# --- canonical rows (ingest output) --------------------------------------------
CANONICAL_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),     # ingest kind: imagenet, librispeech, ...
    pa.field("split", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("label_name", pa.string()),
    pa.field("image", MEDIA),
    pa.field("audio", MEDIA),
    pa.field("text", pa.string()),
    pa.field("speaker", pa.string()),
    pa.field("gender", pa.string()),                    # "m" / "f"
    pa.field("duration", pa.float64()),                 # seconds (audio)
    pa.field("sample_rate", pa.int32()),
    pa.field("num_samples", pa.int64()),
    pa.field("words", SEGMENTS),                        # seconds
    pa.field("phones", SEGMENTS),                       # seconds
    # source-specific extras (null where they do not apply)
    pa.field("wnid", pa.string()),
    pa.field("chapter", pa.string()),
    pa.field("dialect_region", pa.string()),
    pa.field("sentence_type", pa.string()),
    pa.field("extra", pa.string()),                     # JSON object for anything else
    pa.field("generated", pa.string()),                 # modalities filled by a conversion ("audio", ...)
    # content hashes of the media bytes (hex XXH3-128, mmbatch.schema.content_hash; the
    # file's metadata names the function):
    # exact duplicates without reading the media again; null in data ingested before they existed
    pa.field("image_hash", pa.string()),
    pa.field("audio_hash", pa.string()),
]
CANONICAL = pa.schema(CANONICAL_FIELDS)
CANONICAL_COLUMNS = [f.name for f in CANONICAL_FIELDS]

def label_indices(names) -> dict[str, int]:
    """``{name: label}`` for class names: the sorted names numbered from 0. Every source and the
    preprocess label column map names to the ``label`` column this way."""
    return {n: i for i, n in enumerate(sorted(names))}


# --- quarantine rows (any stage) -------------------------------------------------
QUARANTINE = pa.schema([
    pa.field("path", pa.string()),
    pa.field("sample_id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("stage", pa.string()),      # ingest / preprocess
    pa.field("reason", pa.string(), nullable=False),   # short machine-readable code
    pa.field("detail", pa.string()),     # human-readable explanation
])

# --- fused rows (preprocess output) ----------------------------------------------
MODALITIES = ("image", "audio", "text")
# the extractor of each modality whose output is a sequence column (seq_column), not an embedding
SEQUENCE_EXTRACTORS = {"image": "pixels", "audio": "logmel_frames", "text": "tokens"}
# every extractor whose output is a sequence column: audio frames come from log-mel or a speech encoder
SEQUENCE_EXTRACTOR_NAMES = {"image": ("pixels",), "audio": ("logmel_frames", "hf_frames"), "text": ("tokens",)}


def emb_column(modality: str) -> str:
    return f"{modality}_emb"


def has_column(modality: str) -> str:
    return f"has_{modality}"


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


# --- sequence features (features.<m>.extractor: pixels / logmel_frames / tokens) ---------------
# Instead of an embedding column, a modality with a sequence extractor writes its model input:
#   image_pixels  fixed_size_list<uint8>[size*size*channels]  the resized image, row-major H x W x C
#   audio_frames  list<fixed_size_list<float32>[n_mels]>      log-mel frames (dB), at most max_frames
#                                                              (hf_frames: a speech encoder's frames, [frame_dim])
#   audio_len     int32                                        frames stored (the true length, cropped)
#   text_tokens   list<int32>                                  token ids (vocabulary in the metadata)
#   text_len      int32                                        tokens stored (at most max_tokens)
# and the fused table has no `fused` column.
SEQUENCE_COLUMNS = {"image": "image_pixels", "audio": "audio_frames", "text": "text_tokens"}
LENGTH_COLUMNS = {"audio": "audio_len", "text": "text_len"}


def seq_column(modality: str) -> str:
    return SEQUENCE_COLUMNS[modality]


def len_column(modality: str) -> str:
    return LENGTH_COLUMNS[modality]


def pixels_type(size: int, channels: int) -> pa.DataType:
    return pa.list_(pa.uint8(), int(size) * int(size) * int(channels))


def frames_type(n_mels: int) -> pa.DataType:
    return pa.list_(pa.list_(pa.float32(), int(n_mels)))


TOKENS_TYPE = pa.list_(pa.int32())


def frame_size(params: Mapping) -> int:
    """Values per audio frame of a frames extractor's ``params()``: ``n_mels`` (logmel_frames) or
    ``frame_dim`` (hf_frames: the encoder's hidden size)."""
    return int(params["frame_dim"] if "frame_dim" in params else params["n_mels"])


def sequence_fields(modality: str, params: Mapping) -> list[pa.Field]:
    """The columns a sequence extractor writes for ``modality`` (``params``: its params())."""
    if modality == "image":
        return [pa.field(seq_column("image"), pixels_type(params["size"], params["channels"]))]
    if modality == "audio":
        return [pa.field(seq_column("audio"), frames_type(frame_size(params))), pa.field(len_column("audio"), pa.int32())]
    return [pa.field(seq_column("text"), TOKENS_TYPE), pa.field(len_column("text"), pa.int32())]


def fused_schema(dims: Mapping[str, int], fused_dim: int,
                 sequences: Mapping[str, list[pa.Field]] | None = None) -> pa.Schema:
    """Schema of fused feature rows. ``dims`` maps modality -> embedding size; ``sequences`` maps a
    modality with a sequence extractor to its columns (:func:`sequence_fields`): it gets those
    instead of an embedding column, and the table then has no ``fused`` column."""
    sequences = sequences or {}
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("split", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("label_name", pa.string()),
    ]
    for m in MODALITIES:
        if m in sequences:
            fields += sequences[m]
        elif m in dims:
            fields.append(pa.field(emb_column(m), embedding_type(dims[m])))
    for m in MODALITIES:
        if m in dims:
            fields.append(pa.field(has_column(m), pa.bool_()))
    if not sequences:
        fields.append(pa.field("fused", embedding_type(fused_dim)))
    return pa.schema(fields)


# --- metadata helpers -----------------------------------------------------------
def hf_features(schema: pa.Schema) -> dict:
    """HuggingFace `datasets` feature description for a canonical-like schema.

    ``image``/``audio`` struct columns become ``Image``/``Audio`` features, so
    ``load_dataset("parquet", ...)`` decodes them lazily.
    """
    def feature(t: pa.DataType):
        if t == pa.string():
            return {"dtype": "string", "_type": "Value"}
        if t == pa.int64():
            return {"dtype": "int64", "_type": "Value"}
        if t == pa.int32():
            return {"dtype": "int32", "_type": "Value"}
        if t == pa.float64():
            return {"dtype": "float64", "_type": "Value"}
        if t == pa.float32():
            return {"dtype": "float32", "_type": "Value"}
        if t == pa.bool_():
            return {"dtype": "bool", "_type": "Value"}
        if t == pa.uint8():
            return {"dtype": "uint8", "_type": "Value"}
        if pa.types.is_fixed_size_list(t):
            return {"feature": feature(t.value_type), "length": t.list_size, "_type": "Sequence"}
        if pa.types.is_list(t):
            return {"feature": feature(t.value_type), "_type": "Sequence"}
        if pa.types.is_struct(t):
            return {t.field(i).name: feature(t.field(i).type) for i in range(t.num_fields)}
        raise TypeError(f"no HF feature for {t}")

    feats = {}
    for f in schema:
        if f.name == "image" and f.type == MEDIA:
            feats[f.name] = {"_type": "Image"}
        elif f.name == "audio" and f.type == MEDIA:
            feats[f.name] = {"_type": "Audio"}
        else:
            feats[f.name] = feature(f.type)
    return {"info": {"features": feats}}


def with_metadata(schema: pa.Schema, mmbatch_meta: Mapping | None = None, hf: bool = True) -> pa.Schema:
    """Attach mmbatch (and HF) key-value metadata to a schema."""
    md = dict(schema.metadata or {})
    meta = {"schema_version": SCHEMA_VERSION, **(mmbatch_meta or {})}
    md[META_KEY] = json.dumps(meta, sort_keys=True, default=str).encode()
    if hf:
        md[HF_META_KEY] = json.dumps(hf_features(schema)).encode()
    return schema.with_metadata(md)


def read_mmbatch_meta(schema: pa.Schema) -> dict:
    md = schema.metadata or {}
    raw = md.get(META_KEY)
    return json.loads(raw) if raw else {}


def quarantine_row(reason: str, detail: str = "", *, path: str | None = None,
                   sample_id: str | None = None, source: str | None = None,
                   stage: str = "ingest") -> dict:
    """One row of the QUARANTINE schema (every stage builds its quarantine rows with this)."""
    return {"path": path, "sample_id": sample_id, "source": source, "stage": stage,
            "reason": reason, "detail": detail}


def normalize_split(split: str | None) -> str | None:
    """Map corpus split names onto train / validation / test.

    ``train-clean-100`` -> train, ``dev-clean``/``dev``/``val`` -> validation,
    ``test-other``/``test`` -> test; anything else is returned unchanged.
    """
    if split is None:
        return None
    s = split.lower()
    if s.startswith("train"):
        return "train"
    if s.startswith(("dev", "val")):
        return "validation"
    if s.startswith("test"):
        return "test"
    return split


# --- content hashes of media bytes (the canonical image_hash / audio_hash columns) --------------
# XXH3-128 (xxhash, a dependency of HF datasets): 128 bits keep collisions out of reach at corpus
# scale, and it is far cheaper than BLAKE2b-128 (docs/performance.md). Not cryptographic: a
# duplicate key, not a signature. Written into the canonical files' metadata (``content_hash``):
# data hashed otherwise is hashed again.
HASH_NAME = "xxh3_128"


def content_hash(data: bytes | None) -> str | None:
    """Hex XXH3-128 of media bytes (None for None/empty)."""
    if not data:
        return None
    return xxhash.xxh3_128_hexdigest(data)


def add_content_hashes(rows: list[dict]) -> None:
    """Fill the canonical ``image_hash``/``audio_hash`` columns of ingest rows in place."""
    for r in rows:
        for m in ("image", "audio"):
            media = r.get(m)
            r[f"{m}_hash"] = content_hash(media.get("bytes")) if isinstance(media, dict) else None
