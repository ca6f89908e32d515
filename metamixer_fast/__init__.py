"""metamixer_fast: fused kernels and a lean training core for online knowledge distillation
with MetaMixer regularization."""

from . import reference
from .loss import MixedKDLoss, MixedKDLossOutput, MixedTarget
from .metamixer import CutMix, CutMixOrMixup, MetaMixer, Mixup
from .ops import mix, mixed_kd_loss
from .plan import MixPlan

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
    "mixed_kd_loss",
    "reference",
]
