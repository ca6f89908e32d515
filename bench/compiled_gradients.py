"""How far torch.compile's (inductor's) parameter gradients lie from a float64 reference, next to
eager fp32's, for two ``tiny`` peers on CPU: no mixing and no custom op, only the model and
cross-entropy.

    python bench/compiled_gradients.py [--batches 16,24,32,48,64] [--seeds 0,1] [--threads 2]

One row per (batch size, seed): the largest relative error over the parameters (max |g - g64|
over max |g64|, per parameter tensor), compiled and eager, then the same compiled run with the
input moved by 1e-6 and with ``torch._inductor.config.layout_optimization = False``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch._inductor.config as inductor_config
from torch import nn

from metamixer_fast.models import build_model


def _grads(peers: nn.ModuleList, forward: Callable, x: torch.Tensor, y: torch.Tensor) -> list:
    loss = sum(nn.functional.cross_entropy(p, y) for p in forward(x))
    return list(torch.autograd.grad(loss, list(peers.parameters())))


def _worst(grads: list, truth: list) -> float:
    return max(((g.double() - t).abs().max() / t.abs().max()).item() for g, t in zip(grads, truth))


def _compiled(peers: nn.ModuleList, x: torch.Tensor, y: torch.Tensor, layout_optimization: bool) -> list:
    torch._dynamo.reset()
    with inductor_config.patch(layout_optimization=layout_optimization):
        forward = torch.compile(lambda u: [p(u) for p in peers], dynamic=False)
        return _grads(peers, forward, x, y)


def row(n: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    peers = nn.ModuleList([build_model("tiny", 10, 3) for _ in range(2)])
    x, y = torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,))
    p64 = copy.deepcopy(peers).double()
    truth = _grads(p64, lambda u: [p(u) for p in p64], x.double(), y)
    nudged = x + 1e-6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return {"compiled": _worst(_compiled(peers, x, y, True), truth),
            "eager": _worst(_grads(peers, lambda u: [p(u) for p in peers], x, y), truth),
            "compiled, input + 1e-6": _worst(_compiled(peers, nudged, y, True), truth),
            "compiled, no layout optimization": _worst(_compiled(peers, x, y, False), truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="16,24,32,48,64")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [(n, s, row(n, s)) for n in map(int, args.batches.split(","))
            for s in map(int, args.seeds.split(","))]
    names = list(rows[0][2])
    print(f"torch {torch.__version__}, {args.threads} threads; largest relative gradient error "
          f"against float64\n")
    print("| N | seed | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for n, s, r in rows:
        print(f"| {n} | {s} | " + " | ".join(f"{r[k]:.1e}" for k in names) + " |")


if __name__ == "__main__":
    main()
