"""The memory layout of ``mix``, ``mix2`` and ``mix_backward`` outputs, one rule for every backend
(C++ ``mix_format`` in csrc/mix.cpp, Triton, the reference) and the fake implementations that
``torch.compile`` plans with: the two must agree stride for stride.

channels_last for a 4-D input whose channels are innermost and W next (a channels_last batch, or
a crop of one, which the kernels read after one channels_last copy); otherwise contiguous
(other layouts are copied to contiguous first). Outputs take the format's standard strides.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mix_memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.stride(1) == 1 and x.stride(3) == x.shape[1]:
        return torch.channels_last
    return torch.contiguous_format


def mix_readable(x: Tensor) -> Tensor:
    """x in the layout the kernels read: itself when it already has it, else a copy."""
    fmt = mix_memory_format(x)
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


def mix_output(x: Tensor) -> Tensor:
    """An uninitialized output for ``x``: its shape and dtype, in ``mix_memory_format(x)``."""
    return torch.empty_like(x, memory_format=mix_memory_format(x))
