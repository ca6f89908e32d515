"""Stores of float32 results into 16-bit outputs, rounded to nearest even on every target.

On a GPU ``v.to(tl.bfloat16)`` rounds to nearest even; triton's CPU interpreter truncates
instead. The kernels call ``cast_out`` with ``SOFT_BF16=soft_bf16(dtype)``, which does the
float32 -> bfloat16 rounding with integer ops only under the interpreter, so what the tests see
on CPU is what a GPU computes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metamixer_fast import _backend


@triton.jit
def cast_out(v, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """v.to(dtype), rounding to nearest even (SOFT_BF16: float32 -> bfloat16 by integer ops)."""
    if SOFT_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)  # NaN stays NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


def soft_bf16(dtype: torch.dtype) -> bool:
    """Whether stores into ``dtype`` need the integer rounding (bfloat16 under the interpreter)."""
    return dtype == torch.bfloat16 and _backend.triton_interpreted()
