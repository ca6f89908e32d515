"""What a training config costs on this machine: step time, FLOPs, and the whole run projected.

    python bench/bench_protocol_cost.py configs/cifar100-resnet32-wrn16_2.toml [--steps 10]

Builds the config's run exactly (peers, method, mixing, AMP, channels_last, optimizer) but with
the synthetic dataset in place of the real files (3x32x32 images like CIFAR; 10 classes, so each
peer's linear head is smaller than CIFAR-100's by (its features) x 90 multiply-adds per image in
the forward pass: 64 x 90 for a ResNet-32, 128 x 90 for a WRN-16-2, about 0.01% of the counted
FLOPs for that pair; the FLOP count is of the 10-class heads and does not report the difference),
times ``--steps`` training steps after warm-up (data loading and
augmentation included), counts the FLOPs of one training step and of one evaluation batch with
``torch.utils.flop_counter``, and projects one epoch (``--train-size`` and ``--test-size``
images) and the whole run (the config's epochs). Writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _meta import commit, cpu_name  # bench/ is on sys.path (script or pytest)
from torch.utils.flop_counter import FlopCounterMode

from metamixer_fast.config import from_mapping, load_toml
from metamixer_fast.train import Run

RESULTS = Path(__file__).resolve().parent / "results"


def build_run(config: Path, batches: int) -> Run:
    values = load_toml(config)
    values.update(dataset="synthetic", data_dir="", synthetic_size=values.get("batch_size", 128) * batches,
                  progress=False, out="/tmp/unused")
    return Run(from_mapping(values).validate())


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(config: Path, steps: int, warmup: int, train_size: int, test_size: int) -> dict:
    run = build_run(config, steps + warmup)
    cfg = run.cfg
    batches = iter(run.train_batches)
    seconds = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        x, y = next(batches)
        run.train_step(x, y)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds)
    x, y = next(iter(run.train_batches))
    train_flops = flops_of(lambda: run.train_step(x, y)) / x.shape[0]
    xt, _ = next(iter(run.test_batches))
    with torch.no_grad():
        eval_flops = flops_of(lambda: run.group(xt)) / xt.shape[0]
    epoch_s = train_size / cfg.batch_size * step_s
    return {"config": str(config), "arch": cfg.peer_archs, "method": cfg.method, "amp": cfg.amp,
            "batch_size": cfg.batch_size, "epochs": cfg.epochs, "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "torch": torch.__version__, "commit": commit(),
            "step_seconds_median": step_s, "images_per_s": cfg.batch_size / step_s,
            "train_flops_per_image": train_flops, "eval_flops_per_image": eval_flops,
            "epoch_train_hours": epoch_s / 3600,
            "run_pflop": cfg.epochs * (train_size * train_flops + test_size * eval_flops) / 1e15,
            "run_train_hours": cfg.epochs * epoch_s / 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=50000, help="training images per epoch")
    parser.add_argument("--test-size", type=int, default=10000, help="test images per epoch")
    args = parser.parse_args()
    r = measure(args.config, args.steps, args.warmup, args.train_size, args.test_size)
    print(f"{r['config']}: {' + '.join(r['arch'])}, {r['method']}, amp {r['amp']}, batch "
          f"{r['batch_size']}, {r['epochs']} epochs; {r['cpu']}, {r['threads']} threads, commit "
          f"{r['commit']}\n")
    print("| quantity | value |\n|---|---:|")
    print(f"| training step (median of {args.steps}) | {r['step_seconds_median']:.3f} s |")
    print(f"| images/s | {r['images_per_s']:.0f} |")
    print(f"| FLOPs per training image (fwd + bwd, all peers) | {r['train_flops_per_image'] / 1e9:.3f} G |")
    print(f"| FLOPs per test image (all peers) | {r['eval_flops_per_image'] / 1e9:.3f} G |")
    print(f"| one epoch of training here | {r['epoch_train_hours'] * 60:.1f} min |")
    print(f"| the whole run here (training only) | {r['run_train_hours']:.1f} h |")
    print(f"| the whole run, FLOPs (training + evaluation) | {r['run_pflop']:.2f} PFLOP |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"protocol_cost_{args.config.stem}.json"
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
