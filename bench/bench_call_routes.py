"""What an eager call costs by the route it takes into the same kernels (CPU).

    python bench/bench_call_routes.py --report [--threads 2] [--rounds 400] [--out PATH]
    python bench/bench_call_routes.py --render bench/results/<commit>/call_routes2_<n>.json

A plain eager call of ``mixed_kd_loss``, ``mix`` or ``mix2`` that needs a gradient can reach
the same kernel three ways, timed here forward + backward on small inputs, where the fixed
cost of a call is most of its time:

  torch.ops (custom op)   ``torch.ops.metamixer.*``: the custom op's Python dispatch and
                          autograd glue (what ``torch.compile`` traces, and what eager calls
                          took before the direct route)
  direct route            the op's body and backward rule linked by a ``torch.autograd.Function``
                          (``ops._MixedKDLoss`` / ``ops._Mix`` / ``mix2._Mix2``): the route of a
                          plain eager call that no C++ entry takes (CUDA tensors, the Triton or
                          reference backend, no C++ build)
  public API              ``metamixer_fast.mixed_kd_loss`` / ``mix`` / ``mix2``: for the loss on
                          CPU the C++ entry with its C++ autograd node; for mix and mix2 the
                          direct route, behind the public function's checks

The backend is the automatic one (C++ on CPU), or the one ``METAMIXER_BACKEND`` forces for
the whole run. Rows run interleaved, in a random order each round; medians and the ratio to
the custom op's median. JSON: bench/results/call_routes_{threads}threads.json or --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from _meta import commit, cpu_name, interleaved_times  # bench/ is on sys.path

import metamixer_fast as mf
from metamixer_fast import _backend, ops
from metamixer_fast.mix2 import _Mix2

RESULTS = Path(__file__).resolve().parent / "results" / "call_routes_{threads}threads.json"
LOSS = (2, 128, 100)  # K, B, C: CIFAR-100, two peers
FEATURES = (128, 16, 8, 8)  # a small feature map, where the call's fixed cost shows


def loss_rows(seed: int = 0) -> dict[str, Callable[[], torch.Tensor]]:
    """Rows of one loss step each; a row returns the gradient of the logits."""
    k, b, c = LOSS
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(k, b, c, generator=g).requires_grad_(True)
    y = torch.randint(0, c, (b,), generator=g)
    labels, weights = y[:, None], torch.ones(b, 1)
    args = (3.0, 0.0, "pairwise", None, True)

    def step(forward: Callable[[], tuple]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            z.grad = None
            ce, kd = forward()[:2]
            (ce.sum() + kd.sum()).backward()
            return z.grad
        return run

    return {
        "torch.ops (custom op)": step(lambda: torch.ops.metamixer.mixed_kd_loss(
            [z], labels, weights, *args)),
        "direct route": step(lambda: ops._MixedKDLoss.apply(labels, weights, *args, z)),
        "public API": step(lambda: mf.mixed_kd_loss(z, y, temperature=3.0)),
    }


def mix_rows(fused: bool, seed: int = 0) -> dict[str, Callable[[], torch.Tensor]]:
    """Rows of one mix (or mix2) forward + backward each; a row returns the gradient of x."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = FEATURES
    x = torch.randn(FEATURES, generator=g).requires_grad_(True)
    src, src2 = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
    wt, w2 = torch.zeros(n), torch.rand(n, generator=g)
    box = torch.tensor([[1, h - 2, 2, w - 1]]).expand(n, 4).contiguous()
    upstream = torch.randn(FEATURES, generator=g)
    if fused:
        args = (x, src, wt, box, src2, w2)
        routes = (torch.ops.metamixer.mix2, _Mix2.apply, mf.mix2)
    else:
        args = (x, src, w2, None)
        routes = (torch.ops.metamixer.mix, ops._Mix.apply, mf.mix)

    def step(forward: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            x.grad = None
            forward(*args).backward(upstream)
            return x.grad
        return run

    names = ("torch.ops (custom op)", "direct route", "public API")
    return {name: step(route) for name, route in zip(names, routes, strict=True)}


def cases() -> dict[str, dict[str, Callable[[], torch.Tensor]]]:
    shape = "x".join(map(str, FEATURES))
    return {
        "mixed_kd_loss fwd+bwd K=2 B=128 C=100 fp32": loss_rows(),
        f"mix fwd+bwd (blend) {shape} fp32": mix_rows(fused=False),
        f"mix2 fwd+bwd (box + blend) {shape} fp32": mix_rows(fused=True),
    }


def markdown(result: dict) -> str:
    """The report's table of a result (a JSON that ``report`` wrote)."""
    lines = [f"CPU: {result['cpu']}; {result['threads']} threads; torch {result['torch']}; commit "
             f"{result['commit']}; backend {result['backend']}; median of {result['rounds']} "
             f"interleaved rounds.", "",
             "| case | route | median us | min us | median / custom op median |",
             "|---|---|---:|---:|---:|"]
    for case, times in result["cases"].items():
        base = statistics.median(times["torch.ops (custom op)"])
        for name, t in times.items():
            med = statistics.median(t)
            lines.append(f"| {case} | {name} | {med * 1e6:.1f} | {min(t) * 1e6:.1f} | "
                         f"{med / base:.2f} |")
    return "\n".join(lines)


def report(threads: int, rounds: int, out: Path) -> None:
    torch.set_num_threads(threads)
    result = {"commit": commit(), "cpu": cpu_name(), "threads": threads, "rounds": rounds,
              "torch": torch.__version__, "backend": _backend.forced_backend() or "automatic",
              "cases": {}}
    for case, rows in cases().items():
        result["cases"][case] = interleaved_times(rows, rounds, warmup=20)
    print(markdown(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nJSON: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="store_true", help="run the interleaved report")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="print the table of a JSON written earlier, run nothing")
    args = parser.parse_args()
    if args.render is not None:
        print(markdown(json.loads(args.render.read_text())))
        return
    if not args.report:
        parser.error("nothing to do: pass --report (or --render JSON)")
    if args.threads < 1 or args.rounds < 1:
        parser.error("--threads and --rounds must be at least 1")
    report(args.threads, args.rounds, args.out or Path(str(RESULTS).format(threads=args.threads)))


if __name__ == "__main__":
    main()
