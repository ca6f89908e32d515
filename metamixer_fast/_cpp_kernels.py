"""The C++ CPU kernels of ``metamixer::mixed_kd_loss`` (csrc/mixed_kd_loss.cpp), as the ``cpp`` backend.

Two routes reach the same C++ kernels:

- ``torch.ops.metamixer.mixed_kd_loss`` (the Python custom op of ``ops.py``) calls
  ``metamixer_cpp::mixed_kd_loss_fwd`` / ``_bwd`` through ``_backend.register_kernel``. This is
  what ``torch.compile`` traces (fake impl, no graph break) and what opcheck tests.
- ``metamixer_fast.mixed_kd_loss`` / ``MixedKDLoss`` in eager mode take the fast path registered
  here with ``_backend.register_eager``: one call of ``metamixer_cpp::mixed_kd_loss`` with the
  labels as given, whose Autograd kernel is a C++ autograd Function, so the backward never enters
  Python. The custom-op machinery (~165 us per forward+backward at K=2, B=128, C=100) and the
  Python checks are skipped: the C++ op checks shapes, labels, weights and the peer matrix
  itself, and only when it rejects a call do the Python checks run, for their fuller message.
  (At that shape, cold caches made the Python checks and label plan cost ~60 us a call.)

Both routes give the same numbers: they run the same kernels on the same inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend
from ._checks import as_label_plan, check_mixed_kd_loss_args


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


def _eager(logits: list[Tensor], labels: Tensor, weights: Tensor | None, temperature: float,
           label_smoothing: float, mode: str, peer_matrix: Tensor | None,
           detach_targets: bool) -> tuple[Tensor, Tensor]:
    """labels: class indices [B] (weights None) or a mixture [B, M] with weights [B, M]."""
    try:
        return torch.ops.metamixer_cpp.mixed_kd_loss(logits, labels, weights, temperature,
                                                     label_smoothing, mode, peer_matrix,
                                                     detach_targets)
    except (RuntimeError, TypeError, ValueError):
        # The C++ op checks everything it relies on, but tersely; the Python checks name the
        # argument and the fix. Run them only now, off the hot path.
        labels, weights = as_label_plan(labels, weights)
        check_mixed_kd_loss_args(logits, labels, weights, temperature, label_smoothing, mode,
                                 peer_matrix)
        raise


_backend.register_kernel("mixed_kd_loss", "cpp", _forward)
_backend.register_kernel("mixed_kd_loss_backward", "cpp", _backward)
_backend.register_eager("mixed_kd_loss", "cpp", _eager)
