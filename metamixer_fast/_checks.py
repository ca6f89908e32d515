"""Argument checks shared by the ops, their fake implementations and the modules.

Shape/dtype/device checks (``check_*_args``) need no data and also run while tracing under
``torch.compile``. Value checks (``check_*_values``: label range, weights, boxes) read the
data, so they run on CPU tensors only; on CUDA they are queued as asynchronous device
asserts, never as a host sync.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from .reference import MODES

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIX_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: Tensor) -> str:
    return f"{t.dtype} tensor of shape {list(t.shape)} on {t.device}"


def _type_name(value: object) -> str:
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def require_tensor(op: str, name: str, value: object, optional: bool = False) -> None:
    """A TypeError naming ``name`` unless ``value`` is a tensor (or None, when ``optional``)."""
    if isinstance(value, Tensor) or (optional and value is None):
        return
    fix = ("convert it with torch.from_numpy" if type(value).__module__ == "numpy"
           else "wrap it with torch.tensor(...)")
    raise TypeError(f"{op}: '{name}' must be a torch.Tensor{' or None' if optional else ''}, got "
                    f"{_type_name(value)} {_show(value)}; {fix}")


def as_number(op: str, name: str, value: object) -> float:
    """``float(value)``, refusing what is not a number (a bool, a string, None) by name, and a
    tensor that requires grad: float() would cut it from the graph, so a learnable temperature
    would silently get no gradient (torch only warns). A plain one-element tensor is a number."""
    if isinstance(value, Tensor) and value.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: '{name}' requires grad, but the op gives gradients to the logits "
                         f"only; pass {name}.detach() or a float (or compute a learnable "
                         f"{name}'s loss with metamixer_fast.reference.mixed_kd_loss)")
    if not isinstance(value, (bool, str, bytes)) and type(value).__name__ != "bool_":
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{op}: '{name}' must be a number, got {_type_name(value)} {_show(value)}")


def check_flag(op: str, name: str, value: object) -> bool:
    if type(value) is not bool:
        raise TypeError(f"{op}: '{name}' must be True or False, got {_type_name(value)} "
                        f"{_show(value)}")
    return value


def check_options(temperature: object, label_smoothing: object, detach_targets: object) -> None:
    """mixed_kd_loss's scalar options that a bare float() / truth test would misread: a bool
    taken as 1.0 or 0.0, a string taken as True."""
    op = "mixed_kd_loss"
    as_number(op, "temperature", temperature)
    as_number(op, "label_smoothing", label_smoothing)
    check_flag(op, "detach_targets", detach_targets)


def logits_shape(logits: Sequence[Tensor]) -> tuple[int, int, int]:
    """(K, B, C) of logits given as [one [K, B, C] tensor] or K tensors [B, C]; checks them."""
    op = "mixed_kd_loss"
    if len(logits) == 0:
        raise ValueError(f"{op}: 'logits' is empty; pass a [K, B, C] tensor or K >= 2 [B, C] tensors")
    first = logits[0]
    for i, z in enumerate(logits):
        if not isinstance(z, Tensor):
            raise TypeError(f"{op}: 'logits[{i}]' must be a tensor, got {type(z).__name__}")
        if z.dtype not in LOGIT_DTYPES:
            raise TypeError(f"{op}: 'logits' must be float16/bfloat16/float32/float64, "
                            f"got {_describe(z)}")
        if z.dtype != first.dtype or z.device != first.device or z.shape != first.shape:
            raise ValueError(f"{op}: every peer's logits must share shape, dtype and device; "
                             f"logits[0] is a {_describe(first)}, logits[{i}] is a {_describe(z)}")
    if len(logits) == 1:
        if first.dim() == 2:  # one peer's [B, C], alone or in a list
            raise ValueError(f"{op}: distillation needs K >= 2 peers, got the logits of one peer "
                             f"({_describe(first)}); pass a list of K [B, C] tensors or one "
                             f"[K, B, C] tensor")
        if first.dim() != 3:
            raise ValueError(f"{op}: 'logits' must be [K, B, C] (or a list of K [B, C] tensors), "
                             f"got a {_describe(first)}")
        k, b, c = first.shape
    else:
        if first.dim() != 2:
            raise ValueError(f"{op}: each of the K peer logits must be [B, C], got a {_describe(first)}")
        k, (b, c) = len(logits), first.shape
    if k < 2:
        raise ValueError(f"{op}: distillation needs K >= 2 peers, got K={k}")
    if b < 1 or c < 1:
        raise ValueError(f"{op}: 'logits' needs B >= 1 rows and C >= 1 classes, got B={b}, C={c}")
    return k, b, c


def as_label_plan(labels: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """Plain class indices [B] become the one-label plan (labels[B, 1], weights = 1)."""
    if labels.dim() == 1:
        if weights is not None:
            raise ValueError("mixed_kd_loss: 'weights' goes with labels [B, M]; for class "
                             "indices [B] leave it out")
        labels = labels.unsqueeze(1)
        return labels, torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    if weights is None:
        if labels.dim() == 2 and labels.shape[1] == 1:
            return labels, torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
        raise ValueError(f"mixed_kd_loss: labels of shape {list(labels.shape)} need 'weights' of "
                         f"the same shape (rows summing to 1)")
    return labels, weights


def _check_labels(op: str, labels: Tensor, b: int, given: Tensor) -> None:
    """labels [B, M] int64; ``given`` is the tensor the caller passed (class indices [B] become
    [B, 1] on the way), which the message shows."""
    if labels.dtype == torch.int64 and labels.dim() == 2 and labels.shape[0] == b \
            and labels.shape[1] >= 1:
        return
    if given.dim() not in (1, 2) or given.shape[-1] < 1:
        raise ValueError(f"{op}: 'labels' must be class indices [B] = [{b}] or a label mixture "
                         f"[B, M] = [{b}, M] with M >= 1 (and 'weights'); got a {_describe(given)}")
    if given.shape[0] != b:
        raise ValueError(f"{op}: 'labels' must have B = {b} {'entries' if given.dim() == 1 else 'rows'}, "
                         f"one per row of the logits; got a {_describe(given)}")
    raise ValueError(f"{op}: 'labels' must be int64 class indices; got a {_describe(given)}; "
                     f"pass labels.long()")


def check_mixed_kd_loss_args(logits: Sequence[Tensor], labels: Tensor, weights: Tensor,
                             temperature: float, label_smoothing: float, mode: str,
                             peer_matrix: Tensor | None,
                             given_labels: Tensor | None = None) -> tuple[int, int, int]:
    """``given_labels``: the labels as the caller passed them, when ``labels`` is their [B, M]
    form (for the message)."""
    op = "mixed_kd_loss"
    k, b, c = logits_shape(logits)
    device = logits[0].device
    _check_labels(op, labels, b, labels if given_labels is None else given_labels)
    if not weights.is_floating_point() or weights.shape != labels.shape:
        raise ValueError(f"{op}: 'weights' must be a floating tensor shaped like labels "
                         f"{list(labels.shape)}; got a {_describe(weights)}")
    for name, t in (("labels", labels), ("weights", weights)):
        if t.device != device:
            raise ValueError(f"{op}: '{name}' is on {t.device} but the logits are on {device}; "
                             f"move it with .to({str(device)!r})")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: 'temperature' must be a finite number > 0, got {temperature!r}")
    if isinstance(label_smoothing, bool) or not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{op}: 'label_smoothing' must be in [0, 1], got {label_smoothing!r}")
    if mode not in MODES:
        raise ValueError(f"{op}: 'mode' must be one of {MODES}, got {mode!r}")
    if peer_matrix is not None:
        if mode != "ensemble":
            raise ValueError(f"{op}: 'peer_matrix' is used only with mode='ensemble'; "
                             f"got one with mode={mode!r}")
        if not peer_matrix.is_floating_point() or peer_matrix.shape != (k, k):
            raise ValueError(f"{op}: 'peer_matrix' must be a floating [K, K] = [{k}, {k}] tensor, "
                             f"got a {_describe(peer_matrix)}")
        if peer_matrix.device != device:
            raise ValueError(f"{op}: 'peer_matrix' is on {peer_matrix.device} but the logits are "
                             f"on {device}; move it with .to({str(device)!r})")
    return k, b, c


def check_no_grad_to(weights: Tensor, peer_matrix: Tensor | None) -> None:
    """The op differentiates the logits only: a weights or peer_matrix tensor that needs a
    gradient (a learnable gate) would silently get none."""
    if not torch.is_grad_enabled():
        return
    for name, t in (("weights", weights), ("peer_matrix", peer_matrix)):
        if t is not None and t.requires_grad:
            raise ValueError(f"mixed_kd_loss: '{name}' requires grad, but the op gives gradients "
                             f"to the logits only; pass {name}.detach() (or compute a learnable "
                             f"{name}'s loss with metamixer_fast.reference.mixed_kd_loss)")


def _value_check(ok: Tensor, message: str) -> None:
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def weight_sum_tolerance(dtype: torch.dtype, m: int) -> float:
    """How far from 1 a row of ``m`` label weights of ``dtype`` may sum: max(1e-3, m eps(dtype)).

    1e-3 alone refused bf16 rows normalised in bf16 (they miss 1 by up to ~0.008). A row
    normalised in ``dtype`` misses 1 only by roundings of u = eps / 2: each entry's rounding is
    u times the entry (u in all, as the entries sum to ~1), and the divisor, the row's sum, is
    off by u relative when rounded once from a wider accumulator (torch's ``sum``; a softmax
    rounds only the entries) or by up to (m - 1) u when accumulated in ``dtype``. So
    |row sum - 1| <= m u / (1 - (m - 1) u), which is <= m eps while (m - 1) u <= 1/2 (m = 1:
    x / x is 1 exactly). Measured: up to 0.0059 for two bf16 weights normalised by torch, 0.016
    for sixteen accumulated in bf16. A clearly wrong row is still refused: m eps is 0.016 for two
    bf16 weights and 0.03 for four (a row summing to 0.9 or 1.1 is refused up to m = 12 in bf16,
    102 in fp16); fp32 and fp64 keep 1e-3. The C++ (csrc/mixed_kd_loss.cpp) and Triton
    (kernels/mixed_kd_loss.py) checks apply the same rule."""
    return max(1e-3, m * torch.finfo(dtype).eps)


def weight_sum_message(tol: float, dtype: torch.dtype, m: int) -> str:
    """The message for a row of weights that does not sum to 1 (the C++ check's is the same)."""
    return (f"mixed_kd_loss: each row of 'weights' must sum to 1 (within {tol:g} for {m} "
            f"{str(dtype).removeprefix('torch.')} weights per row); normalise it with "
            f"weights / weights.sum(1, keepdim=True)")


def check_mixed_kd_loss_values(labels: Tensor, weights: Tensor, num_classes: int,
                               peer_matrix: Tensor | None) -> None:
    op = "mixed_kd_loss"
    in_range = ((labels >= 0) & (labels < num_classes)).all()
    if labels.device.type == "cpu":
        if not bool(in_range):
            raise ValueError(f"{op}: 'labels' must hold class indices in [0, {num_classes}); "
                             f"found values from {int(labels.min())} to {int(labels.max())}")
    else:
        torch._assert_async(in_range, f"{op}: 'labels' must hold class indices in [0, {num_classes})")
    _value_check(((weights >= 0) & weights.isfinite()).all(),
                 f"{op}: 'weights' must be finite and >= 0 (a mixture of labels per row)")
    tol = weight_sum_tolerance(weights.dtype, weights.shape[1])
    _value_check(((weights.sum(1, dtype=torch.float32) - 1).abs() <= tol).all(),
                 weight_sum_message(tol, weights.dtype, weights.shape[1]))
    if peer_matrix is not None:
        check_peer_matrix_values(peer_matrix)


def check_peer_matrix_values(peer_matrix: Tensor, op: str = "mixed_kd_loss",
                             name: str = "peer_matrix") -> None:
    """A[k, j] >= 0 and finite: row k weighs the peers' logits that form peer k's target (an
    ensemble, DESIGN.md 2.1). A zero row (a uniform target) and a non-zero diagonal (a peer in
    its own ensemble) are allowed."""
    ok = (peer_matrix.isfinite() & (peer_matrix >= 0)).all()
    if ok.device.type != "cpu":
        torch._assert_async(ok, f"{op}: '{name}' must be finite and >= 0")
    elif not bool(ok):
        if not bool(peer_matrix.isfinite().all()):
            raise ValueError(f"{op}: '{name}' has NaN or inf entries")
        raise ValueError(f"{op}: '{name}' has negative entries (min {float(peer_matrix.min()):g}); "
                         f"row k weighs the peers' logits that form peer k's target, so every "
                         f"weight must be >= 0")


# id -> (weak reference, version) of CPU peer matrices that passed check_peer_matrix_values
_checked_peer_matrices: dict[int, tuple[weakref.ref, int]] = {}


def check_peer_matrix_once(peer_matrix: object) -> None:
    """check_peer_matrix_values for the eager path (the C++ entry checks finiteness only), run
    once per CPU tensor and version: a MixedKDLoss's buffer, passed every step, costs a lookup.
    Other tensors are left to the op body (a device assert on CUDA)."""
    seen = _checked_peer_matrices.get(id(peer_matrix))
    if seen is not None and seen[0]() is peer_matrix and seen[1] == getattr(peer_matrix, "_version", None):
        return
    require_tensor("mixed_kd_loss", "peer_matrix", peer_matrix, optional=True)
    t: Tensor = peer_matrix  # type: ignore[assignment]
    if (t.device.type != "cpu" or type(t) not in (Tensor, torch.nn.Parameter)
            or torch._C._functorch.is_functorch_wrapped_tensor(t) or t.is_inference()
            or not t.is_floating_point() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()):
        return  # not ours to read here (a mode would see the reads), or a dtype the shape checks name
    check_peer_matrix_values(t)
    if len(_checked_peer_matrices) >= 16:
        _checked_peer_matrices.clear()
    _checked_peer_matrices[id(t)] = (weakref.ref(t), t._version)


def check_mix_types(x: object, src: object, w: object, box: object, op: str = "mix") -> None:
    """Tensors where the op's schema wants them (a call with anything else never reaches
    check_mix_args: the op's argument parser refuses it with a schema dump)."""
    for name, t in (("x", x), ("src", src), ("w", w)):
        require_tensor(op, name, t)
    require_tensor(op, "box", box, optional=True)


def check_mix_args(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None, op: str = "mix") -> None:
    if x.dtype not in MIX_DTYPES:
        raise TypeError(f"{op}: 'x' must be uint8/float16/bfloat16/float32/float64, got a {_describe(x)}")
    if x.dim() not in (2, 4) or x.shape[0] < 1:
        raise ValueError(f"{op}: 'x' must be [N, C, H, W] images or [N, D] features with N >= 1, "
                         f"got a {_describe(x)}")
    n = x.shape[0]
    if src.dtype != torch.int64 or src.shape != (n,):
        raise ValueError(f"{op}: 'src' must be an int64 tensor [N] = [{n}] of partner indices, "
                         f"got a {_describe(src)}")
    if not w.is_floating_point() or w.shape != (n,):
        raise ValueError(f"{op}: 'w' must be a floating tensor [N] = [{n}] of blend weights, "
                         f"got a {_describe(w)}")
    if box is not None:
        if x.dim() == 2:
            raise ValueError(f"{op}: 'box' must be None for [N, D] features (the box is the whole "
                             f"sample); got a {_describe(box)}")
        if box.dtype not in (torch.int32, torch.int64) or box.shape != (n, 4):
            raise ValueError(f"{op}: 'box' must be an int32/int64 tensor [N, 4] = [{n}, 4] of "
                             f"(y0, y1, x0, x1), got a {_describe(box)}")
    for name, t in (("src", src), ("w", w), ("box", box)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: '{name}' is on {t.device} but 'x' is on {x.device}; "
                             f"move it with .to({str(x.device)!r})")


def check_no_grad_through_integers(x: Tensor, needs_grad: Sequence[bool], names: Sequence[str],
                                   op: str) -> None:
    """A blend weight that requires grad mixing integer images: the uint8 output carries no
    gradient, so autograd would silently drop w's. ``needs_grad`` follows ``names``."""
    if x.dtype == torch.uint8:
        for name, needed in zip(names, needs_grad):
            if needed:
                raise ValueError(f"{op}: '{name}' requires grad, but 'x' is uint8: integer images "
                                 f"carry no gradient; pass {name}.detach() or mix a floating x "
                                 f"(e.g. x.float())")


def check_mix_values(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None, op: str = "mix") -> None:
    n = x.shape[0]
    _value_check(((src >= 0) & (src < n)).all(),
                 f"{op}: 'src' must hold sample indices in [0, N={n})")
    _value_check(((w >= 0) & (w <= 1)).all(), f"{op}: 'w' must lie in [0, 1] (and not be NaN)")
    if box is not None:
        h, wd = x.shape[-2:]
        y0, y1, x0, x1 = box.unbind(1)
        ok = (0 <= y0) & (y0 <= y1) & (y1 <= h) & (0 <= x0) & (x0 <= x1) & (x1 <= wd)
        _value_check(ok.all(), f"{op}: each 'box' row (y0, y1, x0, x1) must satisfy "
                               f"0 <= y0 <= y1 <= H={h} and 0 <= x0 <= x1 <= W={wd}")


def check_mix2_values(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None, src2: Tensor,
                      w2: Tensor) -> None:
    op = "mix2"
    check_mix_values(x, src, w, box, op)
    n = x.shape[0]
    _value_check(((src2 >= 0) & (src2 < n)).all(), f"{op}: 'src2' must hold sample indices in [0, N={n})")
    _value_check(((w2 >= 0) & (w2 <= 1)).all(), f"{op}: 'w2' must lie in [0, 1] (and not be NaN)")
