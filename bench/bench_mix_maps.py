"""CPU cost of `mix` on feature maps, with a box and without, next to a clone of the batch.

    python bench/bench_mix_maps.py [--threads 2] [--rounds 100] [--retain-memory on|off] [--out PATH]

MetaMixer pastes boxes on the input images only, but `mix` takes a box at any stage (CutMix on
a feature map), and the global blend runs at a feature stage, in bf16 or fp16 under autocast.
For each map - NCHW and channels_last; fp32, bf16, fp16 and uint8 - it times, in one run with
the rows in a new random order every round: one `clone` of the batch (the floor), the
whole-sample blend `mix(x, src, w)`, and `mix(x, src, w, box)` with a random box per sample
(about a quarter of the map), each forward only and (floating dtypes) forward + backward. The
ratios that matter are blend / clone and box / blend: a box moves no more data than the blend,
and the blend reads about twice what a clone does. Every mixing row is checked
against `metamixer_fast.reference.mix` before it is timed. Writes bench/results/
mix_maps-<commit>.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import ROOT, commit, cpu_name, interleaved_times

import metamixer_fast as mf
from metamixer_fast import reference
from metamixer_fast.memory import retain_freed_memory

MAPS = ((128, 128, 4, 4), (64, 64, 7, 7), (256, 64, 8, 8), (128, 64, 16, 16), (256, 3, 32, 32))
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)


def make_case(shape: tuple[int, int, int, int], dtype: torch.dtype, channels_last: bool,
              seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A batch, partners (a permutation), weights and random boxes of about half the height and
    width, clipped to the map."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = shape
    x = (torch.rand(shape, generator=g) * 255).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    src = torch.randperm(n, generator=g)
    wt = torch.rand(n, generator=g)
    y0, x0 = torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)
    box = torch.stack([y0, (y0 + h // 2 + 1).clamp(max=h), x0, (x0 + w // 2 + 1).clamp(max=w)], 1)
    return x, src, wt, box


def rows_of(x: Tensor, src: Tensor, wt: Tensor, box: Tensor, grad: Tensor | None = None
            ) -> dict[str, Callable[[], object]]:
    """name -> call; for floating batches also forward + backward rows, which return the
    gradients (dx, dw) for the upstream gradient ``grad`` (random if None)."""
    rows: dict[str, Callable[[], object]] = {
        "clone": x.clone,
        "blend": lambda: mf.mix(x, src, wt),
        "box": lambda: mf.mix(x, src, wt, box),
    }
    if x.is_floating_point():
        leaf = x.detach().clone().requires_grad_()
        wl = wt.clone().requires_grad_()
        g = torch.randn_like(x) if grad is None else grad

        def fwd_bwd(b: Tensor | None) -> Callable[[], object]:
            return lambda: torch.autograd.grad(mf.mix(leaf, src, wl, b), (leaf, wl), g)

        rows["blend fwd+bwd"], rows["box fwd+bwd"] = fwd_bwd(None), fwd_bwd(box)
    return rows


def check(x: Tensor, src: Tensor, wt: Tensor, box: Tensor) -> None:
    """The rows compute what they are named after (raises if not)."""
    for b in (None, box):
        if not torch.equal(mf.mix(x, src, wt, b), reference.mix(x, src, wt, b)):
            raise AssertionError(f"mix with box={'yes' if b is not None else 'no'} differs from "
                                 f"the reference for {tuple(x.shape)} {x.dtype}")


def measure(rounds: int) -> dict[str, dict[str, float]]:
    """case -> row -> median microseconds."""
    results = {}
    for shape in MAPS:
        for dtype in DTYPES:
            for channels_last in (False, True):
                case = make_case(shape, dtype, channels_last)
                check(*case)
                times = interleaved_times(rows_of(*case), rounds, warmup=5)
                key = (f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} "
                       f"{'channels_last' if channels_last else 'NCHW'}")
                results[key] = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    return results


def print_table(results: dict[str, dict[str, float]]) -> None:
    print("| map | clone us | blend us | box us | blend / clone | box / blend | "
          "blend fwd+bwd / clone | box fwd+bwd / blend fwd+bwd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, us in results.items():
        bwd = (f"{us['blend fwd+bwd'] / us['clone']:.2f} | "
               f"{us['box fwd+bwd'] / us['blend fwd+bwd']:.2f}" if "box fwd+bwd" in us else " | ")
        print(f"| {key} | {us['clone']:.0f} | {us['blend']:.0f} | {us['box']:.0f} | "
              f"{us['blend'] / us['clone']:.2f} | {us['box'] / us['blend']:.2f} | {bwd} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--retain-memory", choices=["on", "off"], default="on")
    parser.add_argument("--out", type=Path, help="where to write the JSON")
    args = parser.parse_args()
    retained = retain_freed_memory() if args.retain_memory == "on" else False
    torch.set_num_threads(args.threads)
    backend = mf._backend.backend_for("mix", torch.device("cpu"))
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {args.threads} threads; retain_memory "
          f"{retained}; backend {backend}; commit {commit()}; median of {args.rounds} "
          f"interleaved rounds\n")
    results = measure(args.rounds)
    print_table(results)
    report = {"benchmark": "mix on feature maps (CPU)", "commit": commit(),
              "cpu": cpu_name(), "backend": backend, "torch": torch.__version__, "threads": args.threads,
              "rounds": args.rounds, "retain_memory": retained, "median_us": results}
    out = args.out or ROOT / "bench" / "results" / f"mix_maps-{report['commit']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
