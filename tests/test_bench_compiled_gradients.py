"""bench/compiled_gradients.py explains a compiled gradient by flipping one ReLU gate in float64:
check that the flip is the gradient of the other side of the kink and that the search finds it."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compiled_gradients as cg  # bench/ is not a package

from metamixer_fast.models import build_model


def _tiny_pair() -> tuple[nn.ModuleList, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    p64 = copy.deepcopy(nn.ModuleList([build_model("tiny", 10, 3) for _ in range(2)])).double()
    return p64, torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (4,))


def test_the_gated_relu_without_a_flip_is_relu() -> None:
    """t * (t > 0) has F.relu's values and gradient, bit for bit (no input is exactly 0 here)."""
    p64, x, y = _tiny_pair()
    truth = cg._grads(p64, cg._eager(p64), x, y)
    seen = cg._Gates(float("inf"))
    with cg._relu_gates(seen):
        gated = cg._grads(p64, cg._eager(p64), x, y)
    assert all(torch.equal(g, t) for g, t in zip(gated, truth))
    assert seen.smallest > 0 and seen.smallest == min(d for d, _ in seen.units)
    assert F.relu.__module__ == "torch.nn.functional"  # the patch is undone


def test_the_search_finds_the_one_flip_that_explains_a_gradient() -> None:
    p64, x, y = _tiny_pair()
    everything = cg._Gates(float("inf"))
    with cg._relu_gates(everything):
        cg._grads(p64, cg._eager(p64), x, y)
    distance, unit = sorted(everything.units)[1]  # the second nearest: the search must not take the first
    with cg._relu_gates(cg._Gates(0.0), flip=unit):
        other_side = cg._grads(p64, cg._eager(p64), x, y)
    seen = cg._Gates(distance * 1.001)
    with cg._relu_gates(seen):
        truth = cg._grads(p64, cg._eager(p64), x, y)
    assert len(seen.units) == 2 and cg._worst(other_side, truth) > 1e-6  # a real change
    assert cg._one_gate_flipped(p64, x, y, other_side, truth, seen) == f"{0.0:.1e} at {distance:.1e}"
