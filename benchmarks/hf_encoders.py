"""The ``hf`` extractors' speed (benchmarks.gpu section ``hf``): a ViT-B/16 image model, a wav2vec 2.0
base speech model and a BERT-base text model, at fp32 and bf16, built here from their configs with
random weights (``save_pretrained`` into a temporary folder: no network; the speed does not depend on
the weights). ``--tiny`` builds two-layer models of width 32 instead.

For each: ``encode`` on decoded host batches (a worker's model step) and ``extract`` from raw rows
(JPEG 500x375 / 10 s FLAC / a sentence: decode + processor + model in one process).
"""
from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

WORDS = "the a cat dog sat on mat red blue bird sings runs fast slow hello world one two three seven".split()


def build_models(root: Path, tiny: bool) -> dict:
    """{modality: folder} of random-weight ViT / wav2vec2 / BERT (base sizes; tiny: 2 layers, width 32)."""
    import torch
    import transformers as T

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else {}
    conv = dict(conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8) if tiny else {}
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]))
    out = {}
    torch.manual_seed(0)
    for m, model, proc in (
            ("image", T.ViTModel(T.ViTConfig(**small)), T.ViTImageProcessor()),
            ("audio", T.Wav2Vec2Model(T.Wav2Vec2Config(**small, **conv)), T.Wav2Vec2FeatureExtractor()),
            ("text", T.BertModel(T.BertConfig(**small)), T.BertTokenizer(vocab_file=str(vocab)))):
        folder = root / m
        model.save_pretrained(str(folder))
        proc.save_pretrained(str(folder))
        out[m] = str(folder)
    return out


def rows(modality: str, n: int, seconds: float = 10.0) -> list:
    """n raw rows: JPEG 500x375, ``seconds`` of 16 kHz FLAC, or a 12-word sentence."""
    rng = np.random.default_rng(0)
    if modality == "image":
        from PIL import Image
        out = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((375, 500, 3)) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
        return out
    if modality == "audio":
        import soundfile as sf
        out = []
        for _ in range(n):
            buf = io.BytesIO()
            sf.write(buf, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000, format="FLAC")
            out.append(buf.getvalue())
        return out
    return [" ".join(rng.choice(WORDS, 12)) for _ in range(n)]


def bench_hf(env: dict, sizes, tiny: bool, timed, sync_of) -> dict:
    """Runs of ``encode`` and ``extract`` per modality and precision (``timed``/``sync_of``: benchmarks.gpu's)."""
    from mmbatch.preprocess.features.registry import build_extractor
    from mmbatch.config import feature_config

    device = env["device"]
    batch = {"image": sizes.resnet_batch, "audio": max(1, sizes.clips_10s), "text": sizes.resnet_batch}
    runs = []
    with tempfile.TemporaryDirectory(prefix="mmbatch-hf-bench-") as tmp:
        folders = build_models(Path(tmp), tiny)
        for m, folder in folders.items():
            raw = rows(m, batch[m], seconds=1.0 if tiny else 10.0)
            for precision in ("fp32", "bf16"):
                spec = {"extractor": "hf", "model_path": folder, "batch_size": batch[m], "precision": precision}
                ex = build_extractor(m, feature_config(m, spec)).to(device)
                dec = ex.decode(raw)
                host = [v for v in dec.values if v is not None]
                for name, step in (("encode, decoded host batch", lambda: ex.encode(host)),
                                   ("extract from raw rows (decode + processor + model, 1 process)",
                                    lambda: ex.extract(raw))):
                    r = timed(step, sync_of(device), sizes, device)
                    runs.append({"modality": m, "model": ex.model_type, "name": name, "precision": precision,
                                 "clip_seconds": 1.0 if tiny else 10.0,
                                 "batch": batch[m], "items": r["steps"] * batch[m], "seconds": r["seconds"],
                                 "per_s": round(r["steps"] * batch[m] / max(r["seconds"], 1e-9), 1), "gpu": r["gpu"]})
                print(f"  hf {m} ({ex.model_type}) {precision}: encode {runs[-2]['per_s']}/s, "
                      f"extract {runs[-1]['per_s']}/s", flush=True)
    return {"models": "random weights: ViT-B/16 224, wav2vec2-base, BERT-base" + (" (tiny: 2 layers x 32)" if tiny
                                                                                    else ""), "runs": runs}


def render_rows(section: dict, gpu_cells) -> list[str]:
    """The section's rows of benchmarks.gpu's table."""
    unit = {"image": "img/s", "audio": "clips/s", "text": "texts/s"}
    return [f"| hf {r['modality']} ({r['model']}): {r['name']}"
            f"{', %g s clips' % r['clip_seconds'] if r['modality'] == 'audio' else ''} | {r['precision']} | "
            f"{r['batch']} | {r['per_s']:,.1f} {unit[r['modality']]} | {gpu_cells(r['gpu'])} |"
            for r in section["runs"]]
