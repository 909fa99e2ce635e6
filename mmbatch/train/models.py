"""Fusion classifiers over per-modality embeddings.

Every model first brings each modality to the same footing, then fuses:

1. standardise each input feature with the train split's mean and standard deviation
   (buffers set by :meth:`FusionModel.set_input_stats`, saved with the weights): raw
   embeddings differ by orders of magnitude (HOG values ~0.1, log-mel statistics ~-50 dB
   with large per-feature offsets, L2-normalised hashing vectors), and a modality whose
   inputs are badly scaled learns slowly and gets ignored by the others;
2. project each modality to ``hidden`` (Linear -> LayerNorm -> GELU -> Dropout);
3. fuse:

- ``early``    concatenate the projections -> MLP -> classes
- ``weighted`` one learned softmax weight per modality: F = sum_m w_m * P_m(x_m) -> MLP
- ``late``     a classifier per modality; logits averaged over present modalities
- ``gated``    a gated multimodal unit (Arevalo et al. 2017): per row and per hidden unit,
               softmax gates over modalities computed from all projections;
               F = sum_m z_m * P_m(x_m) -> MLP. The gate starts uniform (zero-initialised
               output layer).

Training adds an auxiliary classifier per modality on its projection (for ``late``: its
own heads) and the loss ``CE(fused) + AUX_WEIGHT * mean_m CE(modality m alone)`` over the
rows that have m (:meth:`FusionModel.loss`). Without it, a modality the others already
explain gets little gradient, never learns, and a gate or weight learns to ignore it
("modality laziness": the issue-16 collapse put 0.00 weight on the best modality; see
also Wang et al. 2020, gradient blending, and MultiBench's unimodal auxiliary losses).

A missing modality (``has_<m>`` false) is zeroed and excluded from weights, gates,
averages and its auxiliary loss. A model restricted to one modality is a unimodal baseline.

Input: a batch dict with ``<m>_emb`` float [B, dim] and ``has_<m>`` bool [B]
(the columns :func:`mmbatch.train.data.to_arrays` produces); ``mask``
[B, M] bool overrides the presence flags (modality dropout).

Learned encoders (``encoders``, from ``train.encoders``; :mod:`mmbatch.train.encoders`)
take the place of a modality's frozen embedding: ``<m>_emb`` is then the modality's sequence
input (pixels [B, size*size*C], frames [B, T, n_mels], token ids [B, L]) with its lengths in
``<m>_len``, and the encoder's output [B, hidden] goes through the same projection and fusion.
"""
from __future__ import annotations

import json
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbatch import schema
from mmbatch.engine import storage

FUSIONS = ("early", "weighted", "late", "gated")
MODEL_FILE = "model.pt"
SPEC_FILE = "model.json"
ARCH_VERSION = 2            # 2: input standardisation, auxiliary heads, per-unit gates
AUX_WEIGHT = 0.5            # weight of the mean unimodal auxiliary loss
STD_FLOOR = 0.1             # a feature's std is at least this share of the modality's median std


def projection(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout))


def mlp_head(d_in: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))


class Standardize(nn.Module):
    """(x - mean) / std per feature, with the statistics held as buffers (saved with the model)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


def _stat_rows(arrays: Mapping[str, np.ndarray], m: str) -> Optional[np.ndarray]:
    """The float64 rows the input statistics of modality ``m`` are taken over: the embeddings of the
    rows that have it, or for frames [n, T, F] the real (unpadded) frames of those rows, as [rows, F].
    None for integer inputs (pixels / token ids: the encoder scales them itself)."""
    raw = np.asarray(arrays[schema.emb_column(m)])
    if raw.dtype.kind in "iu":
        return None
    has = arrays.get(schema.has_column(m))
    if raw.ndim == 3:
        lengths = arrays.get(f"{m}_len")
        valid = np.arange(raw.shape[1])[None, :] < (np.asarray(lengths)[:, None] if lengths is not None
                                                    else raw.shape[1])
        if has is not None:
            valid &= np.asarray(has, bool)[:, None]
        return raw[valid].astype(np.float64)
    x = np.asarray(raw, dtype=np.float64)
    return x[np.asarray(has, bool)] if has is not None else x


def _floored(mean: np.ndarray, std: np.ndarray, frames: bool) -> dict[str, list[float]]:
    """JSON-able mean/std with the std floors of :func:`feature_stats` (frames: of :func:`frame_stats`)."""
    std = std.copy()
    if frames:
        std[std <= 1e-6] = 1.0
    else:
        median = float(np.median(std)) if len(std) else 0.0
        std = np.maximum(std, STD_FLOOR * median if median > 0 else 1.0)
        std[std <= 0] = 1.0
    return {"mean": mean.astype(np.float32).tolist(), "std": std.astype(np.float32).tolist()}


def feature_stats(arrays: Mapping[str, np.ndarray], modalities) -> dict[str, dict[str, list[float]]]:
    """Per-feature mean and std of each modality over the rows that have it (JSON-able).

    A feature's std is floored at ``STD_FLOOR`` x the modality's median std, so a feature
    that is (nearly) constant in the train split cannot blow up on other data. The same figures
    from batches, without holding the rows: :class:`RunningStats`."""
    out = {}
    for m in modalities:
        raw = np.asarray(arrays[schema.emb_column(m)])
        if raw.dtype.kind in "iu":
            continue                          # pixels / token ids: the encoder scales them itself
        if raw.ndim == 3:                     # frames [n, T, F]: per-F statistics over the real frames
            out[m] = frame_stats(raw, arrays.get(f"{m}_len"), arrays.get(schema.has_column(m)))
            continue
        x = _stat_rows(arrays, m)
        if len(x) == 0:
            out[m] = {"mean": [0.0] * x.shape[1], "std": [1.0] * x.shape[1]}
        else:
            out[m] = _floored(x.mean(0), x.std(0), frames=False)
    return out


class RunningStats:
    """:func:`feature_stats` computed over batches of model-ready arrays (``add`` each one), holding
    only a count, a mean and a sum of squared deviations per feature: memory bounded by the features,
    not the rows. Batches are merged with Chan et al.'s pairwise update (numerically stable in float64)."""

    def __init__(self, modalities):
        self.modalities = list(modalities)
        self.n: dict[str, int] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.m2: dict[str, np.ndarray] = {}
        self.frames: dict[str, bool] = {}

    def add(self, arrays: Mapping[str, np.ndarray]) -> None:
        for m in self.modalities:
            x = _stat_rows(arrays, m)
            if x is None:
                continue
            self.frames[m] = np.asarray(arrays[schema.emb_column(m)]).ndim == 3
            if m not in self.n:
                self.n[m], self.mean[m], self.m2[m] = 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
            if len(x) == 0:
                continue
            nb, mb = len(x), x.mean(0)
            m2b = ((x - mb) ** 2).sum(0)
            na = self.n[m]
            delta = mb - self.mean[m]
            tot = na + nb
            self.mean[m] = self.mean[m] + delta * (nb / tot)
            self.m2[m] = self.m2[m] + m2b + delta ** 2 * (na * nb / tot)
            self.n[m] = tot

    def result(self) -> dict[str, dict[str, list[float]]]:
        out = {}
        for m in self.modalities:
            if m not in self.n:
                continue
            if self.n[m] == 0:
                d = len(self.mean[m])
                out[m] = {"mean": [0.0] * d, "std": [1.0] * d}
                continue
            out[m] = _floored(self.mean[m], np.sqrt(self.m2[m] / self.n[m]), self.frames[m])
        return out


def frame_stats(frames: np.ndarray, lengths: Optional[np.ndarray], has: Optional[np.ndarray]) -> dict:
    """Mean and std of each frame feature over the real (unpadded) frames of the present rows."""
    n, t, f = frames.shape
    valid = np.arange(t)[None, :] < (np.asarray(lengths)[:, None] if lengths is not None else t)
    if has is not None:
        valid &= np.asarray(has, bool)[:, None]
    x = frames[valid].astype(np.float64)
    if len(x) == 0:
        return {"mean": [0.0] * f, "std": [1.0] * f}
    std = x.std(0)
    std[std <= 1e-6] = 1.0
    return {"mean": x.mean(0).astype(np.float32).tolist(), "std": std.astype(np.float32).tolist()}


class FusionModel(nn.Module):
    def __init__(self, dims: Mapping[str, int], num_classes: int, fusion: str = "early",
                 hidden: int = 128, dropout: float = 0.1, encoders: Optional[Mapping[str, Mapping]] = None):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        # canonical order (schema.MODALITIES), whatever order ``dims`` comes in: a spec read back
        # from JSON (sorted keys) must rebuild the same concatenation / weight order
        self.modalities = [m for m in schema.MODALITIES if m in dims] + sorted(m for m in dims if m not in schema.MODALITIES)
        self.fusion = fusion
        self.num_classes = int(num_classes)
        from mmbatch.train.encoders import build_encoder
        self.encoders = nn.ModuleDict({m: build_encoder(m, e) for m, e in (encoders or {}).items()})
        in_dims = {m: self.encoders[m].out_dim if m in self.encoders else int(dims[m]) for m in self.modalities}
        self.norm = nn.ModuleDict({m: Standardize(in_dims[m]) for m in self.modalities})
        self.proj = nn.ModuleDict({m: projection(in_dims[m], hidden, dropout) for m in self.modalities})
        n = len(self.modalities)
        if fusion == "early":
            self.head = mlp_head(hidden * n, hidden, num_classes, dropout)
        elif fusion == "weighted":
            self.weight_logits = nn.Parameter(torch.zeros(n))
            self.head = mlp_head(hidden, hidden, num_classes, dropout)
        elif fusion == "late":
            self.heads = nn.ModuleDict({m: mlp_head(hidden, hidden, num_classes, dropout) for m in self.modalities})
        elif fusion == "gated":
            self.gate = nn.Sequential(nn.Linear(hidden * n, hidden), nn.Tanh(), nn.Linear(hidden, n * hidden))
            nn.init.zeros_(self.gate[-1].weight)       # uniform gates at the start: no modality
            nn.init.zeros_(self.gate[-1].bias)         # is starved before it has learned anything
            self.head = mlp_head(hidden, hidden, num_classes, dropout)
        # one linear classifier per modality on its projection (training only; ``late`` uses its heads)
        self.aux = nn.ModuleDict({m: nn.Linear(hidden, num_classes) for m in self.modalities}) \
            if n > 1 and fusion != "late" else None

    # -- input statistics
    def set_input_stats(self, stats: Mapping[str, Mapping[str, list]]) -> None:
        """Set the per-feature mean/std of each modality (see :func:`feature_stats`)."""
        for m in self.modalities:
            if m not in stats:
                continue                       # an encoder that takes raw pixels / ids
            if m in self.encoders:
                self.encoders[m].set_input_stats(stats[m])
                continue
            st = self.norm[m]
            st.mean.copy_(torch.as_tensor(stats[m]["mean"], dtype=torch.float32))
            st.inv_std.copy_(1.0 / torch.as_tensor(stats[m]["std"], dtype=torch.float32))

    def fit_input_stats(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.set_input_stats(feature_stats(arrays, self.modalities))

    # -- presence
    def presence(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, M] bool: which modalities each row has."""
        cols = []
        for m in self.modalities:
            key = schema.has_column(m)
            x = batch[schema.emb_column(m)]
            cols.append(batch[key].bool() if key in batch else torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
        return torch.stack(cols, dim=1)

    def _projected(self, batch, mask):
        maskf = mask.float()
        # zero missing inputs *and* their projections: a missing modality contributes nothing
        return torch.stack([self.proj[m](self.norm[m](self._input(batch, m)) * maskf[:, i:i + 1])
                            * maskf[:, i:i + 1] for i, m in enumerate(self.modalities)], dim=1)  # [B, M, H]

    def _input(self, batch, m: str) -> torch.Tensor:
        """[B, d]: modality ``m``'s embedding, or its learned encoder's output on its sequence input."""
        x = batch[schema.emb_column(m)]
        if m in self.encoders:
            return self.encoders[m](x, batch.get(f"{m}_len"))
        return x.float()

    def _gates(self, p, mask):
        """[B, M, H] gates: per row and hidden unit, a softmax over the present modalities."""
        b, n, h = p.shape
        scores = self.gate(p.flatten(1)).view(b, n, h)
        # a large finite negative (not -inf) keeps rows with nothing present finite in backward
        scores = scores.masked_fill(~mask.unsqueeze(-1), -1e9)
        return torch.softmax(scores, dim=1) * mask.float().unsqueeze(-1)

    def modality_weights(self, batch, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, M] fusion weights per row (rows sum to 1 over present modalities, 0 when none present).
        For ``gated``: the mean gate over hidden units."""
        mask = self.presence(batch) if mask is None else mask
        if self.fusion == "weighted":
            w = torch.softmax(self.weight_logits, 0).unsqueeze(0) * mask.float()
        elif self.fusion == "gated":
            w = self._gates(self._projected(batch, mask), mask).mean(-1)
        else:
            w = mask.float()
        return w / w.sum(1, keepdim=True).clamp_min(1e-12)

    def forward(self, batch: Mapping[str, torch.Tensor], mask: Optional[torch.Tensor] = None,
                with_aux: bool = False):
        """Logits [B, classes]; with ``with_aux``: (logits, unimodal logits [B, M, classes] or
        None, mask), what :meth:`loss` takes."""
        mask = self.presence(batch) if mask is None else mask
        p = self._projected(batch, mask)                               # [B, M, H]
        aux = None
        if self.fusion == "late":
            per = torch.stack([self.heads[m](p[:, i]) for i, m in enumerate(self.modalities)], dim=1)
            maskf = mask.float().unsqueeze(-1)
            logits = (per * maskf).sum(1) / maskf.sum(1).clamp_min(1.0)
            aux = per if len(self.modalities) > 1 else None
        else:
            if self.fusion == "early":
                fused = p.flatten(1)
            elif self.fusion == "weighted":
                w = torch.softmax(self.weight_logits, 0).unsqueeze(0) * mask.float()
                w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
                fused = (w.unsqueeze(-1) * p).sum(1)
            else:  # gated
                fused = (self._gates(p, mask) * p).sum(1)
            logits = self.head(fused)
            if with_aux and self.aux is not None:
                aux = torch.stack([self.aux[m](p[:, i]) for i, m in enumerate(self.modalities)], dim=1)
        return (logits, aux, mask) if with_aux else logits

    def loss(self, output, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the fused logits plus ``AUX_WEIGHT`` x the mean over modalities of
        each modality's own cross-entropy (over the rows that have it)."""
        if not isinstance(output, tuple):
            return F.cross_entropy(output, y)
        logits, aux, mask = output
        loss = F.cross_entropy(logits, y)
        if aux is None:
            return loss
        b, n, c = aux.shape
        per_row = F.cross_entropy(aux.reshape(b * n, c), y.repeat_interleave(n), reduction="none").view(b, n)
        maskf = mask.float()
        per_modality = (per_row * maskf).sum(0) / maskf.sum(0).clamp_min(1.0)
        return loss + AUX_WEIGHT * per_modality.mean()

    def global_weights(self) -> Optional[dict[str, float]]:
        """The learned modality weights of a ``weighted`` model (None for other fusions)."""
        if self.fusion != "weighted":
            return None
        w = torch.softmax(self.weight_logits.detach().float().cpu(), 0)
        return {m: float(w[i]) for i, m in enumerate(self.modalities)}


def drop_modalities(mask: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Modality dropout: drop each present modality of each row with probability ``p``.

    A row never loses all of its present modalities: if the draw would drop
    them all, one of them (chosen at random) is kept.
    """
    if p <= 0 or mask.shape[1] < 2:
        return mask
    r = torch.rand(mask.shape, generator=generator).to(mask.device)
    kept = mask & (r >= p)
    emptied = mask.any(1) & ~kept.any(1)
    if emptied.any():
        # keep the present modality with the highest random score
        scores = torch.rand(mask.shape, generator=generator).to(mask.device).masked_fill(~mask, -1.0)
        keep_one = F.one_hot(scores.argmax(1), mask.shape[1]).bool()
        kept = torch.where(emptied.unsqueeze(1), keep_one & mask, kept)
    return kept


# --- building, saving, loading --------------------------------------------------------------------
def arch_spec(fusion: str, dims: Mapping[str, int], num_classes: int, hidden: int, dropout: float,
              encoders: Optional[Mapping[str, Mapping]] = None) -> dict:
    """The ``arch`` entry of a model spec (what :func:`build_model` builds); ``encoders``:
    modality -> learned encoder (:func:`mmbatch.train.encoders.encoder_spec`)."""
    out = {"version": ARCH_VERSION, "fusion": fusion, "dims": {m: int(d) for m, d in dims.items()},
           "num_classes": int(num_classes), "hidden": int(hidden), "dropout": float(dropout)}
    if encoders:
        out["encoders"] = {m: dict(e) for m, e in encoders.items()}
    return out


def arch_args(spec: Mapping) -> dict:
    """Constructor arguments of :class:`FusionModel` from a model spec."""
    a = spec["arch"]
    if int(a.get("version", 1)) != ARCH_VERSION:
        from mmbatch.errors import UsageError
        raise UsageError(f"model {spec.get('name', '')!r} has architecture version {a.get('version', 1)}; this "
                         f"mmbatch builds version {ARCH_VERSION} (standardised inputs, auxiliary heads, "
                         "per-unit gates): retrain it")
    return {"dims": {m: int(d) for m, d in a["dims"].items()}, "num_classes": int(a["num_classes"]),
            "fusion": a["fusion"], "hidden": int(a["hidden"]), "dropout": float(a["dropout"]),
            "encoders": a.get("encoders")}


def build_model(spec: Mapping) -> FusionModel:
    return FusionModel(**arch_args(spec))


def save_model(model: nn.Module, spec: Mapping, model_dir: str) -> None:
    """Write ``model.pt`` (state_dict only) and ``model.json`` (spec) to a local or remote folder.

    ``model.json`` is written last: its presence means the export is complete.
    """
    import io
    fs, path = storage.url_to_fs(model_dir)
    fs.makedirs(path, exist_ok=True)
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, buf)
    storage.atomic_write_bytes(fs, storage.join(path, MODEL_FILE), buf.getvalue())
    storage.write_json(fs, storage.join(path, SPEC_FILE), dict(spec))


def read_spec(model_dir: str) -> Optional[dict]:
    fs, path = storage.url_to_fs(model_dir)
    return storage.read_json(fs, storage.join(path, SPEC_FILE))


def load_model(model_dir: str, device: str = "cpu") -> tuple[FusionModel, dict]:
    """(model in eval mode, spec) from an exported model folder.

    Also accepts a Ray Train checkpoint folder written by the training loop
    (``state.pt`` + ``meta.json``).
    """
    import io
    from mmbatch.errors import UsageError
    fs, path = storage.url_to_fs(model_dir)
    spec = storage.read_json(fs, storage.join(path, SPEC_FILE))
    if spec is not None:
        state = torch.load(io.BytesIO(fs.cat_file(storage.join(path, MODEL_FILE))), map_location=device,
                           weights_only=True)
    elif fs.exists(storage.join(path, "state.pt")):
        saved = torch.load(io.BytesIO(fs.cat_file(storage.join(path, "state.pt"))), map_location=device,
                           weights_only=True)
        spec = json.loads(saved["spec_json"])
        state = saved["model"]
    else:
        raise UsageError(f"{model_dir}: not a model folder (no {SPEC_FILE} + {MODEL_FILE}) "
                         "and not a training checkpoint (no state.pt)")
    model = build_model(spec)
    model.load_state_dict(state)
    return model.to(device).eval(), spec


def warm_start_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy every tensor of ``state`` whose name and shape match ``model``; returns the names copied."""
    own = model.state_dict()
    take = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    own.update(take)
    model.load_state_dict(own)
    return sorted(take)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

