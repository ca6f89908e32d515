"""Per-step cost of drawing a mixing plan, next to one copy of the batch it mixes.

    python bench/bench_sampler.py [--threads 2] [--rounds 300] [--retain-memory on|off] [--out PATH]

Times ``sample(y)`` + ``resolve((H, W))`` + ``target`` (everything a step needs besides the
``mix`` calls themselves) for MetaMixer and the CutMix-or-Mixup baseline, and ``x.clone()`` of
the batch as the machine's floor, interleaved in a new random order every round; medians after
warm-up, in one run. The plan's cost does not depend on the image size, only on N. With
``--retain-memory on`` (the default, as in the training loop) the clone's output does not pay
fresh page faults every call. Writes bench/results/sampler-<commit>.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import ROOT, commit, cpu_name, interleaved_times

from metamixer_fast import CutMixOrMixup, MetaMixer
from metamixer_fast.memory import retain_freed_memory

SHAPES = ((256, 3, 32, 32), (64, 3, 224, 224))


def measure(shape: tuple[int, int, int, int], rounds: int) -> dict[str, float]:
    """Median microseconds of each row for a batch of ``shape``."""
    n, _, h, w = shape
    x = torch.randn(shape)
    y = torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(0))
    rows = {"clone of the fp32 batch": x.clone}
    for name, sampler in (("MetaMixer sample+resolve+target", MetaMixer()),
                          ("CutMixOrMixup(elem) sample+resolve+target", CutMixOrMixup(mode="elem"))):
        def step(s=sampler) -> object:
            return s.sample(y).resolve((h, w)).target

        rows[name] = step
    times = interleaved_times(rows, rounds, warmup=20)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--retain-memory", choices=["on", "off"], default="on")
    parser.add_argument("--out", type=Path, help="where to write the JSON")
    args = parser.parse_args()
    retained = retain_freed_memory() if args.retain_memory == "on" else False
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, retain_memory {retained}, "
          f"median of {args.rounds} rounds")
    print(f"{'batch':>18} {'what':>34} {'us':>9} {'x clone':>8}")
    results = {}
    for shape in SHAPES:
        key = "x".join(map(str, shape))
        results[key] = us = measure(shape, args.rounds)
        clone = us["clone of the fp32 batch"]
        for name, t in us.items():
            print(f"{key:>18} {name:>34} {t:9.1f} {t / clone:8.2f}")
    import metamixer_fast

    report = {"benchmark": "plan drawing (CPU)", "commit": commit(), "cpu": cpu_name(),
              "library": str(Path(metamixer_fast.__file__).parent),
              "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
              "retain_memory": retained, "median_us": results}
    out = args.out or ROOT / "bench" / "results" / f"sampler-{report['commit']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
