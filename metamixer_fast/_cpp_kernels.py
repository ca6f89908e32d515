"""The C++ CPU kernels of ``metamixer::mixed_kd_loss`` (csrc/mixed_kd_loss.cpp), as the ``cpp`` backend.

Two routes reach the same C++ kernels:

- ``torch.ops.metamixer.mixed_kd_loss`` (the Python custom op of ``ops.py``) calls
  ``metamixer_cpp::mixed_kd_loss_fwd`` / ``_bwd`` through ``_backend.register_kernel``. This is
  what ``torch.compile`` traces (fake impl, no graph break) and what opcheck tests.
- ``metamixer_fast.mixed_kd_loss`` / ``MixedKDLoss`` in eager mode first try
  ``metamixer_fast._C.mixed_kd_loss``, registered here with ``_backend.register_eager``: a
  CPython function that checks in C++ whether the call is one for it (plain CPU tensors, no
  dispatch or torch-function mode, no other backend forced), runs the forward and links one C++
  autograd node, so neither the forward nor the backward enters Python or the dispatcher's
  boxed call path. The Python checks are skipped too: the C++ code checks shapes, labels,
  weights and the peer matrix itself, and only when it rejects a call do the Python checks run,
  for their fuller message. A forward + backward at K=2, B=128, C=100 takes a third of the
  custom op's time this way and 56 % of it by the Python direct route (``ops._MixedKDLoss``)
  (bench/bench_call_routes.py, the README's table); at that shape each Python-level layer of a
  call costs tens of microseconds.

Both routes run the same kernels on the same inputs and give the same forward bits. Their
backwards agree to rounding, not bit for bit: the eager route reuses the exponentials its forward
stored, the custom op recomputes them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend
from ._C import mixed_kd_loss as _eager_mixed_kd_loss


def _forward(logits: list[Tensor], labels: Tensor, weights: Tensor, temperature: float,
             label_smoothing: float, mode: str, peer_matrix: Tensor | None,
             detach_targets: bool) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.metamixer_cpp.mixed_kd_loss_fwd(logits, labels, weights, temperature,
                                                     label_smoothing, mode, peer_matrix,
                                                     detach_targets)


def _backward(grad_ce: Tensor, grad_kd: Tensor, logits: list[Tensor], labels: Tensor,
              weights: Tensor, row_stats: Tensor, temperature: float, label_smoothing: float,
              mode: str, peer_matrix: Tensor | None, detach_targets: bool) -> list[Tensor]:
    return torch.ops.metamixer_cpp.mixed_kd_loss_bwd(grad_ce, grad_kd, logits, labels, weights,
                                                     row_stats, temperature, label_smoothing, mode,
                                                     peer_matrix, detach_targets)


# the C++ kernel checks labels, weights and the peer matrix itself
_forward.checks_values = True  # type: ignore[attr-defined]
_backend.register_kernel("mixed_kd_loss", "cpp", _forward)
_backend.register_kernel("mixed_kd_loss_backward", "cpp", _backward)
_backend.register_eager("mixed_kd_loss", _eager_mixed_kd_loss)
