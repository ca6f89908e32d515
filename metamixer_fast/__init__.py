"""metamixer_fast: fused kernels and a lean training core for online knowledge distillation
with MetaMixer regularization."""

from . import _backend, reference
from .loss import MixedKDLoss, MixedKDLossOutput, MixedTarget
from .ops import mix, mixed_kd_loss

if _backend.cpp_module() is not None:
    from . import _cpp_kernels  # noqa: F401  (registers the C++ CPU kernels as the cpp backend)

__version__ = "0.1.0"

__all__ = [
    "MixedKDLoss",
    "MixedKDLossOutput",
    "MixedTarget",
    "__version__",
    "mix",
    "mixed_kd_loss",
    "reference",
]
