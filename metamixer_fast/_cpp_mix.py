"""Registers the C++ CPU kernels of ``metamixer::mix`` and ``metamixer::mix2`` (csrc/mix.cpp) as
the ``cpp`` backend.

Imported by ``metamixer_fast/__init__.py`` only when the extension ``metamixer_fast._C`` is
built. The C++ kernel performs ``_checks.check_mix_values`` itself (same messages), so the op
body skips the Python version for it (``checks_values``): those checks cost several small
torch ops per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend


def mix(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None) -> Tensor:
    return torch.ops.metamixer_cpp.mix(x, src.contiguous(), w, box)


def mix_backward(grad: Tensor, x: Tensor, src: Tensor, w: Tensor,
                 box: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.ops.metamixer_cpp.mix_backward(grad, x, src.contiguous(), w, box)


def mix2(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None, src2: Tensor, w2: Tensor) -> Tensor:
    return torch.ops.metamixer_cpp.mix2(x, src.contiguous(), w, box, src2.contiguous(), w2)


mix.checks_values = True  # type: ignore[attr-defined]
mix2.checks_values = True  # type: ignore[attr-defined]

_backend.register_kernel("mix", "cpp", mix)
_backend.register_kernel("mix_backward", "cpp", mix_backward)
_backend.register_kernel("mix2", "cpp", mix2)
