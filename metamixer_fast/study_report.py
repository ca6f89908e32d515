"""The study's report: per variant, the mean and spread over seeds of the final top-1 of its
finished runs, as ``results.md``, ``results.csv`` and two plots in the study's directory.

Which runs count as finished is the study's decision (``study.outcomes``); this module only
summarises what it is given.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plot import epoch_axis

# What the report writes into [study] out, beside the variants' directories.
REPORT_FILES = ("results.md", "results.csv", "final_accuracy.png", "accuracy_curves.png")


@dataclass
class Outcome:
    """One variant's runs: the finished ones ({"seed", "history"}) and the seeds left out."""
    finished: list[dict[str, Any]] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)  # interrupted, stopped early or not started


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation, rounded for the table; no std from one value (a
    spread of 0.00 would read as a measured one)."""
    std = round(statistics.stdev(values), 2) if len(values) > 1 else None
    return round(statistics.fmean(values), 2), std


def summarise(results: dict[str, Outcome]) -> list[dict[str, Any]]:
    """One row per variant: mean/std over its finished runs of the final peer-mean and ensemble
    top-1 (empty if none finished; the std empty too with one), and the seeds left out."""
    rows = []
    for name, o in results.items():
        row: dict[str, Any] = {
            "variant": name, "seeds": len(o.finished),
            "epochs": "/".join(map(str, sorted({r["history"][-1]["epoch"] for r in o.finished}))),
            "peer_top1_mean": None, "peer_top1_std": None, "ensemble_top1_mean": None,
            "ensemble_top1_std": None, "failed_seeds": " ".join(map(str, o.failed)),
            "unfinished_seeds": " ".join(map(str, o.unfinished)), "data": _data_used(o.finished)}
        if o.finished:
            peer = [statistics.fmean(r["history"][-1]["top1"]) for r in o.finished]
            ens = [r["history"][-1]["ensemble_top1"] for r in o.finished]
            (pm, ps), (em, es) = _mean_std(peer), _mean_std(ens)
            row.update(peer_top1_mean=pm, peer_top1_std=ps, ensemble_top1_mean=em, ensemble_top1_std=es)
        rows.append(row)
    return rows


def _data_used(finished: list[dict[str, Any]]) -> str:
    """'' when the finished runs trained and tested on all of the data; otherwise what they used
    (limit_train_batches / limit_eval_batches), so that a top-1 on a few test batches does not
    pass for one on the whole test set."""
    described = set()
    for run in finished:
        limits = run.get("limits", {})
        train, test = limits.get("limit_train_batches", 0), limits.get("limit_eval_batches", 0)
        parts = [f"{train} train batches per epoch" if train else "",
                 f"{test} test batches of {limits.get('eval_batch_size')} images" if test else ""]
        described.add(", ".join(p for p in parts if p))
    return " / ".join(sorted(d for d in described if d))


def left_out(rows: list[dict[str, Any]]) -> str:
    """'N failed, M unfinished' over all variants ('' if every run finished)."""
    failed = sum(len(r["failed_seeds"].split()) for r in rows)
    unfinished = sum(len(r["unfinished_seeds"].split()) for r in rows)
    parts = [f"{failed} failed" if failed else "", f"{unfinished} unfinished" if unfinished else ""]
    return ", ".join(p for p in parts if p)


def write_report(out: Path, results: dict[str, Outcome]) -> list[Path]:
    """Write the tables, and the plots if a run finished, into ``out``; returns the paths written.

    Every report file is written again or removed, even when no run has finished: a report of
    an earlier grid left in OUT would pass for this one's. Only where OUT does not exist and no
    run finished is nothing written (there is nothing to report, and nothing stale)."""
    rows = summarise(results)
    done = [r for r in rows if r["seeds"]]
    if not done and not out.is_dir():
        return []
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = (out / name for name in REPORT_FILES[:2])
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)  # None is an empty cell: no finished run, or no std of one seed
    md_path.write_text(_markdown(rows))
    if done:
        return [md_path, csv_path, *_plots(out, done, results)]
    for name in REPORT_FILES[2:]:  # nothing to plot: an earlier grid's plots must go
        (out / name).unlink(missing_ok=True)
    return [md_path, csv_path]


def _markdown(rows: list[dict[str, Any]]) -> str:
    def cell(mean: float | None, std: float | None) -> str:
        if mean is None:
            return "—"
        return f"{mean:.2f} (1 seed)" if std is None else f"{mean:.2f} ± {std:.2f}"

    def seeds_left(r: dict[str, Any]) -> str:
        parts = [f"{what}: {r[f'{what}_seeds']}" for what in ("failed", "unfinished") if r[f"{what}_seeds"]]
        return "; ".join(parts) or "—"

    lines = ["| variant | seeds | epochs | peer top-1 (mean ± std) | ensemble top-1 (mean ± std) "
             "| left out (seeds) |", "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['variant']} | {r['seeds']} | {r['epochs'] or '—'} | "
              f"{cell(r['peer_top1_mean'], r['peer_top1_std'])} | "
              f"{cell(r['ensemble_top1_mean'], r['ensemble_top1_std'])} | {seeds_left(r)} |" for r in rows]
    subsets = [f"{r['variant']}: {r['data']}" for r in rows if r["data"]]
    if subsets:
        lines += ["", "Not the whole data set (runs limited by limit_train_batches or "
                      "limit_eval_batches): " + "; ".join(subsets) + "."]
    if not any(r["seeds"] for r in rows):
        lines += ["", f"No run has finished yet, so there are no means and no plots; left out: "
                      f"{left_out(rows)} run(s)."]
    elif left_out(rows):
        lines += ["", f"Means over finished runs only; left out: {left_out(rows)} run(s)."]
    return "\n".join(lines) + "\n"


def _plots(out: Path, rows: list[dict[str, Any]], results: dict[str, Outcome]) -> list[Path]:
    """Bars and curves of the variants with finished runs (``rows``), over those runs only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    x = range(len(rows))
    def spread(key: str) -> list[float]:  # no error bar (not one of height 0) for one seed
        return [float("nan") if r[key] is None else r[key] for r in rows]

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    ax.bar([i - 0.2 for i in x], [r["peer_top1_mean"] for r in rows], 0.4,
           yerr=spread("peer_top1_std"), label="peer (mean of peers)", capsize=3)
    ax.bar([i + 0.2 for i in x], [r["ensemble_top1_mean"] for r in rows], 0.4,
           yerr=spread("ensemble_top1_std"), label="ensemble", capsize=3)
    low = min(min(r["peer_top1_mean"], r["ensemble_top1_mean"]) for r in rows)
    ax.set_ylim(max(0.0, low - 3), None)
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    one_seed = " (no bar: one seed)" if any(r["seeds"] == 1 for r in rows) else ""
    ax.set(ylabel="final test top-1 (%)", title=f"mean ± std over seeds{one_seed}")
    ax.legend()
    fig.tight_layout()
    bars = out / REPORT_FILES[2]
    fig.savefig(bars, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        runs = results[name].finished
        length = min(len(r["history"]) for r in runs)
        curve = [statistics.fmean(r["history"][e]["ensemble_top1"] for r in runs) for e in range(length)]
        ax.plot(range(1, length + 1), curve, marker=".", label=name)
    ax.set(xlabel="epoch", ylabel="ensemble test top-1 (%)", title="accuracy curves (mean over seeds)")
    epoch_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    curves = out / REPORT_FILES[3]
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [bars, curves]
