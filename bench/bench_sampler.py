"""Per-step cost of drawing a mixing plan, next to one copy of the batch it mixes.

    python bench/bench_sampler.py [--threads 2] [--repeats 300]

Times ``sample(y)`` + ``resolve((H, W))`` + ``target`` (everything a step needs besides the
``mix`` calls themselves) for MetaMixer and the CutMix-or-Mixup baseline, and ``x.clone()`` of
the batch as the machine's floor; medians after warm-up, in one run. The plan's cost does not
depend on the image size, only on N.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from metamixer_fast import CutMixOrMixup, MetaMixer

SHAPES = ((256, 3, 32, 32), (64, 3, 224, 224))


def median_us(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print(f"{'batch':>18} {'what':>34} {'us':>9} {'x clone':>8}")
    for shape in SHAPES:
        n, _, h, w = shape
        x = torch.randn(shape)
        y = torch.randint(0, 100, (n,))
        clone = median_us(x.clone, args.repeats)
        rows = [("clone of the fp32 batch", clone)]
        for name, sampler in (("MetaMixer sample+resolve+target", MetaMixer()),
                              ("CutMixOrMixup(elem) sample+target", CutMixOrMixup(mode="elem"))):
            def step(s=sampler, y=y, size=(h, w)) -> object:
                return s.sample(y).resolve(size).target

            rows.append((name, median_us(step, args.repeats)))
        for name, us in rows:
            print(f"{'x'.join(map(str, shape)):>18} {name:>34} {us:9.1f} {us / clone:8.2f}")


if __name__ == "__main__":
    main()
