"""The training command's process group under torchrun: started once, ended by the command, and
a worker's exit that does not depend on torch's teardown of it."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

import torch
import torch.distributed as dist

# Whether this process started a process group (see exit_process).
started = False


def init(device: torch.device) -> tuple[int, int]:
    """(rank, world_size); starts the process group when launched by torchrun."""
    global started
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    return dist.get_rank(), dist.get_world_size()


def mean_over_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    """``t`` averaged over the ranks (in place; returned): the epoch's training metrics are sums
    over each rank's own shard of the data, and the record must describe all of them."""
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t


@contextlib.contextmanager
def ended_after() -> Iterator[None]:
    """Destroys, on the way out, a process group that the body starts (one that was already
    running belongs to the caller)."""
    running_before = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not running_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def exit_process(rc: int) -> NoReturn:
    """End the command with status ``rc``: ``sys.exit``, except in a process that started a
    process group, which flushes its output and leaves with ``os._exit``.

    torch keeps a process group, and gloo's threads with it, alive after
    ``destroy_process_group`` (references it holds itself) until the interpreter's teardown,
    and that teardown now and then aborts the process with "terminate called without an active
    exception" (SIGABRT), after the run's checkpoint and metrics were written: torchrun then
    reports a failed run (twice in 76 runs of the DDP test here). Nothing is left to do at
    that point, so such a worker skips the teardown.
    """
    if not started:
        sys.exit(rc)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
