"""``MixedKDLoss``: the drop-in online-distillation loss for K peer networks."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._checks import check_flag, check_peer_matrix_values
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


def _number(name: str, value: object, *, positive: bool = False, at_most: float = math.inf) -> float:
    """A finite real number (not a bool) >= 0 (> 0 if ``positive``, <= ``at_most``), as float."""
    bound = "> 0" if positive else ">= 0" if at_most == math.inf else f"in [0, {at_most:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"MixedKDLoss: '{name}' must be a number {bound}, got "
                        f"{type(value).__name__} {value!r}")
    v = float(value)
    if not (math.isfinite(v) and (v > 0 if positive else v >= 0) and v <= at_most):
        raise ValueError(f"MixedKDLoss: '{name}' must be a finite number {bound}, got {value!r}")
    return v


def _mode(value: object) -> str:
    if value not in MODES:
        raise ValueError(f"MixedKDLoss: 'mode' must be one of {MODES}, got {value!r}")
    return value  # type: ignore[return-value]


def _peer_count(peer_logits: object) -> int | None:
    """K as mixed_kd_loss reads it (one [K, B, C] tensor, alone or in a list, or K [B, C]
    tensors), or None where it would refuse the logits itself (a [B, C] tensor alone, not
    tensors, ...): its message names the real problem, not a K mismatch with peer_weights."""
    if isinstance(peer_logits, Tensor):
        return peer_logits.shape[0] if peer_logits.dim() == 3 else None
    if not isinstance(peer_logits, (list, tuple)) or not peer_logits:
        return None
    first = peer_logits[0]
    if not isinstance(first, Tensor):
        return None
    if len(peer_logits) == 1:
        return first.shape[0] if first.dim() == 3 else None
    return len(peer_logits)


# Checked on every assignment (MixedKDLoss.__setattr__), in __init__ and between steps alike.
_CHECKS = {
    "temperature": lambda v: _number("temperature", v, positive=True),
    "ce_weight": lambda v: _number("ce_weight", v),
    "kd_weight": lambda v: _number("kd_weight", v),
    "label_smoothing": lambda v: _number("label_smoothing", v, at_most=1.0),
    "detach_targets": lambda v: check_flag("MixedKDLoss", "detach_targets", v),
    "mode": _mode,
}


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
        peer_weights: [K, K] matrix A >= 0 for ``mode="ensemble"``; row k weighs the peers'
            logits that form peer k's target. Default: the mean of the other peers. Held as a
            float32 buffer (``criterion.to(device)`` moves it; ``.half()`` and other dtype
            changes leave it float32); it gets no gradient, so one that
            requires grad (an ``nn.Parameter``) is refused.

    The options are checked whenever they are set, so ``criterion.kd_weight = w`` between steps
    refuses a NaN, negative or bool ``w`` as the constructor does.

    The losses are summed over peers, so each peer receives the gradient of its own
    ``ce_weight * ce[k] + kd_weight * kd[k]``, exactly as with one optimizer per peer.
    """

    peer_weights: Tensor | None  # a buffer: moves with .to() and is saved in the state dict

    def __init__(self, temperature: float = 3.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 mode: str = "pairwise", label_smoothing: float = 0.0,
                 detach_targets: bool = True, peer_weights: Tensor | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.mode = mode
        self.label_smoothing = label_smoothing
        self.detach_targets = detach_targets
        self.register_buffer("peer_weights", self._checked_peer_weights(peer_weights))

    def __setattr__(self, name: str, value: object) -> None:
        check = _CHECKS.get(name)
        if check is not None:
            value = check(value)
        elif name == "peer_weights":
            value = self._checked_peer_weights(value)
        # (torch's stub types the value as Tensor | Module; every attribute passes through here)
        super().__setattr__(name, value)  # type: ignore[arg-type]

    def _checked_peer_weights(self, peer_weights: object) -> Tensor | None:
        if peer_weights is None:
            return None
        if self.mode != "ensemble":
            raise ValueError("MixedKDLoss: 'peer_weights' is used only with mode='ensemble'")
        if isinstance(peer_weights, Tensor) and peer_weights.requires_grad:
            raise ValueError("MixedKDLoss: 'peer_weights' requires grad (an nn.Parameter?), but "
                             "the loss gives gradients to the logits only; pass "
                             "peer_weights.detach() (or compute a learnable peer matrix's loss "
                             "with metamixer_fast.reference.mixed_kd_loss)")
        try:
            a = torch.as_tensor(peer_weights, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"MixedKDLoss: 'peer_weights' must be a [K, K] tensor (or nested "
                            f"lists) of numbers, got {type(peer_weights).__name__}") from None
        if a.dim() != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
            raise ValueError(f"MixedKDLoss: 'peer_weights' must be a finite [K, K] matrix "
                             f"with K >= 2, got shape {list(a.shape)}")
        check_peer_matrix_values(a, "MixedKDLoss", "peer_weights")
        return a

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MixedKDLoss:
        """``.to(device)`` moves 'peer_weights'; ``.half()``, ``.double()`` or ``.to(dtype)`` leave
        it float32, the precision the loss reads it in (fp16 would round a weight of 1/3)."""
        before = self._buffers.get("peer_weights")
        super()._apply(fn, recurse)
        after = self._buffers.get("peer_weights")
        if before is not None and after is not None and after.dtype != before.dtype:
            self._buffers["peer_weights"] = before.to(after.device)
        return self

    def forward(self, peer_logits: Tensor | Iterable[Tensor],
                target: Tensor | MixedTarget) -> MixedKDLossOutput:
        """``peer_logits``: [K, B, C] or K tensors [B, C] (a list, a tuple or any iterable, such
        as a generator, as ``mixed_kd_loss`` takes them); ``target``: class indices [B] or a
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
        if not isinstance(peer_logits, (Tensor, list, tuple)):
            try:
                # a generator or other iterable, as mixed_kd_loss takes it: read once, here, so
                # the K check below, the op and _explain all see the same tensors
                peer_logits = list(peer_logits)
            except TypeError:
                pass  # not iterable: mixed_kd_loss names 'logits'
        peer_matrix = self.peer_weights
        if peer_matrix is not None:
            k = _peer_count(peer_logits)
            if k is not None and peer_matrix.shape[0] != k:
                raise ValueError(f"MixedKDLoss: 'peer_weights' is {list(peer_matrix.shape)} but "
                                 f"{k} peers were given")
        try:
            ce, kd = mixed_kd_loss(peer_logits, labels, weights, temperature=self.temperature,
                                   label_smoothing=self.label_smoothing, mode=self.mode,
                                   peer_matrix=peer_matrix, detach_targets=self.detach_targets)
        except (RuntimeError, TypeError, ValueError):
            self._explain(peer_logits)  # errors that only the module's own names explain
            raise
        loss = self.ce_weight * ce.sum() + self.kd_weight * kd.sum()
        return MixedKDLossOutput(loss, ce, kd)

    def _explain(self, peer_logits: object) -> None:
        """The functional API names its 'peer_matrix'; the module's is its buffer peer_weights.
        ``peer_logits`` as forward passed it on (a tensor, a list or tuple, or what mixed_kd_loss
        refused as not iterable: then there is nothing to add to its message)."""
        a = self.peer_weights
        if a is None:
            return
        first = (peer_logits if isinstance(peer_logits, Tensor)
                 else peer_logits[0] if isinstance(peer_logits, (list, tuple)) and peer_logits
                 else None)
        if isinstance(first, Tensor) and a.device != first.device:
            raise ValueError(f"MixedKDLoss: its 'peer_weights' buffer is on {a.device} but the "
                             f"logits are on {first.device}; move the criterion with "
                             f"criterion.to({str(first.device)!r})")
        if a.requires_grad and torch.is_grad_enabled():
            raise ValueError("MixedKDLoss: 'peer_weights' requires grad, but the loss gives "
                             "gradients to the logits only; call "
                             "criterion.peer_weights.requires_grad_(False)")
        check_peer_matrix_values(a, "MixedKDLoss", "peer_weights")  # (changed in place)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ce_weight={self.ce_weight}, "
                f"kd_weight={self.kd_weight}, mode={self.mode!r}, "
                f"label_smoothing={self.label_smoothing}, detach_targets={self.detach_targets}")
