"""metamixer_fast: fused kernels and a lean training core for online knowledge distillation
with MetaMixer regularization."""

from . import _backend, reference
from .loss import MixedKDLoss, MixedKDLossOutput, MixedTarget
from .mix2 import mix2
from .ops import mix, mixed_kd_loss

if _backend.cpp_module() is not None:
    from . import _cpp_mix  # noqa: F401  (registers the C++ mix kernels)
if _backend.triton_version() is not None:
    from .kernels import mix as _triton_mix  # noqa: F401  (registers the Triton mix kernels)

__version__ = "0.1.0"

__all__ = [
    "MixedKDLoss",
    "MixedKDLossOutput",
    "MixedTarget",
    "__version__",
    "mix",
    "mix2",
    "mixed_kd_loss",
    "reference",
]
