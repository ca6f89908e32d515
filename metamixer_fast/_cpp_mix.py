"""Registers the C++ CPU kernels of ``metamixer::mix`` and ``metamixer::mix2`` (csrc/mix.cpp) as
the ``cpp`` backend.

Imported by ``metamixer_fast/__init__.py`` only when the extension ``metamixer_fast._C`` is
built. The C++ kernel performs ``_checks.check_mix_values`` itself (same messages), so the op
body skips the Python version for it (``checks_values``): those checks cost several small
torch ops per call.

Eager calls that need no gradient first try ``metamixer_fast._C.mix`` / ``mix2``
(``_backend.register_eager``): CPython functions that check in C++ whether the call is one for
them (plain CPU tensors, no dispatch or torch-function mode, no other backend forced, no
gradient needed), check every argument and run the same kernels without the dispatcher; the
Python checks run only when they reject a call, for their fuller message.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C, _backend


def mix(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None) -> Tensor:
    return torch.ops.metamixer_cpp.mix(x, src.contiguous(), w, box)


def mix_backward(grad: Tensor, x: Tensor, src: Tensor, w: Tensor, box: Tensor | None,
                 need_dw: bool = True) -> tuple[Tensor, Tensor]:
    return torch.ops.metamixer_cpp.mix_backward(grad, x, src.contiguous(), w, box, need_dw)


def mix2(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None, src2: Tensor, w2: Tensor) -> Tensor:
    return torch.ops.metamixer_cpp.mix2(x, src.contiguous(), w, box, src2.contiguous(), w2)


mix.checks_values = True  # type: ignore[attr-defined]
mix2.checks_values = True  # type: ignore[attr-defined]

_backend.register_kernel("mix", "cpp", mix)
_backend.register_kernel("mix_backward", "cpp", mix_backward)
_backend.register_kernel("mix2", "cpp", mix2)
_backend.register_eager("mix", _C.mix)
_backend.register_eager("mix2", _C.mix2)
