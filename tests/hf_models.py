"""Tiny randomly initialised Hugging Face model folders, built offline (config -> save_pretrained),
one per family the hf extractors support; and the plain transformers loops the tests compare with.

Each builder writes what a user's ``save_pretrained`` would: config + weights + the image processor,
feature extractor or tokenizer, and returns the folder.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "red", "blue", "bird", "sings", "runs", "fast", "slow",
         "hello", "world", "one", "two", "three", "seven"]


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _tokenizer(folder: Path):
    from transformers import BertTokenizer

    vocab = folder / "_vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]))
    tok = BertTokenizer(vocab_file=str(vocab))
    tok.save_pretrained(str(folder))
    vocab.unlink()
    return len(tok)


def _text_cfg(cls, **kw):
    return dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **kw)


def build(family: str, root: Path) -> Path:
    """A tiny model folder of ``family`` under ``root``: clip, siglip, vit, dinov2, convnext, wav2vec2,
    hubert, wavlm, whisper, bert."""
    import transformers as T

    folder = Path(root) / family
    folder.mkdir(parents=True, exist_ok=True)
    vis = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               image_size=32, patch_size=8)
    if family in ("clip", "siglip"):
        vocab = _tokenizer(folder)
        txt = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, max_position_embeddings=16)
        if family == "clip":
            cfg = T.CLIPConfig(text_config={**txt, "eos_token_id": 3, "pad_token_id": 0, "bos_token_id": 2},
                               vision_config=vis, projection_dim=12)
            model, proc = T.CLIPModel, T.CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32})
        else:
            cfg = T.SiglipConfig(text_config=txt, vision_config=vis)
            model, proc = T.SiglipModel, T.SiglipImageProcessor(size={"height": 32, "width": 32})
    elif family in ("vit", "dinov2"):
        cfg = (T.ViTConfig if family == "vit" else T.Dinov2Config)(**vis)
        model = T.ViTModel if family == "vit" else T.Dinov2Model
        proc = (T.ViTImageProcessor(size={"height": 32, "width": 32}) if family == "vit" else
                T.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}))
    elif family == "convnext":
        cfg, model = T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), T.ConvNextModel
        proc = T.ConvNextImageProcessor(size={"shortest_edge": 32})
    elif family in ("wav2vec2", "hubert", "wavlm"):
        conv = dict(conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_feat_extract_layers=2,
                    num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
        cls = {"wav2vec2": (T.Wav2Vec2Config, T.Wav2Vec2Model), "hubert": (T.HubertConfig, T.HubertModel),
               "wavlm": (T.WavLMConfig, T.WavLMModel)}[family]
        cfg, model = cls[0](**_text_cfg(None), **conv), cls[1]
        proc = T.Wav2Vec2FeatureExtractor(return_attention_mask=family == "wavlm")
    elif family == "whisper":
        cfg = T.WhisperConfig(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=20,
                              max_source_positions=50, max_target_positions=16, vocab_size=64,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        model, proc = T.WhisperModel, T.WhisperFeatureExtractor(feature_size=20, chunk_length=1)
    elif family == "bert":
        vocab = _tokenizer(folder)
        cfg, model, proc = T.BertConfig(vocab_size=vocab, **_text_cfg(None), max_position_embeddings=32), T.BertModel, None
    else:
        raise ValueError(family)
    _seeded(lambda: model(cfg)).save_pretrained(str(folder))
    if proc is not None:
        proc.save_pretrained(str(folder))
    return folder


IMAGE_FAMILIES = ("clip", "siglip", "vit", "dinov2", "convnext")
AUDIO_FAMILIES = ("wav2vec2", "hubert", "wavlm", "whisper")
TEXT_FAMILIES = ("bert", "clip", "siglip")


# --- sample rows ----------------------------------------------------------------------------------
def jpeg(seed: int, w: int = 48, h: int = 40) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def flac(seed: int, seconds: float = 0.5, sr: int = 16000) -> bytes:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sr, format="FLAC")
    return buf.getvalue()


def sentence(seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=3 + seed % 5))


# --- the plain transformers loops ---------------------------------------------------------------------
def plain_image(folder, images: list[bytes], batch_size: int, pooling: str = "pooler") -> np.ndarray:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    proc = AutoImageProcessor.from_pretrained(folder, backend="pil")
    model = AutoModel.from_pretrained(folder).eval()
    out = []
    for i in range(0, len(images), batch_size):
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[i:i + batch_size]]
        x = proc(images=pil, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            if model.config.model_type in ("clip", "siglip"):
                e = model.get_image_features(pixel_values=x).pooler_output
            else:
                r = model(pixel_values=x)
                e = r.last_hidden_state[:, 0] if pooling == "cls" else r.pooler_output.reshape(len(x), -1)
        out.append(e.numpy())
    return np.concatenate(out)


def plain_audio(folder, clips: list, batch_size: int, layer=None, frames: bool = False):
    """Mean over frames (or the frames) of a speech model; ``clips``: FLAC bytes or 16 kHz waveforms."""
    import soundfile as sf
    from transformers import AutoFeatureExtractor, AutoModel

    fe = AutoFeatureExtractor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    whisper = model.config.model_type == "whisper"
    enc = model.get_encoder() if whisper else model
    out = []
    for i in range(0, len(clips), batch_size):
        waves = [b if isinstance(b, np.ndarray) else sf.read(io.BytesIO(b), dtype="float32")[0]
                 for b in clips[i:i + batch_size]]
        f = fe(waves, sampling_rate=16000, padding="max_length" if whisper else True, return_attention_mask=True,
               return_tensors="pt")
        with torch.inference_mode():
            if whisper:
                r = enc(f["input_features"], output_hidden_states=True)
                n = f["attention_mask"][:, ::2].sum(-1)
            else:
                kw = {"attention_mask": f["attention_mask"]} if fe.return_attention_mask else {}
                r = enc(f["input_values"], output_hidden_states=True, **kw)
                n = enc._get_feat_extract_output_lengths(f["attention_mask"].sum(-1))
        h = r.last_hidden_state if layer is None else r.hidden_states[layer]
        for k in range(len(waves)):
            rows = h[k, :int(n[k])].numpy()
            out.append(rows if frames else rows.mean(0))
    return out if frames else np.stack(out)


def plain_text(folder, texts: list[str], batch_size: int) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    kind = model.config.model_type
    limit = (model.config.text_config if kind in ("clip", "siglip") else model.config).max_position_embeddings
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding="max_length" if kind == "siglip" else True, truncation=True,
                  max_length=limit, return_tensors="pt")
        with torch.inference_mode():
            if kind in ("clip", "siglip"):
                e = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
            else:
                h = model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                e = (h * m).sum(1) / m.sum(1)
        out.append(e.numpy())
    return np.concatenate(out)
