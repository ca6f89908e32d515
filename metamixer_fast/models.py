"""Peer networks: CIFAR-style ResNets and Wide-ResNets, and a registry to build them by name.

Every model maps images [N, in_channels, H, W] (CIFAR 3x32x32, Fashion-MNIST 1x28x28, any
size >= 8x8 works: the head is a global average pool) to logits [N, num_classes], and names its
three residual stages ``stage1``, ``stage2``, ``stage3`` (``model.stage_names``). A forward
hook on ``getattr(model, name)`` sees that stage's output, and a forward pre-hook its input,
which is where MetaMixer's global mixing blends feature maps.

* ResNet-{8,20,32,56,110} (He et al. 2016, section 4.2, the CIFAR variant): a 3x3 conv with 16
  channels, three stages of n BasicBlocks (depth = 6n + 2) with 16/32/64 channels, the second
  and third stage starting with stride 2. Shortcuts are **option A** (identity; where the shape
  changes, subsample by 2 and zero-pad the new channels), as in the paper's CIFAR experiments:
  the shortcuts hold no parameters, which gives the literature's counts (ResNet-20 0.27M,
  ResNet-32 0.46M, ResNet-56 0.85M, ResNet-110 1.7M).
* WRN-d-k (Zagoruyko & Komodakis 2016): pre-activation blocks (BN-ReLU-conv3x3, optional
  dropout, BN-ReLU-conv3x3), (d - 4) / 6 blocks per stage, widths 16k/32k/64k, a 1x1 conv
  projection where the shape changes, BN-ReLU before the pool. WRN-16-2 0.69M, WRN-40-2 2.2M.
* ``tiny``: ResNet-8 at half width (8/16/32 channels, ~20k parameters) for tests and demos.

``build_model("resnet20", num_classes, in_channels)`` builds a registered model; a name of the
form ``"package.module:factory"`` imports the module and calls
``factory(num_classes=..., in_channels=...)``. For feature-level mixing, the stage names given
to MetaMixer must be submodule names of the model; a ``stage_names`` tuple on the model is only
used to list them in error messages.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STAGE_NAMES = ("stage1", "stage2", "stage3")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    """He-normal convs (fan_out, as in both papers' code), BN gamma 1 / beta 0, zero linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus an option-A shortcut, then ReLU (post-activation)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.extra_channels = cout - cin

    def shortcut(self, x: Tensor) -> Tensor:
        # Option A: parameter-free. Subsampling by slicing keeps x's memory format; the zero
        # channels are split evenly on both sides (any fixed placement is equivalent).
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels > 0:
            lo = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.extra_channels - lo))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images, with stages ``stage1..3`` of n BasicBlocks each."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        _check_common(num_classes, in_channels)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet: 'depth' must be 6n + 2 with n >= 1 (8, 20, 32, 56, 110), "
                             f"got {depth}")
        n = (depth - 2) // 6
        self.depth, self.stage_names = depth, STAGE_NAMES
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        stages = []
        for i, w in enumerate(widths):
            blocks = [BasicBlock(cin if b == 0 else w, w, 2 if (b == 0 and i > 0) else 1) for b in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stage1, self.stage2, self.stage3 = stages
        self.fc = nn.Linear(widths[-1], num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WideBasic(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3 (-dropout) -BN-ReLU-conv3x3, plus the shortcut.

    Where the shape changes, the shortcut is a 1x1 conv applied to the pre-activated input
    (the first BN-ReLU is shared by both paths, as in the WRN reference code)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = (nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)
                     if (stride != 1 or cin != cout) else None)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        shortcut = x if self.proj is None else self.proj(act)
        out = self.conv1(act)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen for small images, with stages ``stage1..3`` of (depth-4)/6 blocks each."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        _check_common(num_classes, in_channels)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet: 'depth' must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40), "
                             f"got {depth}")
        if widen < 1:
            raise ValueError(f"WideResNet: 'widen' must be >= 1, got {widen}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideResNet: 'dropout' must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.depth, self.widen, self.stage_names = depth, widen, STAGE_NAMES
        self.conv1 = _conv3x3(in_channels, 16)
        cin = 16
        stages = []
        for i, w in enumerate(widths):
            blocks = [WideBasic(cin if b == 0 else w, w, 2 if (b == 0 and i > 0) else 1, dropout)
                      for b in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stage1, self.stage2, self.stage3 = stages
        self.bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _check_common(num_classes: int, in_channels: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"'num_classes' must be a positive int, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"'in_channels' must be a positive int, got {in_channels!r}")


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels)
    factory.__doc__ = f"ResNet-{depth} (CIFAR variant, option-A shortcuts)."
    return factory


def _wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
        return WideResNet(depth, widen, num_classes, in_channels, dropout)
    factory.__doc__ = f"WRN-{depth}-{widen} (pre-activation blocks, optional dropout)."
    return factory


def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-8 at half width (8/16/32 channels): ~20k parameters, for tests and short demos."""
    return CifarResNet(8, num_classes, in_channels, widths=(8, 16, 32))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "tiny": tiny,
    "resnet8": _resnet(8),
    "resnet20": _resnet(20),
    "resnet32": _resnet(32),
    "resnet56": _resnet(56),
    "resnet110": _resnet(110),
    "wrn16_2": _wrn(16, 2),
    "wrn40_2": _wrn(40, 2),
}


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"arch {spec!r}: expected 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"arch {spec!r}: cannot import module {module_name!r} ({e}); check the "
                         f"spelling and that it is importable (installed, or on PYTHONPATH)") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"arch {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"arch {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a peer network by registered name (``MODELS``) or ``"package.module:factory"``.

    ``kwargs`` go to the factory (e.g. ``dropout=0.3`` for the WRNs)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"'name' must be a model name, got {name!r}")
    _check_common(num_classes, in_channels)
    if ":" in name:
        factory = _import_factory(name)
    else:
        registered = MODELS.get(name.lower())
        if registered is None:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}, "
                             f"or 'package.module:factory' for a model of your own")
        factory = registered
    try:
        inspect.signature(factory).bind(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as e:
        raise ValueError(f"model {name!r}: its factory cannot be called with num_classes, in_channels"
                         f"{', ' + ', '.join(kwargs) if kwargs else ''} ({e})") from None
    except ValueError:  # no signature to inspect (some builtins): let the call itself decide
        pass
    model = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"arch {name!r}: the factory returned a {type(model).__name__}, "
                        f"not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
