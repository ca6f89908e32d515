"""``metamixer::mix2``: MetaMixer's local then global mixing in one pass over the batch.

``mix2(x, src, w, box, src2, w2) == mix(mix(x, src, w, box), src2, w2)`` bit for bit (the
intermediate is rounded to x's dtype as the first call would round it), but the fused kernels
read x and write the output once instead of writing and re-reading an intermediate batch.
The backward recomputes the intermediate with one ``metamixer::mix`` and chains two
``metamixer::mix_backward``, so it needs no kernel of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, reference
from ._checks import (
    _describe,
    check_mix2_values,
    check_mix_args,
    check_mix_types,
    check_no_grad_through_integers,
    require_tensor,
)
from ._layout import mix_output
from .ops import call_mix, call_mix_backward

__all__ = ["mix2"]


def _check_global_args(x: Tensor, src2: Tensor, w2: Tensor) -> None:
    n = x.shape[0]
    if src2.dtype != torch.int64 or src2.shape != (n,) or src2.device != x.device:
        raise ValueError(f"mix2: 'src2' must be an int64 tensor [N] = [{n}] of global partners on "
                         f"{x.device}, got a {_describe(src2)}")
    if not w2.is_floating_point() or w2.shape != (n,) or w2.device != x.device:
        raise ValueError(f"mix2: 'w2' must be a floating tensor [N] = [{n}] of global blend weights "
                         f"on {x.device}, got a {_describe(w2)}")


def _check_mix2_args(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None, src2: Tensor,
                     w2: Tensor) -> None:
    check_mix_args(x, src, w, box, "mix2")
    _check_global_args(x, src2, w2)


def _check_mix2_types(x: object, src: object, w: object, box: object, src2: object,
                      w2: object) -> None:
    check_mix_types(x, src, w, box, "mix2")
    require_tensor("mix2", "src2", src2)
    require_tensor("mix2", "w2", w2)


def _explain_mix2(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None, src2: Tensor,
                  w2: Tensor) -> None:
    """The Python checks, run when the C++ entry or kernel rejects a call: its messages about
    values say ``mix:`` for either op."""
    _check_mix2_args(x, src, w, box, src2, w2)
    if x.device.type == "cpu":
        check_mix2_values(x, src, w, box, src2, w2)


def _mix2_forward(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None, src2: Tensor,
                  w2: Tensor) -> Tensor:
    _check_mix2_args(x, src, w, box, src2, w2)
    run = _backend.kernel("mix2", x.device)
    if not getattr(run, "checks_values", False):
        check_mix2_values(x, src, w, box, src2, w2)
        return run(x, src, w, box, src2, w2)
    try:
        return run(x, src, w, box, src2, w2)
    except ValueError:
        _explain_mix2(x, src, w, box, src2, w2)
        raise


_mix2 = torch.library.custom_op("metamixer::mix2", _mix2_forward, mutates_args=())


@_mix2.register_fake
def _(x, src, w, box, src2, w2):
    _check_mix2_args(x, src, w, box, src2, w2)
    return mix_output(x)


def _setup_context(ctx, inputs, output) -> None:
    x, src, w, box, src2, w2 = inputs
    need = ctx.needs_input_grad
    check_no_grad_through_integers(x, (need[2], need[5]), ("w", "w2"), "mix2")
    ctx.has_box = box is not None
    ctx.save_for_backward(x, src, w, src2, w2, *([box] if box is not None else []))


def _backward(ctx, grad):
    x, src, w, src2, w2, *rest = ctx.saved_tensors
    box = rest[0] if ctx.has_box else None
    need_dw, need_dw2 = ctx.needs_input_grad[2], ctx.needs_input_grad[5]
    # u = mix(x, ...) is read only for dw2; otherwise x (same shape and layout) stands in for it
    u = call_mix(x, src, w, box) if need_dw2 else x
    du, dw2 = call_mix_backward(grad, u, src2, w2, None, need_dw2)
    dx, dw = call_mix_backward(du, x, src, w, box, need_dw)
    return dx, None, dw if need_dw else None, None, None, dw2 if need_dw2 else None


_mix2.register_autograd(_backward, setup_context=_setup_context)
_backend.refuse_forward_ad("mix2")  # no forward-mode formula: refuse a tangent, not drop it


# metamixer::mix2 for plain eager calls that need a gradient, as ops._Mix for mix.
_Mix2 = _backend.direct_function("_Mix2", _mix2_forward, _setup_context, _backward)


def _reference_mix2(x, src, w, box, src2, w2):
    return mix_output(x).copy_(reference.mix2(x, src, w, box, src2, w2))


_backend.register_kernel("mix2", "reference", _reference_mix2)


def mix2(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None, src2: Tensor, w2: Tensor) -> Tensor:
    """Local then global mixing: ``mix(mix(x, src, w, box), src2, w2)`` in one pass.

    MetaMixer at the input is ``mix2(x, sigma, zeros, boxes, pi, mu)``: CutMix boxes from the
    local partners sigma, then a whole-sample blend with the global partners pi.
    """
    out = _backend.eager_call("mix2", (x, src, w, box, src2, w2), _explain_mix2)
    if out is not None:  # the C++ kernel, called without the dispatcher
        return out  # type: ignore[return-value]
    if _backend.runs_without_dispatcher(x, src, w, box, src2, w2):
        return _mix2_forward(x, src, w, box, src2, w2)  # the op's own body, as in ops.mix
    if _backend.runs_direct(x, src, w, box, src2, w2):
        return _Mix2.apply(x, src, w, box, src2, w2)
    _check_mix2_types(x, src, w, box, src2, w2)  # (tracing, or not all tensors)
    return torch.ops.metamixer.mix2(x, src, w, box, src2, w2)
