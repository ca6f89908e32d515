"""The value-check flag the Triton kernels share: checks of values (indices in range, weights in
range) run inside the kernels, where the values are read anyway, instead of as a dozen small
torch ops per call (each a launch of several microseconds of host time on a GPU).

A kernel that meets a bad value stores 0 into a per-device int32 [1] that holds 1; the launcher
then asserts the flag once. On a GPU that is ``torch._assert_async``: the call never waits for
the GPU, and a bad value ends the process's CUDA work with a device-side assertion (so the flag
never needs resetting). On CPU tensors (the interpreter) the flag is read at once, reset, and
the Python checks run to raise the error that names the argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_FLAGS: dict[torch.device, Tensor] = {}


def ok_flag(device: torch.device) -> Tensor:
    flag = _FLAGS.get(device)
    if flag is None:
        flag = _FLAGS[device] = torch.ones(1, dtype=torch.int32, device=device)
    return flag


def assert_ok(flag: Tensor, message: str, explain: Callable[[], None]) -> None:
    """Raise (CPU) or assert asynchronously (GPU) unless the kernel left the flag at 1."""
    if flag.device.type != "cpu":
        torch._assert_async(flag, message)
    elif not bool(flag[0]):
        flag.fill_(1)
        explain()  # the Python checks: a ValueError naming the argument
        raise ValueError(message)
