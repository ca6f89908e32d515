"""Loader benchmarks: the batched crop+flip gather against two other ways to write it, and the
whole batch (index, augment, normalise) of the loader, on CIFAR-shaped uint8 data.

Run: ``.venv/bin/python -m pytest -q bench/test_bench_data.py --benchmark-columns=median,ops``.
Compare medians within one run (same machine state); the shapes are B=128, 3x32x32, pad 4.
Torch runs on ``BENCH_THREADS`` threads (default 1): on a shared machine more threads than idle
cores make every timing mostly wait.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from metamixer_fast.data import synthetic_dataset
from metamixer_fast.loader import BatchLoader, augment_batch

B, C, H, W, PAD = 128, 3, 32, 32, 4


def per_sample_loop(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """How research code usually does it: pad, slice and flip one image at a time."""
    out = torch.empty_like(x)
    padded = F.pad(x, (pad,) * 4)
    for i in range(x.shape[0]):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, dy:dy + H, dx:dx + W]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def advanced_indexing(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Batched, with three broadcast index tensors (batch, rows, cols) around the channel slice."""
    b = x.shape[0]
    padded = F.pad(x, (pad,) * 4)
    rows = offsets[:, :1] + torch.arange(H)
    cols = torch.arange(W).expand(b, W)
    cols = torch.where(flips[:, None], (W - 1) - cols, cols) + offsets[:, 1:]
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


@pytest.fixture(scope="module", autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 2 * PAD + 1, (B, 2), generator=g)
    flips = torch.randint(0, 2, (B,), generator=g).bool()
    return x, offsets, flips


@pytest.mark.parametrize("impl", [augment_batch, advanced_indexing, per_sample_loop],
                         ids=["flat_gather", "advanced_indexing", "per_sample_loop"])
def test_crop_flip(benchmark, batch, impl) -> None:
    benchmark.group = "crop+flip B=128 3x32x32 pad 4"
    x, offsets, flips = batch
    out = benchmark(impl, x, offsets, flips, PAD)
    assert torch.equal(out, augment_batch(x, offsets, flips, PAD))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_loader_batch(benchmark, channels_last: bool) -> None:
    benchmark.group = "loader batch B=128 (index, crop+flip, normalise)"
    train, _ = synthetic_dataset(num_train=8192, num_test=1, channels=C, size=H)
    loader = BatchLoader(train, B, crop_padding=PAD, hflip=True, channels_last=channels_last)
    batches = iter(())

    def next_batch() -> torch.Tensor:
        nonlocal batches
        try:
            return next(batches)[0]
        except StopIteration:
            batches = iter(loader)
            return next(batches)[0]

    x = benchmark(next_batch)
    assert x.shape == (B, C, H, W) and x.is_contiguous(memory_format=torch.channels_last) == channels_last
