"""Encoders trained end to end (``train.encoders``), on the sequence features of preprocess.

The seeds' model, with the fusion models of :mod:`mmbatch.train.models` on top::

    image  [B, size*size*C] uint8 -> ImageCNN  -> [B, hidden] ┐
    audio  [B, T, n_mels] + lengths -> AudioLSTM -> [B, hidden] ├ early | weighted | late | gated -> [B, classes]
    text   [B, L] ids + lengths    -> TextLSTM  -> [B, hidden] ┘

Padded positions never reach a result: the LSTMs run on ``pack_padded_sequence`` of the
true lengths and their outputs are averaged over the real steps only; each batch is first cut to its longest row (the data path pads to
``max_frames`` / ``max_tokens``; a batch of short rows costs only their length).
A row whose modality is missing (length 0, or ``has_<m>`` false) is run with length 1 and
its output is zeroed by the fusion model's presence mask.

Every encoder checks its input's width against the feature settings it was built for and
raises :class:`InputMismatch`, naming the column and both sizes.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mmbatch import schema

ENCODERS = {"image": "cnn", "audio": "lstm", "text": "lstm"}     # the learned encoder of each modality
EMBED_DIM = 64                                                     # word embedding size of TextLSTM


class InputMismatch(ValueError):
    """A column's size differs from what the model was built for."""


def _check(got: int, want: int, column: str, setting: str) -> None:
    if int(got) != int(want):
        raise InputMismatch(f"column {column}: rows of size {got}, the model was built for {want} "
                            f"({setting}); re-extract with the model's feature settings or retrain")


class ImageCNN(nn.Module):
    """Two conv blocks and a linear layer.

    Input: uint8 or float [B, size*size*channels] (row-major H x W x C pixels, 0..255).
    Output: float [B, out_dim].

    Conv2d(C, 32, 3x3, same) -> ReLU -> MaxPool 2 -> Conv2d(32, 64, 3x3, same) -> ReLU -> MaxPool 2
    -> Flatten [B, 64 * (size // 4)^2] -> Linear -> ReLU
    """

    def __init__(self, size: int = 28, channels: int = 1, out_dim: int = 64):
        super().__init__()
        self.size, self.channels, self.out_dim = int(size), int(channels), int(out_dim)
        self.features = nn.Sequential(
            nn.Conv2d(self.channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(64 * (self.size // 4) ** 2, self.out_dim), nn.ReLU())

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check(x.shape[1], self.size * self.size * self.channels, schema.seq_column("image"),
               f"features.image.size {self.size}, channels {self.channels}")
        b = x.shape[0]
        img = x.view(b, self.size, self.size, self.channels).permute(0, 3, 1, 2).contiguous().float() / 255.0  # [B,C,H,W]
        return self.fc(self.features(img - 0.5))


class _LSTMEncoder(nn.Module):
    """Shared: cut the batch to its longest row, pack, run the LSTM, average its outputs over
    each row's real steps (a masked mean: padded steps count for nothing)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.out_dim = int(out_dim)
        self.lstm = nn.LSTM(in_dim, self.out_dim, batch_first=True)

    def run(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x [B, T, in_dim], lengths [B] -> [B, out_dim]: the mean of the LSTM outputs over each
        row's first ``length`` steps."""
        lengths = lengths.to("cpu", torch.int64).clamp(1, x.shape[1])          # missing rows: one step
        x = x[:, : int(lengths.max())]                                         # per-batch padding
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)   # [B, T', H], zeros past length
        return out.sum(1) / lengths.to(out.device, out.dtype).unsqueeze(1)


class AudioLSTM(_LSTMEncoder):
    """Log-mel frames, standardised per mel band with train-split statistics, into an LSTM.

    Input: float [B, T, n_mels] (padded with zeros past each row's length), lengths int [B].
    Output: float [B, out_dim].
    """

    def __init__(self, n_mels: int = 40, out_dim: int = 64):
        super().__init__(int(n_mels), out_dim)
        self.n_mels = int(n_mels)
        self.register_buffer("mean", torch.zeros(self.n_mels))
        self.register_buffer("inv_std", torch.ones(self.n_mels))

    def set_input_stats(self, stats: Mapping[str, list]) -> None:
        self.mean.copy_(torch.as_tensor(stats["mean"], dtype=torch.float32))
        self.inv_std.copy_(1.0 / torch.as_tensor(stats["std"], dtype=torch.float32))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _check(x.shape[-1], self.n_mels, schema.seq_column("audio"), f"features.audio.n_mels {self.n_mels}")
        return self.run((x.float() - self.mean) * self.inv_std, lengths)


class TextLSTM(_LSTMEncoder):
    """Word embeddings (id 0 = <pad>) into an LSTM.

    Input: int [B, L] token ids (0 past each row's length), lengths int [B].
    Output: float [B, out_dim].
    """

    def __init__(self, vocab_size: int, out_dim: int = 64, embed_dim: int = EMBED_DIM):
        super().__init__(int(embed_dim), out_dim)
        self.vocab_size = int(vocab_size)
        self.embed = nn.Embedding(self.vocab_size, int(embed_dim), padding_idx=0)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if x.numel() and int(x.max()) >= self.vocab_size:
            raise InputMismatch(f"column {schema.seq_column('text')}: token id {int(x.max())} is outside the "
                                f"model's vocabulary of {self.vocab_size} (features.text.vocabulary): data built "
                                "with another vocabulary")
        return self.run(self.embed(x.long()), lengths)


def build_encoder(modality: str, spec: Mapping) -> nn.Module:
    """The encoder of ``spec`` (an ``arch.encoders[modality]`` entry, see :func:`encoder_spec`)."""
    kind, out = spec["kind"], int(spec["hidden"])
    if (modality, kind) == ("image", "cnn"):
        return ImageCNN(spec["size"], spec["channels"], out)
    if (modality, kind) == ("audio", "lstm"):
        return AudioLSTM(spec["n_mels"], out)
    if (modality, kind) == ("text", "lstm"):
        return TextLSTM(spec["vocab_size"], out)
    raise ValueError(f"train.encoders.{modality}: no encoder {kind!r} (allowed: frozen, {ENCODERS[modality]})")


def encoder_spec(modality: str, kind: str, hidden: int, feature: Mapping) -> dict:
    """``arch.encoders[modality]``: the encoder and the feature settings it is built for
    (``feature``: the data's extractor description, name + params)."""
    p = feature.get("params") or {}
    keys = {"image": ("size", "channels"), "audio": ("n_mels", "max_frames"), "text": ("vocab_size", "max_tokens")}
    p = {**p, "n_mels": schema.frame_size(p)} if modality == "audio" else p    # values per frame (hf_frames too)
    return {"kind": kind, "hidden": int(hidden), **{k: p[k] for k in keys[modality]}}
