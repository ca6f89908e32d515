"""``MixedKDLoss``: the drop-in online-distillation loss for K peer networks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .ops import mixed_kd_loss
from .reference import MODES

__all__ = ["MixedKDLoss", "MixedKDLossOutput", "MixedTarget"]


class MixedTarget(NamedTuple):
    """A label mixture: sample b is labels[b, m] with weight weights[b, m] (rows sum to 1)."""

    labels: Tensor  # [B, M] int64
    weights: Tensor  # [B, M] float


class MixedKDLossOutput(NamedTuple):
    """``loss`` = ce_weight * ce.sum() + kd_weight * kd.sum(); ``ce``/``kd`` are per peer [K]."""

    loss: Tensor
    ce: Tensor
    kd: Tensor


class MixedKDLoss(nn.Module):
    """Cross-entropy on (mixed) labels plus mutual distillation between K peers.

    Args:
        temperature: softmax temperature T > 0 of the distillation term (scaled by T^2).
        ce_weight: weight of the cross-entropy term.
        kd_weight: weight of the distillation term; may be changed between steps (a ramp).
        mode: ``"pairwise"`` (DML: each peer to every other) or ``"ensemble"`` (each peer to a
            logit-space ensemble of the peers, weights given by ``peer_weights``).
        label_smoothing: eps in [0, 1], spread uniformly over all classes.
        detach_targets: if True (default) the distillation targets pass no gradient.
        peer_weights: [K, K] matrix A for ``mode="ensemble"``; row k weighs the peers' logits
            that form peer k's target. Default: the mean of the other peers.

    The losses are summed over peers, so each peer receives the gradient of its own
    ``ce_weight * ce[k] + kd_weight * kd[k]``, exactly as with one optimizer per peer.
    """

    def __init__(self, temperature: float = 3.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 mode: str = "pairwise", label_smoothing: float = 0.0,
                 detach_targets: bool = True, peer_weights: Tensor | None = None) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature > 0):
            raise ValueError(f"MixedKDLoss: 'temperature' must be a finite number > 0, got {temperature!r}")
        for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"MixedKDLoss: '{name}' must be a finite number >= 0, got {value!r}")
        if mode not in MODES:
            raise ValueError(f"MixedKDLoss: 'mode' must be one of {MODES}, got {mode!r}")
        if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
            raise ValueError(f"MixedKDLoss: 'label_smoothing' must be in [0, 1], got {label_smoothing!r}")
        if peer_weights is not None:
            if mode != "ensemble":
                raise ValueError("MixedKDLoss: 'peer_weights' is used only with mode='ensemble'")
            peer_weights = torch.as_tensor(peer_weights, dtype=torch.float32)
            if peer_weights.dim() != 2 or peer_weights.shape[0] != peer_weights.shape[1] \
                    or peer_weights.shape[0] < 2 or not bool(peer_weights.isfinite().all()):
                raise ValueError(f"MixedKDLoss: 'peer_weights' must be a finite [K, K] matrix "
                                 f"with K >= 2, got shape {list(peer_weights.shape)}")
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.kd_weight = float(kd_weight)
        self.mode = mode
        self.label_smoothing = float(label_smoothing)
        self.detach_targets = bool(detach_targets)
        self.register_buffer("peer_weights", peer_weights)

    def forward(self, peer_logits: Tensor | Sequence[Tensor],
                target: Tensor | MixedTarget) -> MixedKDLossOutput:
        """``peer_logits``: [K, B, C] or K tensors [B, C]; ``target``: class indices [B] or a
        ``MixedTarget``."""
        if isinstance(target, MixedTarget):
            labels, weights = target.labels, target.weights
        elif isinstance(target, Tensor):
            if target.dim() != 1:
                raise ValueError(f"MixedKDLoss: a tensor target must be class indices [B], got "
                                 f"shape {list(target.shape)}; wrap label mixtures in MixedTarget")
            labels, weights = target, None
        else:
            raise TypeError(f"MixedKDLoss: 'target' must be a tensor of class indices or a "
                            f"MixedTarget, got {type(target).__name__}")
        peer_matrix = self.peer_weights
        if peer_matrix is not None:
            k = peer_logits.shape[0] if isinstance(peer_logits, Tensor) else len(peer_logits)
            if peer_matrix.shape[0] != k:
                raise ValueError(f"MixedKDLoss: 'peer_weights' is {list(peer_matrix.shape)} but "
                                 f"{k} peers were given")
        ce, kd = mixed_kd_loss(peer_logits, labels, weights, temperature=self.temperature,
                               label_smoothing=self.label_smoothing, mode=self.mode,
                               peer_matrix=peer_matrix, detach_targets=self.detach_targets)
        loss = self.ce_weight * ce.sum() + self.kd_weight * kd.sum()
        return MixedKDLossOutput(loss, ce, kd)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ce_weight={self.ce_weight}, "
                f"kd_weight={self.kd_weight}, mode={self.mode!r}, "
                f"label_smoothing={self.label_smoothing}, detach_targets={self.detach_targets}")
