"""Benchmark report: ``python -m bench.report loss [--threads 2] [--rounds N] [--retain-memory on|off]``.

Times every contender of bench/bench_mixed_kd_loss.py on each shape, one call of each per round
in a new random order every round, and prints a markdown table of medians after warm-up with
the ratios the targets are stated in. The same numbers, with shapes, threads, dtype, torch
version, CPU and commit, go to bench/results/mixed_kd_loss-<commit>[-retain-memory].json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

# Compile in this process: a pool of compile workers would still be busy (and steal the CPU from
# the timed code) after torch.compile returns.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch

from bench._meta import commit, cpu_name, interleaved_times

ROOT = Path(__file__).resolve().parent.parent




def warm_up(fns: dict, rounds: int) -> None:
    for _ in range(rounds):
        for fn in fns.values():
            fn()


def time_interleaved(fns: dict, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function; one call of each per round, in a new random
    order every round (``interleaved_times``)."""
    times = interleaved_times(fns, rounds, warmup)
    return {name: statistics.median(s) for name, s in times.items()}


def loss_report(threads: int, rounds: int | None, retain_memory: bool = False) -> dict:
    import metamixer_fast as mf
    from bench.bench_mixed_kd_loss import SHAPES, contenders
    from metamixer_fast.memory import retain_freed_memory

    # Process-wide, so every contender runs under the same allocator: glibc's defaults (what a
    # trainer that imports the loss has) or the training loop's retain_memory setting.
    retained = retain_freed_memory() if retain_memory else False
    torch.set_num_threads(threads)
    # Warm up every shape first (compilation, allocator growth), then time shape by shape.
    prepared = []
    for shape in SHAPES:
        fns = contenders(shape)
        warm_up(fns, 3 if shape.b >= 1024 else 20)
        prepared.append((shape, fns))
    rows = []
    for shape, fns in prepared:
        n = rounds or (30 if shape.b >= 1024 else 300)
        med = time_interleaved(fns, n, warmup=2)
        fused = med["fused"]
        rows.append({
            "shape": {"K": shape.k, "B": shape.b, "C": shape.c}, "mode": shape.mode,
            "temperature": shape.temperature, "dtype": str(shape.dtype).removeprefix("torch."),
            "rounds": n, "median_ms": {k: v * 1e3 for k, v in med.items()},
            "fused_over_softmax": fused / med["softmax_floor"],
            "speedup_vs_reference": med["reference"] / fused,
            "speedup_vs_compiled_reference": med["compiled_reference"] / fused,
            "speedup_vs_dml_pair_loop": med["dml_pair_loop"] / fused if "dml_pair_loop" in med else None,
            "speedup_vs_dml_loop_peer_softmax": (med["dml_loop_peer_softmax"] / fused
                                                 if "dml_loop_peer_softmax" in med else None),
        })
    return {"benchmark": "mixed_kd_loss forward+backward (CPU)", "commit": commit(),
            "threads": threads, "retain_memory": retained, "torch": torch.__version__,
            "cpu": cpu_name(),
            "backend": mf._backend.backend_for("mixed_kd_loss", torch.device("cpu")),
            "cpp_build": _build_info(), "rows": rows}


def _build_info() -> str | None:
    import metamixer_fast as mf

    return None if mf._backend.cpp_module() is None else torch.ops.metamixer_cpp.build_info()


def _ms(m: dict, name: str) -> str:
    return f"{m[name]:.2f}" if name in m else "-"


def _times(r: dict, key: str) -> str:
    return f"{r[key]:.2f}x" if r.get(key) else "-"


def loss_markdown(report: dict) -> str:
    # runs before the careful DML loop was a contender have no column for it
    careful = any("dml_loop_peer_softmax" in r["median_ms"] for r in report["rows"])
    extra_head = " DML loop, softmax once ms |" if careful else ""
    extra_vs = " vs DML loop, softmax once |" if careful else ""
    head = (f"| shape (fp32) | mode, T | fused ms | eager ref ms | compiled ref ms | DML loop ms |"
            f"{extra_head} softmax ms | fused / softmax | vs eager ref | vs compiled ref | "
            f"vs DML loop |{extra_vs}\n"
            + "|---" * (11 + 2 * careful) + "|\n")
    lines = []
    for r in report["rows"]:  # speedups to 2 decimals: a 4.97x must not print as a target's 5.0x
        m, s = r["median_ms"], r["shape"]
        loop = f" {_ms(m, 'dml_loop_peer_softmax')} |" if careful else ""
        vs_loop = f" {_times(r, 'speedup_vs_dml_loop_peer_softmax')} |" if careful else ""
        lines.append(f"| K={s['K']}, B={s['B']}, C={s['C']} | {r['mode']}, {r['temperature']:g} | "
                     f"{m['fused']:.3f} | {m['reference']:.3f} | {m['compiled_reference']:.3f} | "
                     f"{_ms(m, 'dml_pair_loop')} |{loop} {m['softmax_floor']:.3f} | "
                     f"{r['fused_over_softmax']:.2f}x | {r['speedup_vs_reference']:.2f}x | "
                     f"{r['speedup_vs_compiled_reference']:.2f}x | "
                     f"{_times(r, 'speedup_vs_dml_pair_loop')} |{vs_loop}")
    memory = "retain_memory on" if report.get("retain_memory") else "glibc malloc defaults"
    foot = (f"\nmedians of interleaved rounds after warm-up; {report['threads']} threads; {memory}; "
            f"backend {report['backend']}; torch {report['torch']}; {report['cpu']}; "
            f"commit {report['commit']}\n")
    return head + "\n".join(lines) + "\n" + foot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["loss"], help="which benchmark to report")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="print the table of a stored run instead of timing a new one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per shape")
    parser.add_argument("--retain-memory", choices=["on", "off"], default="off",
                        help="glibc keeps freed memory mapped, as the training loop's "
                             "retain_memory option does (default off: malloc's defaults)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: bench/results/mixed_kd_loss-<commit>"
                             "[-retain-memory].json, which a second run at the commit replaces)")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(loss_markdown(json.loads(args.render.read_text())))
        return
    report = loss_report(args.threads, args.rounds, args.retain_memory == "on")
    print(loss_markdown(report))
    suffix = "-retain-memory" if report["retain_memory"] else ""
    out = args.out or ROOT / "bench" / "results" / f"mixed_kd_loss-{report['commit']}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
