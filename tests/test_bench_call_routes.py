"""bench_call_routes.py times three routes into the same kernels: check that each row computes
the same gradient (bit for bit where the kernels are the same; the loss's C++ eager entry
reuses its forward's exponentials, so it agrees to rounding)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_call_routes  # bench/ is not a package


def test_every_route_computes_the_custom_ops_gradient() -> None:
    for case, rows in bench_call_routes.cases().items():
        want = rows["torch.ops (custom op)"]().clone()
        assert torch.equal(rows["direct route"](), want), case
        torch.testing.assert_close(rows["public API"](), want, rtol=1e-5, atol=1e-7, msg=case)

