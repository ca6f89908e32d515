"""How far torch.compile's (inductor's) parameter gradients lie from a float64 reference, next to
eager fp32's, for two ``tiny`` peers on CPU: no mixing and no custom op, only the model and
cross-entropy; and whether a ReLU input within rounding of 0 explains each large difference.

    python bench/compiled_gradients.py [--batches 16,24,32,48,64] [--seeds 0,1] [--threads 2]

One row per (batch size, seed). Gradient errors are the largest over the parameter tensors of
max |g - g64| / max |g64|. Columns:

- ``compiled``, ``eager``: fp32 gradients against float64's;
- ``compiled, no layout opt``: compiled with ``torch._inductor.config.layout_optimization = False``;
- ``smallest ReLU input``: the smallest |input| of a ReLU in the float64 forward (the distance
  to the nearest kink);
- ``compiled vs float64, one gate flipped``: the smallest compiled error against float64 with
  the ReLU gate of one unit whose input lies within ``--near`` of 0 set the other way (the
  float64 gradient of a network on the other side of that kink), and ``at`` that unit's |input|;
  ``-`` where no flip comes closer than the plain comparison;
- ``logits: eager``, ``compiled``, ``compiled, no layout opt``: the forward's largest absolute
  logit error against float64.

A second table repeats the gradient errors under bf16 autocast, eager and compiled, and their
ratio (``bf16_row``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

from metamixer_fast.models import build_model

Grads = list[torch.Tensor]


def _grads(peers: nn.ModuleList, forward: Callable, x: torch.Tensor, y: torch.Tensor) -> Grads:
    loss = sum(F.cross_entropy(p, y) for p in forward(x))
    return list(torch.autograd.grad(loss, list(peers.parameters())))


def _worst(grads: Grads, truth: Grads) -> float:
    return max(((g.double() - t).abs().max() / t.abs().max()).item() for g, t in zip(grads, truth))


def _eager(peers: nn.ModuleList) -> Callable:
    return lambda u: [p(u) for p in peers]


def _compiled_run(peers: nn.ModuleList, x: torch.Tensor, y: torch.Tensor,
                  layout_optimization: bool = True) -> tuple[Grads, torch.Tensor]:
    """Compiled fp32 gradients and logits. Dynamo is reset first: its cache does not key on
    inductor's config, so a frame compiled under one setting would be reused under the other."""
    torch._dynamo.reset()
    with inductor_config.patch(layout_optimization=layout_optimization):
        forward = torch.compile(_eager(peers), dynamic=False)
        grads = _grads(peers, forward, x, y)
        with torch.no_grad():
            logits = torch.stack(forward(x))
    return grads, logits


class _Gates:
    """What F.relu (the models' ReLU) saw in one float64 pass: its smallest |input|, and each
    unit within ``near`` of 0 as (|input|, (call, flat index))."""

    def __init__(self, near: float) -> None:
        self.near, self.smallest = near, float("inf")
        self.units: list[tuple[float, tuple[int, int]]] = []


@contextlib.contextmanager
def _relu_gates(seen: _Gates, flip: tuple[int, int] | None = None) -> Iterator[None]:
    """Within the block F.relu records into ``seen`` and, with ``flip``, gates that one unit the
    other way: relu(t) = t * gate, whose gradient is the one on the other side of the kink."""
    relu, calls = F.relu, [0]

    def gated(t: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        call, calls[0] = calls[0], calls[0] + 1
        size = t.detach().abs().flatten()
        seen.smallest = min(seen.smallest, size.min().item())
        seen.units.extend((size[i].item(), (call, i))
                          for i in (size < seen.near).nonzero().flatten().tolist())
        gate = (t.detach() > 0).to(t.dtype).flatten()
        if flip is not None and flip[0] == call:
            gate[flip[1]] = 1 - gate[flip[1]]
        return t * gate.view_as(t)

    F.relu = gated
    try:
        yield
    finally:
        F.relu = relu


def _one_gate_flipped(p64: nn.ModuleList, x: torch.Tensor, y: torch.Tensor, compiled: Grads,
                      truth: Grads, seen: _Gates) -> str:
    """The error of ``compiled`` against float64 with the one near-zero ReLU unit of ``seen``
    (recorded in the pass that gave ``truth``) flipped that brings them closest, and that unit's
    |input|; ``-`` if no flip does better than none."""
    best, best_distance = _worst(compiled, truth), None
    for distance, unit in seen.units:
        with _relu_gates(_Gates(0.0), flip=unit):
            error = _worst(compiled, _grads(p64, _eager(p64), x, y))
        if error < best:
            best, best_distance = error, distance
    return "-" if best_distance is None else f"{best:.1e} at {best_distance:.1e}"


@dataclasses.dataclass
class Case:
    """Two ``tiny`` peers and a batch, with the float64 gradients of that batch (``truth``) and
    the ReLU kinks its pass found (``seen``); both tables use one Case per (batch size, seed)."""
    peers: nn.ModuleList
    p64: nn.ModuleList
    x: torch.Tensor
    y: torch.Tensor
    truth: Grads
    seen: _Gates


def case(n: int, seed: int, near: float) -> Case:
    torch.manual_seed(seed)
    peers = nn.ModuleList([build_model("tiny", 10, 3) for _ in range(2)])
    x, y = torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,))
    p64 = copy.deepcopy(peers).double()
    seen = _Gates(near)
    with _relu_gates(seen):  # F.relu's gradient bit for bit, and where its kinks lie
        truth = _grads(p64, _eager(p64), x.double(), y)
    return Case(peers, p64, x, y, truth, seen)


def row(c: Case) -> dict[str, str]:
    peers, x, y, truth = c.peers, c.x, c.y, c.truth
    with torch.no_grad():
        logits64 = torch.stack(_eager(c.p64)(x.double()))
        logits = torch.stack(_eager(peers)(x))
    compiled, compiled_logits = _compiled_run(peers, x, y)
    plain, plain_logits = _compiled_run(peers, x, y, layout_optimization=False)

    def off(z: torch.Tensor) -> str:
        return f"{(z.double() - logits64).abs().max().item():.1e}"

    return {
        "compiled": f"{_worst(compiled, truth):.1e}",
        "eager": f"{_worst(_grads(peers, _eager(peers), x, y), truth):.1e}",
        "compiled, no layout opt": f"{_worst(plain, truth):.1e}",
        "smallest ReLU input": f"{c.seen.smallest:.1e}",
        "compiled vs float64, one gate flipped": _one_gate_flipped(c.p64, x.double(), y, compiled,
                                                                   truth, c.seen),
        "logits: eager": off(logits),
        "logits: compiled": off(compiled_logits),
        "logits: compiled, no layout opt": off(plain_logits),
    }


def bf16_row(c: Case) -> dict[str, str]:
    """The same peers and batch under bf16 autocast: eager's and compiled's gradient errors
    against float64 (the precision's own error, which a compiled run should not exceed by much)."""
    torch._dynamo.reset()
    compiled = torch.compile(_eager(c.peers), dynamic=False)
    with torch.autocast("cpu", torch.bfloat16):
        eager_grads = _grads(c.peers, _eager(c.peers), c.x, c.y)
        compiled_grads = _grads(c.peers, compiled, c.x, c.y)
    eager_error, compiled_error = _worst(eager_grads, c.truth), _worst(compiled_grads, c.truth)
    return {"bf16 eager": f"{eager_error:.2f}", "bf16 compiled": f"{compiled_error:.2f}",
            "compiled / eager": f"{compiled_error / eager_error:.2f}",
            "compiled vs eager": f"{_worst(compiled_grads, [g.double() for g in eager_grads]):.2f}"}


def _table(rows: list[tuple[int, int, dict[str, str]]]) -> None:
    print("| N | seed | " + " | ".join(rows[0][2]) + " |")
    print("|---|---|" + "---|" * len(rows[0][2]))
    for n, s, r in rows:
        print(f"| {n} | {s} | " + " | ".join(r.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="16,24,32,48,64")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--near", type=float, default=2e-6,
                        help="ReLU inputs within this of 0 are tried flipped (default 2e-6)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = [(n, s) for n in map(int, args.batches.split(",")) for s in map(int, args.seeds.split(","))]
    print(f"torch {torch.__version__}, {args.threads} threads; gradient errors: largest over the "
          f"parameters of max |g - g64| / max |g64|; logits: largest absolute error\n")
    cases = {pair: case(*pair, args.near) for pair in pairs}
    _table([(n, s, row(c)) for (n, s), c in cases.items()])
    print("\nUnder bf16 autocast, gradient errors against float64 as above:\n")
    _table([(n, s, bf16_row(c)) for (n, s), c in cases.items()])


if __name__ == "__main__":
    main()
