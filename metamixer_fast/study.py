"""``metamixer-fast study CONFIG``: a grid of training variants x seeds, resumable, summarised.

The study file is TOML::

    [study]
    out = "runs/study-fashion-mnist"
    seeds = [0, 1, 2]

    [base]                       # TrainConfig options shared by every run
    dataset = "fashion-mnist"
    epochs = 15

    [[variant]]
    name = "dml"
    method = "dml"

    [[variant]]
    name = "metamixer-random"
    method = "metamixer"
    local_pairing = "random"
    global_pairing = "random"

Every run lives in ``OUT/VARIANT/seedS``. A finished run (all epochs in its checkpoint) is
skipped on a rerun; an interrupted one is resumed from its last checkpoint. At the end (and with
``--report-only`` at any time) the study writes ``results.md`` and ``results.csv`` (final per-peer
mean and ensemble top-1: mean and standard deviation over seeds), ``final_accuracy.png`` and
``accuracy_curves.png`` into OUT.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import ConfigError, from_mapping
from .train import fit, resume_config


@dataclass
class Study:
    out: Path
    seeds: list[int]
    base: dict[str, Any]
    variants: list[tuple[str, dict[str, Any]]]

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.out / variant / f"seed{seed}"


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"study file {path} is not valid TOML: {exc}") from None
    head = data.get("study", {})
    seeds = head.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: [study] seeds must be a non-empty list of integers, got {seeds!r}")
    variants = []
    for i, entry in enumerate(data.get("variant", [])):
        entry = dict(entry)
        name = entry.pop("name", None)
        if not name or "/" in name:
            raise ConfigError(f"{path}: variant {i} needs a 'name' without '/'")
        variants.append((name, entry))
    if not variants:
        raise ConfigError(f"{path}: no [[variant]] tables; add at least one")
    if len({name for name, _ in variants}) != len(variants):
        raise ConfigError(f"{path}: variant names must be unique")
    study = Study(Path(head.get("out", "runs/study")), list(seeds), dict(data.get("base", {})), variants)
    for name, overrides in variants:  # fail now, not after hours of training
        for seed in study.seeds:
            study_config(study, name, overrides, seed)
    return study


def study_config(study: Study, name: str, overrides: dict[str, Any], seed: int):
    values = {**study.base, **overrides, "seed": seed, "out": str(study.run_dir(name, seed))}
    try:
        return from_mapping(values).validate()
    except ConfigError as exc:
        raise ConfigError(f"study variant '{name}': {exc}") from None


def run_study(study: Study) -> None:
    total = len(study.variants) * len(study.seeds)
    done = 0
    for name, overrides in study.variants:
        for seed in study.seeds:
            done += 1
            cfg = study_config(study, name, overrides, seed)
            run_dir = study.run_dir(name, seed)
            label = f"[{done}/{total}] {name} seed {seed}"
            if (run_dir / checkpoint.NAME).exists():
                state = checkpoint.load(run_dir)
                if state["epoch"] >= cfg.epochs:
                    print(f"{label}: finished earlier, skipped", flush=True)
                    continue
                print(f"{label}: resuming at epoch {state['epoch'] + 1}", flush=True)
                fit(resume_config(state, {"progress": cfg.progress}), resume=state)
            else:
                print(f"{label}: training", flush=True)
                fit(cfg)


def _final_records(study: Study) -> dict[str, list[dict[str, Any]]]:
    finals: dict[str, list[dict[str, Any]]] = {}
    for name, _ in study.variants:
        for seed in study.seeds:
            path = study.run_dir(name, seed) / "metrics.jsonl"
            if path.is_file():
                lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                if lines:
                    finals.setdefault(name, []).append({"seed": seed, "history": lines})
    return finals


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(study: Study) -> list[dict[str, Any]]:
    """One row per variant: mean/std over seeds of the final peer-mean and ensemble top-1."""
    rows = []
    for name, runs in _final_records(study).items():
        peer = [statistics.fmean(r["history"][-1]["top1"]) for r in runs]
        ens = [r["history"][-1]["ensemble_top1"] for r in runs]
        (pm, ps), (em, es) = _mean_std(peer), _mean_std(ens)
        epochs = sorted({r["history"][-1]["epoch"] for r in runs})
        rows.append({"variant": name, "seeds": len(runs), "epochs": "/".join(map(str, epochs)),
                     "peer_top1_mean": round(pm, 2), "peer_top1_std": round(ps, 2),
                     "ensemble_top1_mean": round(em, 2), "ensemble_top1_std": round(es, 2)})
    return rows


def write_report(study: Study) -> list[Path]:
    rows = summarise(study)
    if not rows:
        raise ConfigError(f"no finished epochs under {study.out} yet; run the study first")
    study.out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = study.out / "results.csv", study.out / "results.md"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| variant | seeds | epochs | peer top-1 (mean ± std) | ensemble top-1 (mean ± std) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['seeds']} | {r['epochs']} | {r['peer_top1_mean']:.2f} ± "
              f"{r['peer_top1_std']:.2f} | {r['ensemble_top1_mean']:.2f} ± {r['ensemble_top1_std']:.2f} |"
              for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return [md_path, csv_path, *_plots(study, rows)]


def _plots(study: Study, rows: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    ax.bar([i - 0.2 for i in x], [r["peer_top1_mean"] for r in rows], 0.4,
           yerr=[r["peer_top1_std"] for r in rows], label="peer (mean of peers)", capsize=3)
    ax.bar([i + 0.2 for i in x], [r["ensemble_top1_mean"] for r in rows], 0.4,
           yerr=[r["ensemble_top1_std"] for r in rows], label="ensemble", capsize=3)
    low = min(min(r["peer_top1_mean"], r["ensemble_top1_mean"]) for r in rows)
    ax.set_ylim(max(0.0, low - 3), None)
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set(ylabel="final test top-1 (%)", title="mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    bars = study.out / "final_accuracy.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in _final_records(study).items():
        length = min(len(r["history"]) for r in runs)
        curve = [statistics.fmean(r["history"][e]["ensemble_top1"] for r in runs) for e in range(length)]
        ax.plot(range(1, length + 1), curve, label=name)
    ax.set(xlabel="epoch", ylabel="ensemble test top-1 (%)", title="accuracy curves (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    curves = study.out / "accuracy_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [bars, curves]


def main(argv: list[str] | None = None, prog: str = "metamixer-fast study") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("config", help="study TOML file ([study], [base], [[variant]] tables)")
    parser.add_argument("--report-only", action="store_true",
                        help="only write the tables and plots from the runs finished so far")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.config)
        if not args.report_only:
            run_study(study)
        for path in write_report(study):
            print(path)
    except (ConfigError, checkpoint.CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((study.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m metamixer_fast.study"))
