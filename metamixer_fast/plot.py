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

from . import run_directory
from .cli import plain_text

KEYS = ("epoch", "top1", "ensemble_top1", "train_loss", "train_ce", "train_kd")
PER_PEER = ("top1", "train_ce", "train_kd")  # one number per peer


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epoch records of ``RUN_DIR/metrics.jsonl``; ValueError naming the file, the line and
    what is wrong with it (the plots would otherwise fail half way with a bare traceback)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the directory of a training run "
                                f"(its --out)")
    records: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a metrics file of a training run: it is not UTF-8 text "
                         f"({exc.reason} at byte {exc.start})") from None
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
        if not (isinstance(record, dict) and set(KEYS) <= set(record)):
            raise ValueError(f"{path}:{number} is not an epoch record of a training run")
        wrong = _malformed(record, len(records[0]["top1"]) if records else None)
        if wrong:
            raise ValueError(f"{path}:{number} is not an epoch record of a training run: {wrong}")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no epochs yet; plot after the first epoch has finished")
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _malformed(record: dict[str, Any], peers: int | None) -> str:
    """What in an epoch record the plots cannot draw ('' if nothing): every per-peer list must
    hold one number per peer, as many as the first record's 'top1' (``peers``; None for the
    first record itself)."""
    if not isinstance(record["epoch"], int) or isinstance(record["epoch"], bool):
        return f"'epoch' is {record['epoch']!r}, not an integer"
    for key in ("train_loss", "ensemble_top1"):
        if not _is_number(record[key]):
            return f"'{key}' is {record[key]!r}, not a number"
    top1 = record["top1"]
    if peers is None:
        if not (isinstance(top1, list) and top1):
            return f"'top1' is {top1!r}, not a list of one number per peer"
        peers = len(top1)
    for key in PER_PEER:
        value = record[key]
        if not (isinstance(value, list) and len(value) == peers and all(map(_is_number, value))):
            return (f"'{key}' is {value!r}, not a list of {peers} numbers (one per peer, as "
                    f"'top1' of the first epoch has)")
    return ""


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out_dir or run_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory for the PNGs")
    # a ConfigError (a ValueError) naming --out, not an OSError traceback from mkdir
    run_directory.create(out, setting="--out")
    epochs = [r["epoch"] for r in records]
    k = len(records[0]["top1"])

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(epochs, [r["train_loss"] for r in records], marker=".", label="total loss")
    for p in range(k):
        ax[0].plot(epochs, [r["train_ce"][p] for r in records], "--", marker=".", label=f"CE peer {p}")
    ax[0].set(xlabel="epoch", ylabel="loss", title="training loss")
    epoch_axis(ax[0])
    ax[0].legend()
    for p in range(k):
        ax[1].plot(epochs, [r["train_kd"][p] for r in records], marker=".", label=f"KD peer {p}")
    ax[1].set(xlabel="epoch", ylabel="KD", title="distillation term")
    epoch_axis(ax[1])
    ax[1].legend()
    fig.tight_layout()
    loss_png = out / "loss.png"
    _save(fig, loss_png)

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in range(k):
        ax.plot(epochs, [r["top1"][p] for r in records], marker="o", label=f"peer {p}")
    ax.plot(epochs, [r["ensemble_top1"] for r in records], marker="s", color="black", label="ensemble")
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="accuracy")
    epoch_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    acc_png = out / "accuracy.png"
    _save(fig, acc_png)
    return [loss_png, acc_png]


def epoch_axis(ax: Any) -> None:
    """Ticks at whole epochs only (matplotlib would mark 1.25, 1.5, ... on a short run)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path) -> None:
    """Write the PNG; ValueError naming it if it cannot be written (a read-only run directory)."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ValueError(f"{path} cannot be written: {run_directory.os_reason(exc)}; pass --out "
                         f"with a writable directory") from None
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None, prog: str = "metamixer-fast plot") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(__doc__), allow_abbrev=False,
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
