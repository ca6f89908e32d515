"""``metamixer-fast plot RUN_DIR``: PNG curves of a run's metrics.jsonl.

Writes ``loss.png`` (training loss, per-peer CE and KD) and ``accuracy.png`` (per-peer and
ensemble test top-1) into the run directory (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli import plain_text


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the directory of a training run "
                                f"(its --out)")
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the epoch being written when the run was stopped
                print(f"warning: {path}:{number} is cut short; plotting the {len(records)} "
                      f"complete epoch(s) before it", file=sys.stderr)
                break
            raise ValueError(f"{path}:{number} is not valid JSON ({exc})") from None
        if not (isinstance(record, dict) and {"epoch", "top1", "ensemble_top1", "train_loss",
                                              "train_ce", "train_kd"} <= set(record)):
            raise ValueError(f"{path}:{number} is not an epoch record of a training run")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no epochs yet; plot after the first epoch has finished")
    return records


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out_dir or run_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory for the PNGs")
    out.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in records]
    k = len(records[0]["top1"])

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(epochs, [r["train_loss"] for r in records], marker=".", label="total loss")
    for p in range(k):
        ax[0].plot(epochs, [r["train_ce"][p] for r in records], "--", marker=".", label=f"CE peer {p}")
    ax[0].set(xlabel="epoch", ylabel="loss", title="training loss")
    ax[0].legend()
    for p in range(k):
        ax[1].plot(epochs, [r["train_kd"][p] for r in records], marker=".", label=f"KD peer {p}")
    ax[1].set(xlabel="epoch", ylabel="KD", title="distillation term")
    ax[1].legend()
    fig.tight_layout()
    loss_png = out / "loss.png"
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in range(k):
        ax.plot(epochs, [r["top1"][p] for r in records], marker="o", label=f"peer {p}")
    ax.plot(epochs, [r["ensemble_top1"] for r in records], marker="s", color="black", label="ensemble")
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    acc_png = out / "accuracy.png"
    fig.savefig(acc_png, dpi=110)
    plt.close(fig)
    return [loss_png, acc_png]


def main(argv: list[str] | None = None, prog: str = "metamixer-fast plot") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training run's directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="where to write the PNGs (default: the run directory)")
    args = parser.parse_args(argv)
    try:
        for path in plot_run(args.run_dir, args.out):
            print(path)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m metamixer_fast.plot"))
