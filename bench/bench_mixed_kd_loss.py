"""Forward+backward time of the fused ``mixed_kd_loss`` against what people run today (CPU).

Contenders, all on the same fp32 logits [K, B, C] and labels, each timed as forward + backward:

- ``fused``: ``metamixer_fast.mixed_kd_loss`` (the backend the package picks: C++ when built);
- ``reference``: ``metamixer_fast.reference.mixed_kd_loss`` in eager mode;
- ``compiled_reference``: ``torch.compile`` of the reference;
- ``dml_pair_loop``: the DML-style research loop, cross_entropy per peer plus
  log_softmax/softmax/kl_div per ordered pair of peers;
- ``dml_loop_peer_softmax``: the same loop with each peer's log_softmax and softmax computed
  once (K of each instead of K(K-1)), as a careful hand-written loop would;
- ``softmax_floor``: one ``torch.softmax`` over the same [K*B, C] logits, forward only (the
  machine's floor for anything that reads the logits and exponentiates them).

Run with ``make bench`` (pytest-benchmark) or ``python -m bench.report loss`` (markdown table and
JSON under bench/results/, ratios measured in one run with the contenders interleaved).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import metamixer_fast as mf
from metamixer_fast import reference


@dataclass(frozen=True)
class Shape:
    k: int
    b: int
    c: int
    mode: str = "pairwise"
    temperature: float = 3.0
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        return f"K={self.k},B={self.b},C={self.c},{self.mode},T={self.temperature:g}"


SHAPES = [Shape(4, 1024, 1000), Shape(2, 128, 100), Shape(4, 1024, 1000, temperature=2.5),
          Shape(4, 1024, 1000, mode="ensemble")]


def make_inputs(shape: Shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape.k, shape.b, shape.c, generator=g, dtype=shape.dtype) * 2
    labels = torch.randint(0, shape.c, (shape.b,), generator=g)
    return z, labels, torch.ones(shape.b, 1)


def dml_pair_loop(z: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
    """DML as research code writes it: per peer CE, plus KL to each other peer's softened output."""
    k = z.shape[0]
    total = z.new_zeros(())
    for i in range(k):
        total = total + F.cross_entropy(z[i], labels)
        for j in range(k):
            if j != i:
                kl = F.kl_div(F.log_softmax(z[i] / t, dim=1), F.softmax(z[j].detach() / t, dim=1),
                              reduction="batchmean")
                total = total + kl * (t * t) / (k - 1)
    return total


def dml_loop_peer_softmax(z: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
    """``dml_pair_loop``'s loss with every peer's softened outputs computed once, not per pair."""
    k = z.shape[0]
    log_p = [F.log_softmax(z[i] / t, dim=1) for i in range(k)]
    p = [F.softmax(z[i].detach() / t, dim=1) for i in range(k)]
    total = z.new_zeros(())
    for i in range(k):
        total = total + F.cross_entropy(z[i], labels)
        for j in range(k):
            if j != i:
                total = total + F.kl_div(log_p[i], p[j], reduction="batchmean") * (t * t) / (k - 1)
    return total


DML_LOOPS = {"dml_pair_loop": dml_pair_loop, "dml_loop_peer_softmax": dml_loop_peer_softmax}


def contenders(shape: Shape) -> dict[str, Callable[[], object]]:
    """name -> a zero-argument callable running one forward+backward (softmax: forward only)."""
    z0, labels, weights = make_inputs(shape)
    plan = labels[:, None]
    t = shape.temperature
    z = z0.clone().requires_grad_(True)

    def step(loss_fn):
        def run():
            z.grad = None
            ce, kd = loss_fn(z)
            (ce.sum() + kd.sum()).backward()
        return run

    def fused(zz):
        return mf.mixed_kd_loss(zz, labels, temperature=t, mode=shape.mode)

    def ref(zz):
        return reference.mixed_kd_loss(zz, plan, weights, t, 0.0, shape.mode)

    # Static, one graph per shape: torch.compile's cache is per code object, and every shape's
    # ``ref`` shares one, so without dynamic=False warming the next shape recompiles it with
    # symbolic sizes and temperature, and each shape would then run that dynamic graph.
    compiled = torch.compile(ref, dynamic=False)

    def dml(loop):
        def run():
            z.grad = None
            loop(z, labels, t).backward()
        return run

    flat = z0.view(-1, shape.c)
    out = {"fused": step(fused), "reference": step(ref), "compiled_reference": step(compiled)}
    if shape.mode == "pairwise":  # the loops compute DML only
        out.update({name: dml(loop) for name, loop in DML_LOOPS.items()})
    out["softmax_floor"] = lambda: torch.softmax(flat, dim=-1)
    return out


def _cases():
    for shape in SHAPES:
        for name in ("fused", "reference", "compiled_reference", *DML_LOOPS, "softmax_floor"):
            if name in DML_LOOPS and shape.mode != "pairwise":
                continue
            yield pytest.param(shape, name, id=f"{shape}-{name}")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape, name", list(_cases()))
def test_mixed_kd_loss_fwd_bwd(benchmark, shape, name):
    fn = contenders(shape)[name]
    benchmark.group = str(shape)
    benchmark.extra_info.update(threads=torch.get_num_threads(), dtype=str(shape.dtype),
                                backend=mf._backend.backend_for("mixed_kd_loss", torch.device("cpu")))
    benchmark.pedantic(fn, rounds=20 if shape.b >= 1024 else 200, warmup_rounds=3)
