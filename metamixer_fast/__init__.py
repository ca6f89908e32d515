"""metamixer_fast: fused kernels and a lean training core for online knowledge distillation
with MetaMixer regularization."""

import os as _os
import warnings as _warnings

from . import _backend, reference
from .loss import MixedKDLoss, MixedKDLossOutput, MixedTarget
from .metamixer import CutMix, CutMixOrMixup, MetaMixer, Mixup
from .mix2 import mix2
from .ops import mix, mixed_kd_loss
from .plan import MixPlan

if _backend.triton_version() is not None:  # Triton kernels: CUDA tensors, or CPU when interpreted
    try:
        from .kernels import mixed_kd_loss as _triton_mixed_kd_loss
    except ModuleNotFoundError as _exc:  # kernels/ is mapped in by the install, not in the tree
        if _exc.name != "metamixer_fast.kernels" or _backend.source_checkout() is None:
            raise
        raise ImportError(
            f"metamixer_fast was imported from the source checkout {_backend.source_checkout()}, "
            f"not from its installed copy (python -m and scripts run inside the checkout put it "
            f"first on sys.path); run from another directory, or install with "
            f"'pip install --no-build-isolation -e .'") from None

    _backend.register_kernel("mixed_kd_loss", "triton", _triton_mixed_kd_loss.mixed_kd_loss_forward)
    _backend.register_kernel("mixed_kd_loss_backward", "triton",
                             _triton_mixed_kd_loss.mixed_kd_loss_backward)

if _backend.cpp_module() is not None:
    from . import _cpp_mix  # noqa: F401  (registers the C++ mix kernels)
if _backend.triton_version() is not None:
    from .kernels import mix as _triton_mix  # noqa: F401  (registers the Triton mix kernels)

if _backend.cpp_module() is not None:
    from . import _cpp_kernels  # noqa: F401  (registers the C++ CPU kernels as the cpp backend)

if _backend.cpp_module() is None and _os.environ.get(_backend.ENV_VAR, "").strip().lower() != "reference":
    _shadow = _backend.source_checkout()
    _warnings.warn(
        f"metamixer_fast: the C++ extension is not available ({_backend.cpp_missing_reason}), so "
        f"CPU ops run on the slower PyTorch reference. "
        + (f"This is the source checkout {_shadow}; if the package is installed, run from another "
           f"directory (this one shadows it) or install with -e. " if _shadow else "")
        + "'pip install -v --no-build-isolation .' shows why a build failed "
        "(METAMIXER_REQUIRE_CPP=1 makes it fatal); METAMIXER_BACKEND=reference silences this.",
        RuntimeWarning, stacklevel=2)

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
