"""The Triton mix kernels find a flat offset's row and column without a hardware division: n // d
is the high half of 2n times a magic number, shifted (``kernels/mix.py``: ``divider`` on the
host, ``_divide`` in the kernels). It must be exact for every offset a sample can have
(0 <= n < 2**31) and every divisor (a row length or a plane's row count, 1 <= d < 2**31).
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import ON_CUDA

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from metamixer_fast.kernels.mix import _divide, divider  # noqa: E402

LIMIT = 2**31


def _divisors() -> list[int]:
    """Every small divisor, every power of two and its neighbours, and random ones."""
    rnd = random.Random(0)
    powers = [p + e for k in range(1, 31) for p in (1 << k,) for e in (-1, 0, 1)]
    return sorted({*range(1, 300), *powers, LIMIT - 1, *(rnd.randrange(1, LIMIT) for _ in range(300))})


def _numerators(d: int) -> list[int]:
    """Around every multiple of d that matters: the first few, the last below 2**31, and 2**31 - 1,
    where the magic number's rounding error is largest."""
    last = (LIMIT - 1) // d * d
    near = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, last - 1, last, last + d - 1, LIMIT - 1]
    return [n for n in near if 0 <= n < LIMIT]


def _as_kernel_does(n: int, packed: int) -> int:
    magic, shift = packed & 0xFFFFFFFF, (packed >> 32) - 1
    assert magic < 2**32 and 0 <= shift <= 31 and packed >= 2**32  # always a 64-bit argument
    return ((2 * n * magic) >> 32) >> shift


def test_divider_is_exact_for_every_offset_a_sample_can_have():
    for d in _divisors():
        packed = divider(d)
        for n in _numerators(d):
            assert _as_kernel_does(n, packed) == n // d, (n, d)


def test_divider_refuses_divisors_outside_its_range():
    for d in (0, -3, LIMIT):
        with pytest.raises(ValueError, match="divisor"):
            divider(d)


@triton.jit
def _divide_kernel(n_ptr, out_ptr, packed, size, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    tl.store(out_ptr + offs, _divide(tl.load(n_ptr + offs, mask=mask), packed), mask=mask)


def test_triton_divide_in_a_kernel_equals_integer_division():
    """The kernel's own arithmetic (32-bit lanes, the 64-bit packed argument), under the
    interpreter here and compiled on a GPU with METAMIXER_TEST_DEVICE=cuda."""
    device = "cuda" if ON_CUDA else "cpu"
    for d in (1, 2, 3, 7, 9, 224, 672, 1000, 2**16 + 1, 2**30 + 3, LIMIT - 1):
        spread = list(range(0, min(4 * d, LIMIT), max(1, d // 5)))[:64]
        n = torch.tensor(_numerators(d) + spread, dtype=torch.int32, device=device)
        out = torch.empty_like(n)
        _divide_kernel[(triton.cdiv(n.numel(), 64),)](n, out, divider(d), n.numel(), BLOCK=64)
        assert out.tolist() == (n.long() // d).tolist(), d
