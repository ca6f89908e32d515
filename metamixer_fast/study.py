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

Unknown tables or ``[study]`` keys, repeated seeds, and ``seed`` / ``out`` in ``[base]`` or a
variant (the study sets them) are errors. Every run lives in ``OUT/VARIANT/seedS``. A finished run
(all epochs in its checkpoint) is skipped on a rerun; an interrupted one is resumed from its last
checkpoint, in that directory. The study file must still describe the runs already there: an
option that changes the results (lr, epochs, ...) cannot differ from a run's checkpoint; the study
stops before training anything and names the run (move it aside to train it afresh).

A run that fails (a non-finite loss, missing or bad data, settings that cannot train: a batch
larger than the data, a device this machine lacks, a run directory it may not overwrite) is
reported (``error: ...`` naming the
variant and seed) and marked with ``study_failed.txt`` in its directory; the study carries on with
the other runs and exits with status 2 at the end. A rerun tries a failed run again.

At the end (and with ``--report-only`` at any time) the study writes ``results.md`` and
``results.csv`` (final per-peer mean and ensemble top-1: mean and standard deviation over the
seeds whose runs finished; failed and unfinished runs are left out of the means and listed),
``final_accuracy.png`` and ``accuracy_curves.png`` into OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint
from .cli import plain_text
from .config import ConfigError, TrainConfig, from_mapping
from .data import DatasetError
from .study_report import REPORT_FILES, Outcome, write_report
from .train import NonFiniteLossError, fit, resume_config

TABLES = ("study", "base", "variant")
STUDY_KEYS = ("out", "seeds")
SET_BY_STUDY = ("seed", "out")  # per run, from [study]; a value in [base] or a variant would be ignored
FAILED = "study_failed.txt"  # in a run's directory: why its last attempt failed


@dataclass
class Study:
    out: Path
    seeds: list[int]
    base: dict[str, Any]
    variants: list[tuple[str, dict[str, Any]]]

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.out / variant / f"seed{seed}"

    def runs(self) -> Iterator[tuple[str, dict[str, Any], int]]:
        for name, overrides in self.variants:
            for seed in self.seeds:
                yield name, overrides, seed


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"study file {path} is not valid TOML: {exc}") from None
    _check_keys(path, "top-level table", data, TABLES)
    head, base = _table(path, data, "study"), _table(path, data, "base")
    _check_keys(path, "[study] key", head, STUDY_KEYS)
    _check_not_set(path, "[base]", base)
    out = head.get("out", "runs/study")
    if not isinstance(out, str) or not out:
        raise ConfigError(f"{path}: [study] out must be a directory name, got {out!r}")
    study = Study(Path(out), _seeds(path, head), base, _variants(path, data))
    for name, overrides, seed in study.runs():  # fail now, not after hours of training
        study_config(study, name, overrides, seed)
    return study


def _check_keys(path: Path, what: str, table: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = [key for key in table if key not in known]
    if unknown:
        raise ConfigError(f"{path}: unknown {what} {', '.join(map(repr, unknown))}; "
                          f"the valid ones are {', '.join(known)}")


def _check_not_set(path: Path, where: str, table: dict[str, Any]) -> None:
    for key in SET_BY_STUDY:
        if key in table:
            raise ConfigError(f"{path}: {where} sets '{key}', but the study sets it for every run; "
                              f"remove it (list the seeds in [study] seeds, the directory in [study] out)")


def _table(path: Path, data: dict[str, Any], name: str) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: '{name}' must be a [{name}] table, got {table!r}")
    return dict(table)


def _seeds(path: Path, head: dict[str, Any]) -> list[int]:
    seeds = head.get("seeds", [0])
    # bool is an int in Python, but 'seeds = [true]' is a mistake, not seed 1
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{path}: [study] seeds must be a non-empty list of integers, got {seeds!r}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:  # one directory per seed: a repeated seed would be one run counted twice
        raise ConfigError(f"{path}: [study] seeds lists {', '.join(map(str, repeated))} more than once; "
                          f"list each seed once")
    return list(seeds)


def _good_name(name: object) -> bool:
    """A variant name is a directory under [study] out, beside the report's files, and a cell
    of the results table."""
    return (isinstance(name, str) and name.strip() != "" and name.isprintable()
            and not name.startswith(".") and "/" not in name and "|" not in name
            and name not in REPORT_FILES and name != FAILED)


def _variants(path: Path, data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    entries = data.get("variant", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{path}: variants must be [[variant]] tables (double brackets)")
    variants = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        name = entry.pop("name", None)
        if not _good_name(name):
            raise ConfigError(f"{path}: variant {i} needs a 'name': a directory name of printable "
                              f"characters, without '/', '|' or a leading '.', and not one of the "
                              f"report's files ({', '.join(REPORT_FILES)}); got {name!r}")
        _check_not_set(path, f"variant '{name}'", entry)
        variants.append((name, entry))
    if not variants:
        raise ConfigError(f"{path}: no [[variant]] tables; add at least one")
    if len({name for name, _ in variants}) != len(variants):
        raise ConfigError(f"{path}: variant names must be unique")
    return variants


def study_config(study: Study, name: str, overrides: dict[str, Any], seed: int) -> TrainConfig:
    values = {**study.base, **overrides, "seed": seed, "out": str(study.run_dir(name, seed))}
    try:
        return from_mapping(values).validate()
    except ConfigError as exc:
        raise ConfigError(f"study variant '{name}': {exc}") from None


# ------------------------------------------------------------------------------ running

def existing_run(study: Study, name: str, seed: int,
                 cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any]] | None:
    """The run's checkpoint and the config that continues it, or None if it has no checkpoint.

    The study file must still describe the run: were an option that changes the results (lr,
    epochs, ...) allowed to differ, a rerun would continue (or skip) a run made with other
    settings, and the table would carry the new ones. ``resume_config`` decides what may change.
    """
    run_dir = study.run_dir(name, seed)
    if not (run_dir / checkpoint.NAME).exists():
        return None
    state = checkpoint.load(run_dir)
    # 'out' is not compared: the run is the one in run_dir (a copied study continues in its copy),
    # whichever directory its checkpoint was first written in
    wanted = {key: value for key, value in cfg.to_dict().items() if key != "out"}
    try:
        resumed = resume_config(state, wanted)
    except (checkpoint.CheckpointError, ConfigError) as exc:
        reason = str(exc).removeprefix("--resume: ")
        raise ConfigError(f"study variant '{name}' seed {seed}: {run_dir} holds a run made with other "
                          f"settings: {reason}; put the setting back in the study file, or move "
                          f"{run_dir} aside to train the run afresh") from None
    return dataclasses.replace(resumed, out=str(run_dir)), state


def check_existing_runs(study: Study) -> None:
    """Raise ConfigError if a run already on disk no longer matches the study file."""
    for name, overrides, seed in study.runs():
        existing_run(study, name, seed, study_config(study, name, overrides, seed))


def run_study(study: Study) -> list[str]:
    """Train every run not finished yet; returns the runs that failed ("VARIANT seed S")."""
    check_existing_runs(study)  # before any training: a mismatch found hours in would waste them
    total = len(study.variants) * len(study.seeds)
    failed = []
    for done, (name, overrides, seed) in enumerate(study.runs(), 1):
        if not _run_one(study, name, overrides, seed, f"[{done}/{total}] {name} seed {seed}"):
            failed.append(f"{name} seed {seed}")
    return failed


def _run_one(study: Study, name: str, overrides: dict[str, Any], seed: int, label: str) -> bool:
    """Train, continue or skip one run; False if it failed (reported on stderr and marked)."""
    cfg = study_config(study, name, overrides, seed)
    run_dir = study.run_dir(name, seed)
    existing = existing_run(study, name, seed, cfg)
    if existing is not None and existing[1]["epoch"] >= existing[0].epochs:
        print(f"{label}: finished earlier, skipped", flush=True)
        return True
    (run_dir / FAILED).unlink(missing_ok=True)  # an earlier failure; this attempt decides
    try:
        if existing is not None:
            print(f"{label}: resuming at epoch {existing[1]['epoch'] + 1}", flush=True)
            fit(existing[0], resume=existing[1])
        else:
            print(f"{label}: training", flush=True)
            fit(cfg)
    except (NonFiniteLossError, DatasetError, ConfigError, checkpoint.CheckpointError) as exc:
        # one variant's divergence, data or settings (a batch larger than its data, a device
        # this machine lacks, a run directory it may not overwrite) should not cost the other
        # variants their runs
        aside = f"move {run_dir} aside, then " if (run_dir / checkpoint.NAME).exists() else ""
        message = (f"study variant '{name}' seed {seed} failed: {exc}. A rerun tries it again; to "
                   f"retry with other settings, {aside}change them in the study file")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED).write_text(message + "\n")
        print(f"error: {message}. Carrying on with the other runs.", file=sys.stderr, flush=True)
        return False
    return True


# ------------------------------------------------------------------------------ the runs' states

def _history(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, up to a line cut short by a kill (that epoch runs again on resume)."""
    records = []
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in filter(str.strip, lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def outcomes(study: Study) -> dict[str, Outcome]:
    """Each variant's runs by state: only runs with all their epochs count as finished."""
    result = {name: Outcome() for name, _ in study.variants}
    for name, overrides, seed in study.runs():
        run_dir = study.run_dir(name, seed)
        history = _history(run_dir / "metrics.jsonl")
        if history and history[-1]["epoch"] >= study_config(study, name, overrides, seed).epochs:
            result[name].finished.append({"seed": seed, "history": history})
        elif (run_dir / FAILED).is_file():
            result[name].failed.append(seed)
        else:
            result[name].unfinished.append(seed)
    return result


def main(argv: list[str] | None = None, prog: str = "metamixer-fast study") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="study TOML file ([study], [base], [[variant]] tables)")
    parser.add_argument("--report-only", action="store_true",
                        help="only write the tables and plots from the runs finished so far "
                             "(failed and unfinished runs are listed, not averaged)")
    args = parser.parse_args(argv)
    failed: list[str] = []
    try:
        study = load_study(args.config)
        if args.report_only:
            check_existing_runs(study)  # a table must not carry settings its runs were not made with
        else:
            failed = run_study(study)
        paths = write_report(study.out, outcomes(study))
        if not paths and args.report_only:
            raise ConfigError(f"no run under {study.out} has finished yet, so there is nothing to report; "
                              f"run the study (without --report-only) to train them")
    except (ConfigError, checkpoint.CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    if paths:
        print((study.out / "results.md").read_text())
    else:  # e.g. every run stopped early as asked (stop_after_epochs): not an error
        print("no run has finished yet, so no report was written; rerun the study to go on", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; the reasons are above and in "
              f"{FAILED} in each run's directory, and the table leaves them out", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main(prog="python -m metamixer_fast.study"))
