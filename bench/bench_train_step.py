"""Training-step throughput: metamixer_fast's loop vs online KD written as research code does it.

Both train the same K peers (same architecture, same initial weights) on the same batches of
random 32x32 images with MetaMixer (local CutMix-like mixing, then a global blend at the input)
and DML distillation. Data loading is excluded from both: each step gets a ready float batch.

- ``naive``: eager; mixing by clone + per-sample box masks + where, a soft label matrix [B, C];
  a Python loop over peer pairs of log_softmax/softmax/kl_div; one optimizer and one backward
  per peer (the DML reference structure); peers and batches in PyTorch's default memory format,
  as research code has them.
- ``naive channels_last``: the same loop with peers and batches in channels_last, the memory
  format our loop uses, to show how much of the difference that choice alone makes.
- ``ours``: ``metamixer_fast.train.Run.train_step``: MetaMixer plan + fused ``mix`` and
  ``mixed_kd_loss`` ops, one foreach SGD over all peers, channels_last.
- ``ours --amp bf16``: the same under bfloat16 autocast (oneDNN uses AMX/AVX-512-BF16 where the
  CPU has them); a different precision from the fp32 rows, so compare it with
  ``naive --amp bf16``, the naive loop with its forward under the same autocast.
- ``ours+compile``: the fp32 loop with ``torch.compile`` of the peers' forward;
  ``ours+compile --amp bf16`` the same under bfloat16 autocast.

In one process the rows run interleaved: step i of every row, in a new random order for every
i. Every row also reports the minor page faults per step. Our runs set ``retain_memory`` (malloc
keeps freed blocks instead of unmapping them, ``metamixer_fast.memory``); that setting is
process-wide, so the naive rows of the same run get it too. ``--retain-memory off`` runs every
row with the C library's defaults.

``--fresh-processes ROUNDS`` runs every row alone in a new interpreter instead, rows interleaved
round by round, and reports each row's median over the rounds: that is how a training job meets
the allocator (the naive rows with the C library's defaults, as research code runs, ours with
``retain_memory``), but it has no convolution table.

A second table gives our fp32 loop's convolution time per step, eager and compiled
(torch.profiler), their FLOP rate (torch.utils.flop_counter) and the ceiling it implies: naive
step time / our convolution time, the speed-up if everything else in our step took no time.
(The naive loop's own profile is left out: it scattered from 0.7x to 1.5x of its timed step.)

Run: ``python bench/bench_train_step.py [--arch resnet20] [--batch-size 128] [--steps 20]``; it
prints markdown tables (median images/s over the timed steps) and writes JSON under
bench/results/. Under pytest-benchmark: ``pytest bench/bench_train_step.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _meta import commit, cpu_name  # bench/ is on sys.path (script or pytest)
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

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


def make_run(arch: str, batch_size: int, compile_peers: bool, amp: str = "none",
             retain_memory: bool = True) -> Run:
    cfg = from_mapping({"dataset": "synthetic", "synthetic_size": batch_size, "arch": arch,
                        "batch_size": batch_size, "method": "metamixer", "stages": "input",
                        "compile": compile_peers, "amp": amp, "retain_memory": retain_memory,
                        "progress": False, "out": "/tmp/unused"})
    return Run(cfg.validate())


def time_interleaved_steps(setups: dict[str, tuple]) -> dict[str, dict]:
    """Times every row's steps, interleaved: step i of every row, the rows in a new random
    order (seeded) for every i, so a slow or fast stretch of the machine falls on all rows alike
    and no row always follows the same one. ``setups``: name -> (step, batches, warm-up steps).

    Per row: images/s of each step after its warm-up, its timed steps' minor page faults per
    step (counted around each step; the process's count, so other threads' faults are in it),
    and the seconds of its first step (where ``torch.compile`` compiles)."""
    out = {name: {"rates": [], "faults": 0, "first_step_s": 0.0} for name in setups}
    order = list(setups)
    shuffle = random.Random(0).shuffle
    for i in range(max(len(batches) for _, batches, _ in setups.values())):
        shuffle(order)
        for name in order:
            step, batches, warmup = setups[name]
            if i >= len(batches):
                continue
            x, y = batches[i]
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            step(x, y)
            elapsed = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            if i == 0:
                out[name]["first_step_s"] = elapsed
            if i >= warmup:
                out[name]["rates"].append(x.shape[0] / elapsed)
                out[name]["faults"] += faults
    for row in out.values():
        row["faults"] /= len(row["rates"])
    return out


def convolution_ms(step, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Milliseconds per step spent inside convolution kernels (forward and backward), from
    torch.profiler's self time of the aten convolution ops: the part of a step that the loop
    around the peers cannot change at a given precision. The first batch is a warm-up step,
    unprofiled (a fresh loop's first step also creates its oneDNN primitives)."""
    step(*batches[0])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for x, y in batches[1:]:
            step(x, y)
    us = sum(e.self_cpu_time_total for e in prof.key_averages()
             if e.key.startswith(("aten::mkldnn_convolution", "aten::convolution_backward")))
    return us / 1e3 / (len(batches) - 1)


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


ROWS = ("naive", "naive channels_last", "naive --amp bf16", "ours", "ours --amp bf16",
        "ours+compile", "ours+compile --amp bf16")


def measure(arch: str, batch_size: int, steps: int, warmup: int, rows: tuple[str, ...],
            retain_memory: bool) -> dict:
    """Times ``rows`` on the same batches, interleaved step by step; with both "naive" and "ours"
    among them, also their fp32 convolution time."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    num_classes = 10  # the synthetic dataset's
    # the compiled rows skip two more warm-up steps (their first ones compile): ``steps`` are
    # timed in every row
    batches = [(torch.randn(batch_size, 3, 32, 32, generator=g),
                torch.randint(0, num_classes, (batch_size,), generator=g))
               for _ in range(steps + warmup + 2)]
    batches_cl = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    runs: dict[tuple[bool, str], Run] = {}

    def ours(compile_peers: bool, amp: str) -> Run:
        if (compile_peers, amp) not in runs:
            runs[(compile_peers, amp)] = make_run(arch, batch_size, compile_peers, amp,
                                                  retain_memory)
        return runs[(compile_peers, amp)]

    # research code keeps PyTorch's default memory format; channels_last is one of our loop's
    # choices, so the naive loop also runs with it in a row of its own. The naive peers are
    # copies of our fp32 run's peers (same initial weights).
    contiguous, cl = torch.contiguous_format, torch.channels_last
    setups = {
        "naive": lambda: (naive_loop(ours(False, "none"), contiguous, g), batches[:-2], warmup),
        "naive channels_last": lambda: (naive_loop(ours(False, "none"), cl, g), batches_cl[:-2],
                                        warmup),
        "naive --amp bf16": lambda: (naive_loop(ours(False, "none"), contiguous, g, True),
                                     batches[:-2], warmup),
        "ours": lambda: (ours(False, "none").train_step, batches_cl[:-2], warmup),
        "ours --amp bf16": lambda: (ours(False, "bf16").train_step, batches_cl[:-2], warmup),
        "ours+compile": lambda: (ours(True, "none").train_step, batches_cl, warmup + 2),
        "ours+compile --amp bf16": lambda: (ours(True, "bf16").train_step, batches_cl, warmup + 2),
    }
    names = [r for r in ROWS if r in rows]
    timed = time_interleaved_steps({name: setups[name]() for name in names})
    rates = {name: statistics.median(timed[name]["rates"]) for name in names}
    result = {"images_per_s_median": rates,
              "page_faults_per_step": {name: timed[name]["faults"] for name in names},
              "first_step_s": {name: timed[name]["first_step_s"] for name in names}}
    if "naive" in rates and "ours" in rates:
        conv = {"ours": convolution_ms(ours(False, "none").train_step, batches_cl[:4])}
        if "ours+compile" in rates:
            conv["ours+compile"] = convolution_ms(ours(True, "none").train_step, batches_cl[:4])
        result["convolution_ms_per_step"] = conv
        with FlopCounterMode(display=False) as counter:
            ours(False, "none").train_step(*batches_cl[0])
        result["gflop_per_step"] = counter.get_total_flops() / 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="comma-separated rows to run, in the order of the default (all: "
                             f"{', '.join(ROWS)}); one row alone runs in a fresh process, as "
                             "the CLI's training would")
    parser.add_argument("--retain-memory", choices=("on", "off"), default="on",
                        help="our runs' retain_memory option (malloc keeps freed blocks); it is "
                             "process-wide, so with 'on' the naive rows of one process get it too")
    parser.add_argument("--fresh-processes", type=int, default=0, metavar="ROUNDS",
                        help="run every row alone in a fresh process, ROUNDS times, rows "
                             "interleaved round by round; the naive rows then keep the C "
                             "library's allocator defaults, as research code does")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path, e.g. bench/results/<commit>/train_step_1.json (default: "
                             "bench/results/train_step_<arch>_b<batch>[_<rows>][_fresh-processes].json)")
    parser.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    retain = args.retain_memory == "on"
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    if args.no_compile:
        rows = tuple(r for r in rows if "compile" not in r)
    if args.fresh_processes:
        measured = measure_in_fresh_processes(args, rows)
    else:
        measured = measure(args.arch, args.batch_size, args.steps, args.warmup, rows, retain)
    if args.emit_json:
        print(json.dumps(measured))
        return
    rates, conv = measured["images_per_s_median"], measured.get("convolution_ms_per_step")
    meta = {"arch": args.arch, "peers": 2, "batch_size": args.batch_size, "image": "3x32x32",
            "cpu": cpu_name(), "steps": args.steps, "warmup": args.warmup, "rows": list(rows),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit(),
            "retain_memory": retain, "fresh_processes": args.fresh_processes, **measured}
    how = (f"each row alone in a fresh process, median of {args.fresh_processes} rounds of"
           if args.fresh_processes else "all rows in one process,")
    print(f"2 x {args.arch}, batch {args.batch_size}, 3x32x32, CPU, {meta['threads']} threads, "
          f"retain_memory {args.retain_memory}, commit {meta['commit']}; {how} median images/s "
          f"over {args.steps} steps\n")
    print_rates(rates, measured["page_faults_per_step"], measured["first_step_s"])
    if conv is not None:
        print_ceiling(rates, conv, args.batch_size, measured["gflop_per_step"])
    suffix = "" if set(rows) == set(ROWS) else "_" + "_".join(r.replace(" ", "").replace(",", "")
                                                              for r in rows)
    suffix += "" if retain else "_retain-memory-off"
    suffix += "_fresh-processes" if args.fresh_processes else ""
    out = args.out or RESULTS / f"train_step_{args.arch}_b{args.batch_size}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"\nwrote {out}")


def measure_in_fresh_processes(args: argparse.Namespace, rows: tuple[str, ...]) -> dict:
    """Each row alone in a new interpreter (``--rows ROW --emit-json``), round after round."""
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for _ in range(args.fresh_processes):
        for row in rows:
            retain = "off" if row.startswith("naive") else args.retain_memory
            cmd = [sys.executable, __file__, "--arch", args.arch, "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--rows", row, "--retain-memory", retain, "--emit-json"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[row].append(json.loads(out.strip().splitlines()[-1]))
    return {key: {row: statistics.median(r[key][row] for r in runs[row]) for row in rows}
            for key in ("images_per_s_median", "page_faults_per_step", "first_step_s")}


def print_rates(rates: dict, faults: dict, first: dict) -> None:
    base = rates.get("naive")
    print("| loop | images/s | vs naive | page faults / step | first step s |\n"
          "|---|---:|---:|---:|---:|")
    for name, rate in rates.items():
        vs = f"{rate / base:.2f}x" if base else "-"
        print(f"| {name} | {rate:.1f} | {vs} | {faults[name]:.0f} | {first[name]:.1f} |")


def print_ceiling(rates: dict, conv: dict, batch_size: int, gflop: float) -> None:
    # if everything but the convolutions took no time, a loop would run at batch / conv time
    naive_ms = 1e3 * batch_size / rates["naive"]
    print(f"\nfp32 convolution time per step (torch.profiler, 3 steps; {gflop:.1f} GFLOP a step "
          "by torch.utils.flop_counter): the loop's ceiling\n")
    print("| loop | step ms | convolution ms | convolution GFLOP/s | share | rest ms | "
          "ceiling vs naive |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, conv_ms in conv.items():
        step_ms = 1e3 * batch_size / rates[name]
        print(f"| {name} | {step_ms:.1f} | {conv_ms:.1f} | {gflop / conv_ms * 1e3:.0f} | "
              f"{conv_ms / step_ms:.0%} | {step_ms - conv_ms:.1f} | {naive_ms / conv_ms:.2f}x |")


def test_train_step_ours(benchmark) -> None:
    run = make_run("tiny", 64, compile_peers=False)
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    benchmark(run.train_step, x, y)


if __name__ == "__main__":
    main()
