"""Training-step throughput: metamixer_fast's loop vs online KD written as research code does it.

Both train the same K peers (same architecture, same initial weights) on the same batches of
random 32x32 images with MetaMixer (local CutMix-like mixing, then a global blend at the input)
and DML distillation. Data loading is excluded from both: each step gets a ready float batch.

- ``naive``: eager; mixing by clone + per-sample box masks + where, a soft label matrix [B, C];
  a Python loop over peer pairs of log_softmax/softmax/kl_div; one optimizer and one backward
  per peer (the DML reference structure); peers and batches in PyTorch's default memory format,
  as research code has them.
- ``naive, channels_last``: the same loop with peers and batches in channels_last, the memory
  format our loop uses, to show how much of the difference that choice alone makes.
- ``ours``: ``metamixer_fast.train.Run.train_step``: MetaMixer plan + fused ``mix`` and
  ``mixed_kd_loss`` ops, one foreach SGD over all peers, channels_last.
- ``ours --amp bf16``: the same under bfloat16 autocast (oneDNN uses AMX/AVX-512-BF16 where the
  CPU has them); a different precision from the fp32 rows, so compare it with
  ``naive --amp bf16``, the naive loop with its forward under the same autocast.
- ``ours+compile``: the fp32 loop with ``torch.compile`` of the peers' forward;
  ``ours+compile --amp bf16`` the same under bfloat16 autocast.

A second table gives the fp32 convolution time per step of both loops (torch.profiler) and
the ceiling it implies: naive step time / our convolution time, the speed-up if everything else
in our step took no time at all.

Run: ``python bench/bench_train_step.py [--arch resnet20] [--batch-size 128] [--steps 20]``; it
prints markdown tables (median images/s over the timed steps) and writes JSON under
bench/results/. Under pytest-benchmark: ``pytest bench/bench_train_step.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _meta import commit  # bench/ is on sys.path (script or pytest)
from torch import Tensor, nn

from metamixer_fast.config import from_mapping
from metamixer_fast.train import Run

RESULTS = Path(__file__).resolve().parent / "results"


def naive_step(peers: list[nn.Module], optimizers: list[torch.optim.Optimizer], x: Tensor,
               y: Tensor, num_classes: int, temperature: float, g: torch.Generator,
               bf16: bool = False) -> None:
    n, _, h, w = x.shape
    # local mixing: a random box per sample pasted from a same-batch partner (clone/mask/where)
    sigma = torch.randperm(n, generator=g)
    lam = torch.distributions.Beta(1.0, 1.0).sample((n,))
    cut = (1 - lam).sqrt()
    ch, cw = (cut * h).long(), (cut * w).long()
    cy, cx = torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)
    y0, y1 = (cy - ch // 2).clamp(0, h), (cy + ch // 2).clamp(0, h)
    x0, x1 = (cx - cw // 2).clamp(0, w), (cx + cw // 2).clamp(0, w)
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
    for i in range(n):
        mask[i, :, y0[i]:y1[i], x0[i]:x1[i]] = True
    lam = 1 - ((y1 - y0) * (x1 - x0)).float() / (h * w)
    x_local = torch.where(mask, x.clone()[sigma], x.clone())
    # global blend at the input with a second partner
    pi = torch.randperm(n, generator=g)
    mu = float(torch.distributions.Beta(1.0, 1.0).sample())
    x_mix = mu * x_local + (1 - mu) * x_local[pi]
    one_hot = F.one_hot(y, num_classes).float()
    local_soft = lam[:, None] * one_hot + (1 - lam[:, None]) * one_hot[sigma]
    soft = mu * local_soft + (1 - mu) * local_soft[pi]

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the usual AMP recipe
        outputs = [peer(x_mix).float() for peer in peers]
    for i, opt in enumerate(optimizers):
        ce = -(soft * F.log_softmax(outputs[i], dim=1)).sum(1).mean()
        kl = 0.0
        for j in range(len(peers)):
            if j != i:
                kl = kl + F.kl_div(F.log_softmax(outputs[i] / temperature, dim=1),
                                   F.softmax(outputs[j].detach() / temperature, dim=1),
                                   reduction="batchmean") * temperature * temperature
        loss = ce + kl / (len(peers) - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()


def make_run(arch: str, batch_size: int, compile_peers: bool, amp: str = "none") -> Run:
    cfg = from_mapping({"dataset": "synthetic", "synthetic_size": batch_size, "arch": arch,
                        "batch_size": batch_size, "method": "metamixer", "stages": "input",
                        "compile": compile_peers, "amp": amp, "progress": False, "out": "/tmp/unused"})
    return Run(cfg.validate())


def time_steps(step, batches: list[tuple[Tensor, Tensor]], warmup: int) -> list[float]:
    rates = []
    for i, (x, y) in enumerate(batches):
        start = time.perf_counter()
        step(x, y)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            rates.append(x.shape[0] / elapsed)
    return rates


def convolution_ms(step, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Milliseconds per step spent inside convolution kernels (forward and backward), from
    torch.profiler's self time of the aten convolution ops: the part of a step that the loop
    around the peers cannot change at a given precision."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for x, y in batches:
            step(x, y)
    us = sum(e.self_cpu_time_total for e in prof.key_averages()
             if e.key.startswith(("aten::mkldnn_convolution", "aten::convolution_backward")))
    return us / 1e3 / len(batches)


def naive_loop(run: Run, memory_format: torch.memory_format, g: torch.Generator,
               bf16: bool = False):
    """A naive_step closure over its own copies of run's peers (same initial weights) in
    ``memory_format``, with one SGD per peer."""
    peers = [copy.deepcopy(p).to(memory_format=memory_format) for p in run.group.peers]
    optimizers = [torch.optim.SGD(p.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4) for p in peers]
    num_classes = run.train_batches.dataset.num_classes
    return lambda x, y: naive_step(peers, optimizers, x, y, num_classes, run.cfg.temperature, g,
                                   bf16=bf16)


def measure(arch: str, batch_size: int, steps: int, warmup: int, with_compile: bool) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    run = make_run(arch, batch_size, compile_peers=False)
    num_classes = run.train_batches.dataset.num_classes
    batches = [(torch.randn(batch_size, 3, 32, 32, generator=g),
                torch.randint(0, num_classes, (batch_size,), generator=g)) for _ in range(steps + warmup)]
    batches_cl = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    # research code keeps PyTorch's default memory format; channels_last is one of our loop's
    # choices, so the naive loop also runs with it in a row of its own
    naive = naive_loop(run, torch.contiguous_format, g)
    results = {"naive": time_steps(naive, batches, warmup),
               "naive, channels_last": time_steps(naive_loop(run, torch.channels_last, g),
                                                  batches_cl, warmup),
               "naive --amp bf16": time_steps(naive_loop(run, torch.contiguous_format, g, True),
                                              batches, warmup)}
    results["ours"] = time_steps(run.train_step, batches_cl, warmup)
    results["ours --amp bf16"] = time_steps(make_run(arch, batch_size, False, "bf16").train_step,
                                            batches_cl, warmup)
    if with_compile:
        compiled = make_run(arch, batch_size, compile_peers=True)
        results["ours+compile"] = time_steps(compiled.train_step, batches_cl, warmup + 2)
        compiled_bf16 = make_run(arch, batch_size, compile_peers=True, amp="bf16")
        results["ours+compile --amp bf16"] = time_steps(compiled_bf16.train_step, batches_cl,
                                                        warmup + 2)
    rates = {name: statistics.median(r) for name, r in results.items()}
    conv = {"naive": convolution_ms(naive, batches[:3]),
            "ours": convolution_ms(run.train_step, batches_cl[:3])}
    return {"images_per_s_median": rates, "convolution_ms_per_step": conv}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args()
    measured = measure(args.arch, args.batch_size, args.steps, args.warmup, not args.no_compile)
    rates, conv = measured["images_per_s_median"], measured["convolution_ms_per_step"]
    meta = {"arch": args.arch, "peers": 2, "batch_size": args.batch_size, "image": "3x32x32",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit(),
            **measured}
    print(f"2 x {args.arch}, batch {args.batch_size}, 3x32x32, CPU, {meta['threads']} threads, "
          f"commit {meta['commit']}; median images/s over {args.steps} steps\n")
    print("| loop | images/s | vs naive |\n|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / rates['naive']:.2f}x |")
    # if everything but the convolutions took no time, ours would run at batch / conv time
    naive_ms = 1e3 * args.batch_size / rates["naive"]
    print("\nfp32 convolution time per step (torch.profiler, 3 steps): the loop's ceiling\n")
    print("| loop | step ms | convolution ms | share | ceiling vs naive |\n|---|---:|---:|---:|---:|")
    for name in ("naive", "ours"):
        step_ms = 1e3 * args.batch_size / rates[name]
        print(f"| {name} | {step_ms:.1f} | {conv[name]:.1f} | {conv[name] / step_ms:.0%} | "
              f"{naive_ms / conv[name]:.2f}x |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"train_step_{args.arch}_b{args.batch_size}.json"
    out.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"\nwrote {out}")


def test_train_step_ours(benchmark) -> None:
    run = make_run("tiny", 64, compile_peers=False)
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    benchmark(run.train_step, x, y)


if __name__ == "__main__":
    main()
