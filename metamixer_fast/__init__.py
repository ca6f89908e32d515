"""metamixer_fast: fused kernels and a lean training core for online knowledge distillation
with MetaMixer regularization."""

from . import _backend, reference
from .loss import MixedKDLoss, MixedKDLossOutput, MixedTarget
from .metamixer import CutMix, CutMixOrMixup, MetaMixer, Mixup
from .mix2 import mix2
from .ops import mix, mixed_kd_loss
from .plan import MixPlan

if _backend.triton_version() is not None:  # Triton kernels: CUDA tensors, or CPU when interpreted
    from .kernels import mixed_kd_loss as _triton_mixed_kd_loss

    _backend.register_kernel("mixed_kd_loss", "triton", _triton_mixed_kd_loss.mixed_kd_loss_forward)
    _backend.register_kernel("mixed_kd_loss_backward", "triton",
                             _triton_mixed_kd_loss.mixed_kd_loss_backward)

if _backend.cpp_module() is not None:
    from . import _cpp_mix  # noqa: F401  (registers the C++ mix kernels)
if _backend.triton_version() is not None:
    from .kernels import mix as _triton_mix  # noqa: F401  (registers the Triton mix kernels)

if _backend.cpp_module() is not None:
    from . import _cpp_kernels  # noqa: F401  (registers the C++ CPU kernels as the cpp backend)

__version__ = "0.1.0"

__all__ = [
    "CutMix",
    "CutMixOrMixup",
    "MetaMixer",
    "MixPlan",
    "MixedKDLoss",
    "MixedKDLossOutput",
    "MixedTarget",
    "Mixup",
    "__version__",
    "mix",
    "mix2",
    "mixed_kd_loss",
    "reference",
]
