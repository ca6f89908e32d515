"""The ``metamixer::`` ops: schema, fake (meta) implementation, autograd, backend dispatch.

``metamixer::mixed_kd_loss`` and ``metamixer::mix`` are ``torch.library`` custom ops, so
``torch.compile(fullgraph=True)`` traces them without a graph break (through their fake
implementations) and autograd differentiates them through their backward ops
``metamixer::mixed_kd_loss_backward`` and ``metamixer::mix_backward``. Each op body picks a
kernel per device with ``metamixer_fast._backend`` (C++ on CPU, Triton on CUDA, the
reference otherwise or when forced).

Eager calls of the public functions skip the custom op where nothing must see it
(``_backend.runs_direct``: no tracing, jit trace, mode or forward-AD level, plain tensors): a C++
entry takes the call where one is registered and accepts it; otherwise a call that needs no
gradient runs the op's body, and one that does links the body and the op's backward rule
through a ``torch.autograd.Function`` (``_MixedKDLoss``, ``_Mix``), whose backward calls the
backward kernel directly. Same kernels, same bits as the op; 44 % less time for a small
loss step on CPU (bench/bench_call_routes.py, the README's table).

Forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) has no formula here: each op
refuses an input that carries a tangent (``_backend.refuse_forward_ad``) instead of returning
outputs without one.

Logits travel as ``Tensor[]``: either one [K, B, C] tensor or K tensors [B, C], so neither
form is ever copied into the other, and the backward returns gradients in the same form.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from . import _backend, reference
from ._checks import (
    as_label_plan,
    as_number,
    check_mix_args,
    check_mix_types,
    check_mix_values,
    check_mixed_kd_loss_args,
    check_mixed_kd_loss_values,
    check_no_grad_through_integers,
    check_no_grad_to,
    check_options,
    check_peer_matrix_once,
    require_tensor,
)
from ._layout import mix_output

__all__ = ["mix", "mixed_kd_loss"]

# ----------------------------------------------------------------------------- mixed_kd_loss

def _mixed_kd_loss_forward(logits: list[Tensor], labels: Tensor, weights: Tensor,
                           temperature: float, label_smoothing: float, mode: str,
                           peer_matrix: Tensor | None,
                           detach_targets: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (ce[K], kd[K], row_stats[K, B, 3]); row_stats (float64) is what the backward
    reuses."""
    _, _, c = check_mixed_kd_loss_args(logits, labels, weights, temperature, label_smoothing,
                                       mode, peer_matrix)
    run = _backend.kernel("mixed_kd_loss", logits[0].device)
    if not getattr(run, "checks_values", False):  # the C++ and Triton kernels check themselves
        check_mixed_kd_loss_values(labels, weights, c, peer_matrix)
    elif peer_matrix is not None:  # ... but the C++ kernel only for NaN/inf in the peer matrix
        check_peer_matrix_once(peer_matrix)
    return run(logits, labels, weights, temperature, label_smoothing, mode, peer_matrix,
               detach_targets)


_mixed_kd_loss = torch.library.custom_op("metamixer::mixed_kd_loss", _mixed_kd_loss_forward,
                                         mutates_args=())


@_mixed_kd_loss.register_fake
def _(logits, labels, weights, temperature, label_smoothing, mode, peer_matrix, detach_targets):
    k, b, _ = check_mixed_kd_loss_args(logits, labels, weights, temperature, label_smoothing,
                                       mode, peer_matrix)
    dtype = reference.output_dtype(logits[0].dtype)
    z = logits[0]
    return (z.new_empty(k, dtype=dtype), z.new_empty(k, dtype=dtype),
            z.new_empty(k, b, 3, dtype=torch.float64))  # row_stats: float64 on every backend


def _mixed_kd_loss_backward_body(grad_ce: Tensor, grad_kd: Tensor, logits: list[Tensor],
                                 labels: Tensor, weights: Tensor, row_stats: Tensor,
                                 temperature: float, label_smoothing: float, mode: str,
                                 peer_matrix: Tensor | None, detach_targets: bool) -> list[Tensor]:
    """Gradient of sum_k grad_ce[k] ce[k] + grad_kd[k] kd[k] w.r.t. each logits tensor."""
    run = _backend.kernel("mixed_kd_loss_backward", logits[0].device)
    return run(grad_ce, grad_kd, logits, labels, weights, row_stats, temperature,
               label_smoothing, mode, peer_matrix, detach_targets)


_mixed_kd_loss_backward = torch.library.custom_op("metamixer::mixed_kd_loss_backward",
                                                  _mixed_kd_loss_backward_body, mutates_args=())


@_mixed_kd_loss_backward.register_fake
def _(grad_ce, grad_kd, logits, labels, weights, row_stats, temperature, label_smoothing, mode,
      peer_matrix, detach_targets):
    return [torch.empty_like(z) for z in logits]


def _mixed_kd_loss_setup_context(ctx, inputs, output) -> None:
    logits, labels, weights, temperature, label_smoothing, mode, peer_matrix, detach = inputs
    ctx.n_logits = len(logits)
    ctx.has_peer_matrix = peer_matrix is not None
    ctx.args = (temperature, label_smoothing, mode, detach)
    extra = [peer_matrix] if peer_matrix is not None else []
    ctx.save_for_backward(*logits, labels, weights, output[2], *extra)


def _mixed_kd_loss_backward_rule(ctx, grad_ce, grad_kd, _grad_stats):
    saved = ctx.saved_tensors
    n = ctx.n_logits
    logits = list(saved[:n])
    labels, weights, row_stats = saved[n:n + 3]
    peer_matrix = saved[n + 3] if ctx.has_peer_matrix else None
    temperature, label_smoothing, mode, detach = ctx.args
    run = _backend.body_or_op(_mixed_kd_loss_backward_body,
                              torch.ops.metamixer.mixed_kd_loss_backward, grad_ce, grad_kd,
                              *logits, labels, weights, row_stats, peer_matrix)
    grads = run(grad_ce, grad_kd, logits, labels, weights, row_stats, temperature,
                label_smoothing, mode, peer_matrix, detach)
    return grads, None, None, None, None, None, None, None


_mixed_kd_loss.register_autograd(_mixed_kd_loss_backward_rule,
                                 setup_context=_mixed_kd_loss_setup_context)
# No forward-mode formula: a tangent on the logits (or on the gradients, forward-over-reverse)
# is refused rather than dropped (_backend.refuse_forward_ad).
_backend.refuse_forward_ad("mixed_kd_loss")
_backend.refuse_forward_ad("mixed_kd_loss_backward")


def _direct_loss_forward(labels, weights, temperature, label_smoothing, mode, peer_matrix,
                         detach_targets, *logits):
    return _mixed_kd_loss_forward(list(logits), labels, weights, temperature, label_smoothing,
                                  mode, peer_matrix, detach_targets)


def _direct_loss_setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[2])
    _mixed_kd_loss_setup_context(ctx, (list(inputs[7:]), *inputs[:7]), output)


def _direct_loss_backward(ctx, grad_ce, grad_kd, _grad_stats):
    grads, *_ = _mixed_kd_loss_backward_rule(ctx, grad_ce, grad_kd, None)
    return (None,) * 7 + tuple(grads)


# metamixer::mixed_kd_loss for plain eager calls (_backend.runs_direct): the op's body forward
# and its backward rule, without the custom op's dispatch. The logits come last, one argument
# each, so that autograd tracks them.
_MixedKDLoss = _backend.direct_function("_MixedKDLoss", _direct_loss_forward,
                                        _direct_loss_setup_context, _direct_loss_backward)


def _reference_forward(logits, labels, weights, temperature, label_smoothing, mode, peer_matrix,
                       detach_targets):
    ce, kd = reference.mixed_kd_loss(logits, labels, weights, temperature, label_smoothing, mode,
                                     peer_matrix, detach_targets)
    return ce, kd, reference.row_stats(logits, temperature, mode, peer_matrix)


def _reference_backward(grad_ce, grad_kd, logits, labels, weights, row_stats, temperature,
                        label_smoothing, mode, peer_matrix, detach_targets):
    dz = reference.mixed_kd_loss_backward(grad_ce, grad_kd, logits, labels, weights, temperature,
                                          label_smoothing, mode, peer_matrix, detach_targets)
    parts = [dz] if len(logits) == 1 else dz.unbind(0)
    return [torch.empty_like(z).copy_(d) for z, d in zip(logits, parts)]


_backend.register_kernel("mixed_kd_loss", "reference", _reference_forward)
_backend.register_kernel("mixed_kd_loss_backward", "reference", _reference_backward)


def _op_args(logits: Tensor | Iterable[Tensor], labels: Tensor, weights: Tensor | None,
             peer_matrix: Tensor | None) -> tuple[list[Tensor], Tensor, Tensor]:
    """(logits as a list, labels [B, M], weights [B, M]), as the custom op takes them."""
    op = "mixed_kd_loss"
    if isinstance(logits, Tensor):
        z = [logits]
    else:
        if not isinstance(logits, (list, tuple)):
            try:
                logits = list(logits)
            except TypeError:
                raise TypeError(f"{op}: 'logits' must be a [K, B, C] tensor or a list of K [B, C] "
                                f"tensors, got {type(logits).__name__}") from None
        z = list(logits)
        for i, t in enumerate(z):
            require_tensor(op, f"logits[{i}]", t)
    require_tensor(op, "labels", labels)
    require_tensor(op, "weights", weights, optional=True)
    require_tensor(op, "peer_matrix", peer_matrix, optional=True)
    labels, weights = as_label_plan(labels, weights)
    return z, labels, weights


def _explain_mixed_kd_loss(logits: Tensor | Sequence[Tensor], labels: Tensor,
                           weights: Tensor | None, temperature: float, label_smoothing: float,
                           mode: str, peer_matrix: Tensor | None, detach_targets: bool) -> None:
    """The Python checks of mixed_kd_loss, run when the eager entry or the op body rejects a
    call; they name the argument as the caller gave it."""
    given_labels = labels
    check_options(temperature, label_smoothing, detach_targets)
    z, labels, weights = _op_args(logits, labels, weights, peer_matrix)
    check_no_grad_to(weights, peer_matrix)
    check_mixed_kd_loss_args(z, labels, weights, float(temperature), float(label_smoothing), mode,
                             peer_matrix, given_labels)


def mixed_kd_loss(logits: Tensor | Iterable[Tensor], labels: Tensor, weights: Tensor | None = None,
                  *, temperature: float = 1.0, label_smoothing: float = 0.0,
                  mode: str = "pairwise", peer_matrix: Tensor | None = None,
                  detach_targets: bool = True) -> tuple[Tensor, Tensor]:
    """Fused per-peer cross-entropy and distillation losses; returns (ce[K], kd[K]).

    ``logits``: a [K, B, C] tensor or K tensors [B, C] (a list, a tuple or any iterable; no
    stacking copy is made).
    ``labels``: class indices [B], or a label mixture [B, M] with ``weights`` [B, M].
    ``peer_matrix``: for ``mode="ensemble"``, [K, K] weights >= 0; row k weighs the peers' logits
    that form peer k's target (default: the mean of the other peers).
    See ``metamixer_fast.reference.mixed_kd_loss`` for the exact formulas.
    """
    # what the C++ entry would read as a number or a truth value: True as 1.0, "no" as True,
    # a tensor through float() (which would drop a gradient it requires, silently)
    if (type(temperature) is bool or type(label_smoothing) is bool or type(detach_targets) is not bool
            or isinstance(temperature, Tensor) or isinstance(label_smoothing, Tensor)):
        check_options(temperature, label_smoothing, detach_targets)
    if peer_matrix is not None and not _backend._is_compiling():
        check_peer_matrix_once(peer_matrix)  # the C++ entry checks its finiteness only
    out = _backend.eager_call("mixed_kd_loss", (logits, labels, weights, temperature,
                                                label_smoothing, mode, peer_matrix, detach_targets),
                              _explain_mixed_kd_loss)
    if out is not None:  # e.g. the C++ op with its C++ autograd node
        return out  # type: ignore[return-value]
    z, plan_labels, plan_weights = _op_args(logits, labels, weights, peer_matrix)
    check_no_grad_to(plan_weights, peer_matrix)
    args = (as_number("mixed_kd_loss", "temperature", temperature),
            as_number("mixed_kd_loss", "label_smoothing", label_smoothing), mode, peer_matrix,
            detach_targets)
    if _backend.runs_direct(*z, plan_labels, plan_weights, peer_matrix):
        try:
            ce, kd, _ = _MixedKDLoss.apply(plan_labels, plan_weights, *args, *z)
        except (RuntimeError, TypeError, ValueError):
            # the op body saw labels [B] as [B, 1]: name them as the caller gave them
            _explain_mixed_kd_loss(z, labels, weights, temperature, label_smoothing, mode,
                                   peer_matrix, detach_targets)
            raise
    else:
        ce, kd, _ = torch.ops.metamixer.mixed_kd_loss(z, plan_labels, plan_weights, *args)
    return ce, kd


# ----------------------------------------------------------------------------------------- mix

def _mix_forward(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None) -> Tensor:
    check_mix_args(x, src, w, box)
    run = _backend.kernel("mix", x.device)
    if not getattr(run, "checks_values", False):  # a kernel may check values itself, faster
        check_mix_values(x, src, w, box)
    return run(x, src, w, box)


_mix = torch.library.custom_op("metamixer::mix", _mix_forward, mutates_args=())


@_mix.register_fake
def _(x, src, w, box):
    check_mix_args(x, src, w, box)
    return mix_output(x)


def _mix_backward_body(grad: Tensor, x: Tensor, src: Tensor, w: Tensor, box: Tensor | None,
                       need_dw: bool = True) -> tuple[Tensor, Tensor]:
    """(dx, dw): dx scatter-adds into the partners (src need not be a permutation). With
    ``need_dw=False`` (autograd needs no gradient for w: MetaMixer's weights never do) dw is
    zeros and a kernel may skip it, and with it every read of x."""
    return _backend.kernel("mix_backward", x.device)(grad, x, src, w, box, need_dw)


_mix_backward = torch.library.custom_op("metamixer::mix_backward", _mix_backward_body,
                                        mutates_args=())


@_mix_backward.register_fake
def _(grad, x, src, w, box, need_dw=True):
    return mix_output(x), torch.empty_like(w)


def _mix_setup_context(ctx, inputs, output) -> None:
    x, src, w, box = inputs
    check_no_grad_through_integers(x, ctx.needs_input_grad[2:3], ("w",), "mix")
    ctx.has_box = box is not None
    ctx.save_for_backward(x, src, w, *([box] if box is not None else []))


def _mix_backward_rule(ctx, grad):
    x, src, w, *rest = ctx.saved_tensors
    box = rest[0] if ctx.has_box else None
    need_dw = ctx.needs_input_grad[2]
    dx, dw = call_mix_backward(grad, x, src, w, box, need_dw)
    return dx, None, dw if need_dw else None, None


_mix.register_autograd(_mix_backward_rule, setup_context=_mix_setup_context)
_backend.refuse_forward_ad("mix")  # as for mixed_kd_loss above
_backend.refuse_forward_ad("mix_backward")


# metamixer::mix for plain eager calls that need a gradient (_backend.runs_direct): the op's
# body and backward rule, without the custom op's dispatch.
_Mix = _backend.direct_function("_Mix", _mix_forward, _mix_setup_context, _mix_backward_rule)


def call_mix(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None) -> Tensor:
    """metamixer::mix inside a backward rule (``_backend.body_or_op``)."""
    run = _backend.body_or_op(_mix_forward, torch.ops.metamixer.mix, x, src, w, box)
    return run(x, src, w, box)


def call_mix_backward(grad: Tensor, x: Tensor, src: Tensor, w: Tensor, box: Tensor | None,
                      need_dw: bool) -> tuple[Tensor, Tensor]:
    """metamixer::mix_backward inside a backward rule (``_backend.body_or_op``)."""
    run = _backend.body_or_op(_mix_backward_body, torch.ops.metamixer.mix_backward, grad, x, src,
                              w, box)
    return run(grad, x, src, w, box, need_dw)


def _reference_mix(x, src, w, box):
    return mix_output(x).copy_(reference.mix(x, src, w, box))


def _reference_mix_backward(grad, x, src, w, box, need_dw=True):
    dx, dw = reference.mix_backward(grad, x, src, w, box)
    return mix_output(x).copy_(dx), torch.empty_like(w).copy_(dw) if need_dw \
        else torch.zeros_like(w)


_backend.register_kernel("mix", "reference", _reference_mix)
_backend.register_kernel("mix_backward", "reference", _reference_mix_backward)


def mix(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None = None) -> Tensor:
    """out[i] = x[i] outside box_i and w_i x[i] + (1 - w_i) x[src_i] inside it; x is not mutated.

    ``x``: [N, C, H, W] (any memory format) or [N, D]; ``src``: [N] int64; ``w``: [N] floats in
    [0, 1]; ``box``: [N, 4] ints (y0, y1, x0, x1), half-open, or None for the whole sample.
    CutMix is a box with w = 0; Mixup is no box with w = lam.
    """
    out = _backend.eager_call("mix", (x, src, w, box), check_mix_args)
    if out is not None:  # the C++ kernel, called without the dispatcher
        return out  # type: ignore[return-value]
    if _backend.runs_without_dispatcher(x, src, w, box):
        return _mix_forward(x, src, w, box)  # the op's own body: same checks, same kernel
    if _backend.runs_direct(x, src, w, box):
        return _Mix.apply(x, src, w, box)  # the same body and backward rule
    check_mix_types(x, src, w, box)  # (tracing, or not all tensors)
    return torch.ops.metamixer.mix(x, src, w, box)
