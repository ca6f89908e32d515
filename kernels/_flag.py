"""The value-check flag the Triton kernels share: checks of values (indices in range, weights in
range) run inside the kernels, where the values are read anyway, instead of as a dozen small
torch ops per call (each a launch of several microseconds of host time on a GPU).

A kernel that meets a bad value stores 0 into a per-device int32 [1] that holds 1; the launcher
then asserts the flag once. On a GPU that is ``torch._assert_async``: the call never waits for
the GPU, and a bad value ends the process's CUDA work with a device-side assertion (so the flag
never needs resetting). On CPU tensors (the interpreter) the flag is read at once, reset, and
the Python checks run to raise the error that names the argument.

The flag lives as long as the process, so it must never come from a CUDA graph's memory pool,
which is freed with the graph. It is made on a device's first call, in a thread of its own:
``torch.compile(mode="reduce-overhead")`` warms a graph up with the warming thread's
allocations routed to the graph's pool (torch 2.8 and later route by thread), and a flag made
there is a live allocation that the graph trees refuse ("not tracked as outputs"). Inside a
capture (``torch.cuda.graph``) it cannot be made at all: capture after a warm-up call, as
torch.cuda.graph asks anyway (the kernels compile on the first call too).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

_FLAGS: dict[torch.device, Tensor] = {}


def ok_flag(device: torch.device) -> Tensor:
    flag = _FLAGS.get(device)
    if flag is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "metamixer_fast: the first Triton call on this device is inside a CUDA graph "
                "capture; run the step once before capturing it (a warm-up, as torch.cuda.graph "
                "asks), so the kernels compile and their check flag is made outside the graph")
        flag = _FLAGS[device] = _new_flag(device)
    return flag


def _new_flag(device: torch.device) -> Tensor:
    if device.type != "cuda":
        return torch.ones(1, dtype=torch.int32, device=device)
    made: list[Tensor | Exception] = []

    def make() -> None:  # on this thread's default stream, outside any pool routed to ours
        try:
            made.append(torch.ones(1, dtype=torch.int32, device=device))
        except Exception as err:  # re-raised on the calling thread
            made.append(err)

    maker = threading.Thread(target=make, name="metamixer-check-flag")
    maker.start()
    maker.join()
    if isinstance(made[0], Exception):
        raise made[0]
    torch.cuda.current_stream(device).wait_stream(torch.cuda.default_stream(device))  # filled first
    return made[0]


def assert_ok(flag: Tensor, message: str, explain: Callable[[], None]) -> None:
    """Raise (CPU) or assert asynchronously (GPU) unless the kernel left the flag at 1."""
    if flag.device.type != "cpu":
        torch._assert_async(flag, message)
    elif not bool(flag[0]):
        flag.fill_(1)
        explain()  # the Python checks: a ValueError naming the argument
        raise ValueError(message)
