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
variant (the study sets them) are errors. Every run lives in ``OUT/VARIANT/seedS``, and the report
and a rerun judge it the same way: with a checkpoint, the checkpoint decides (a
run is finished when its history holds every epoch); without one (deleted to save space, say),
``metrics.jsonl`` does. A finished run is counted in the report and skipped on a rerun; an
unfinished one is left out of the means and resumed from its last checkpoint, in its directory.
The study file must still describe the runs already there: an option that changes the results
(lr, epochs, ...) cannot differ from a run's checkpoint or, without one, its ``config.json``; the
study, and the report, stop before anything is trained and name the run and the fix (move
``OUT/VARIANT/seedS`` aside to train it afresh).

A run that fails (a non-finite loss, missing or bad data, settings that cannot train: a batch
larger than the data, a device this machine lacks; a directory holding metrics but no checkpoint
to resume) is reported (``error: ...`` naming the variant and seed, and the fix) and marked with
``study_failed.txt`` in its directory; the study carries on with the other runs and exits with
status 2 at the end. A rerun tries a failed run again. Ctrl-C ends the study with status 130 and
one line instead of a traceback: every run keeps its last checkpoint, and the same command goes on.

OUT is created (or the study stops at once, naming ``[study] out``) and locked while the study
runs: a second study into the same OUT is refused at once. A run whose directory another process
is writing (a ``train --resume`` of it) is reported and left alone, not marked failed; a rerun
continues it. ``--report-only`` takes no lock: it may report on a study that is running.

At the end (and with ``--report-only`` at any time) the study writes ``results.md`` and
``results.csv`` (final per-peer mean and ensemble top-1: mean and standard deviation over the
seeds whose runs finished, the mean alone, marked "(1 seed)", where one finished; failed and
unfinished runs are left out of the means and listed),
``final_accuracy.png`` and ``accuracy_curves.png`` into OUT. It does so before any run has
finished too, once OUT exists: the tables then list the runs left out and the plots are removed,
so that an earlier grid's report in the same OUT cannot pass for this one's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint, run_directory
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
    if path.is_dir():  # not "does not exist": it does, as the wrong thing
        raise ConfigError(f"study file {path} is a directory; pass the study's TOML file")
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


# ------------------------------------------------------------------------------ runs on disk

@dataclass
class RunOnDisk:
    """A run's directory as the study judges it: the one judgement that the report and a rerun
    both use, so that a run the table counts as finished is one a rerun skips, and the reverse."""
    history: list[dict[str, Any]] = field(default_factory=list)  # its epochs' records
    finished: bool = False  # every epoch the study asks for is recorded
    resume: tuple[TrainConfig, dict[str, Any]] | None = None  # (config, checkpoint); None without one


def run_on_disk(study: Study, name: str, overrides: dict[str, Any], seed: int) -> RunOnDisk:
    """The run in OUT/VARIANT/seedS; ConfigError if the study cannot use it as it is.

    With a checkpoint, the checkpoint decides: its history is the run's epochs (a resume rewrites
    metrics.jsonl from it; a metrics line past it is an epoch that runs again). Without one
    (deleted to save space, say), metrics.jsonl's complete epochs are the run's, and config.json
    stands in for the checkpoint's config. Either way the saved settings must be the study file's:
    were an option that changes the results (lr, epochs, ...) allowed to differ, a rerun would
    continue or skip a run made with other settings, and the table would carry the new ones.
    """
    cfg = study_config(study, name, overrides, seed)
    run_dir = study.run_dir(name, seed)
    label = f"study variant '{name}' seed {seed}"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{label}: {run_dir} is a file, not a run directory; move {run_dir} aside "
                          f"so that the study can train the run there")
    if (run_dir / checkpoint.NAME).exists():
        try:
            state = checkpoint.load(run_dir)
        except checkpoint.CheckpointError as exc:
            raise ConfigError(f"{label}: {exc.problem}; put a good copy of it back, or move {run_dir} "
                              f"aside to train the run afresh") from None
        resumed = _same_settings(label, run_dir, state["config"], cfg, "its checkpoint")
        history = list(state.get("history", []))
        return RunOnDisk(history, _complete(history, cfg),
                         (dataclasses.replace(resumed, out=str(run_dir)), state))
    history = _history(run_dir / "metrics.jsonl")
    if history:
        _same_settings(label, run_dir, _saved_config(label, run_dir), cfg, "its config.json")
    return RunOnDisk(history, _complete(history, cfg))


def _complete(history: list[dict[str, Any]], cfg: TrainConfig) -> bool:
    return bool(history) and history[-1]["epoch"] >= cfg.epochs


def _same_settings(label: str, run_dir: Path, saved: dict[str, Any], cfg: TrainConfig,
                   saved_in: str) -> TrainConfig:
    """The config that continues the run saved with ``saved``; ConfigError if the study's
    ``cfg`` changes an option that ``resume_config`` keeps."""
    # 'out' is not compared: the run is the one in run_dir (a copied study continues in its copy),
    # whichever directory it was first written in
    wanted = {key: value for key, value in cfg.to_dict().items() if key != "out"}
    try:
        return resume_config({"config": saved}, wanted, saved_in=saved_in, wanted_by="the study file")
    except (checkpoint.CheckpointError, ConfigError) as exc:
        # the problem alone: train's advice (keep the configuration) is not the study's
        reason = exc.problem if isinstance(exc, checkpoint.CheckpointError) else str(exc)
        raise ConfigError(f"{label}: {run_dir} holds a run made with other settings: {reason}; put "
                          f"the setting back in the study file, or move {run_dir} aside to train the "
                          f"run afresh") from None


def _saved_config(label: str, run_dir: Path) -> dict[str, Any]:
    """config.json of a run without a checkpoint: without it the run's settings are unknown."""
    path = run_dir / "config.json"
    if not run_directory.is_run_config(path):
        raise ConfigError(f"{label}: {run_dir} holds a metrics.jsonl but neither a checkpoint nor a "
                          f"run's config.json, so the settings it was trained with cannot be checked "
                          f"against the study file; move {run_dir} aside to train the run afresh")
    return json.loads(path.read_text())


def _history(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's epoch records, up to a line cut short by a kill (that epoch runs again on
    resume) or anything else that is not an epoch's record (what follows it is not trusted)."""
    try:
        lines = path.read_text().splitlines() if path.is_file() else []
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in filter(str.strip, lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not (isinstance(record, dict) and {"epoch", "top1", "ensemble_top1"} <= set(record)
                and isinstance(record["epoch"], int)):
            break
        records.append(record)
    return records


def check_existing_runs(study: Study) -> None:
    """Raise ConfigError if a run already on disk cannot be used as the study file describes it."""
    for name, overrides, seed in study.runs():
        run_on_disk(study, name, overrides, seed)


def outcomes(study: Study) -> dict[str, Outcome]:
    """Each variant's runs by state, for the report (``run_on_disk`` decides which finished)."""
    result = {name: Outcome() for name, _ in study.variants}
    for name, overrides, seed in study.runs():
        disk = run_on_disk(study, name, overrides, seed)
        if disk.finished:
            cfg = study_config(study, name, overrides, seed)
            result[name].finished.append({"seed": seed, "history": disk.history, "limits": {
                "limit_train_batches": cfg.limit_train_batches,
                "limit_eval_batches": cfg.limit_eval_batches, "eval_batch_size": cfg.eval_batch_size}})
        elif (study.run_dir(name, seed) / FAILED).is_file():
            result[name].failed.append(seed)
        else:
            result[name].unfinished.append(seed)
    return result


# ------------------------------------------------------------------------------ running

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
    run_dir = study.run_dir(name, seed)
    where = f"study variant '{name}' seed {seed} failed"
    # The run's directory is locked before it is judged, as a train run locks its own: a
    # `train --resume` of it still running in another process must not have its epochs run twice.
    # (fit locks it again: the same process, so that is no conflict.)
    held = contextlib.ExitStack()
    try:
        held.enter_context(run_directory.hold(
            run_dir, fix="rerun the study when it has ended (it continues the run then)"))
    except run_directory.CannotCreateError as exc:  # a file in the way (OUT itself was created)
        problem = f"{run_dir} cannot be created: {exc.reason}; move what is in its way aside"
    except run_directory.InUseError as exc:
        problem = str(exc)
    else:
        with held:
            return _run_held(study, name, overrides, seed, label, where)
    # not marked failed: there is no directory to mark, or it is another process's
    print(f"error: {where}: {problem}. Carrying on with the other runs.", file=sys.stderr, flush=True)
    return False


def _run_held(study: Study, name: str, overrides: dict[str, Any], seed: int, label: str,
              where: str) -> bool:
    """``_run_one`` once the run's directory is locked."""
    run_dir = study.run_dir(name, seed)
    disk = run_on_disk(study, name, overrides, seed)
    if disk.finished:
        note = ""
        if disk.resume is not None and _history(run_dir / "metrics.jsonl") != disk.history:
            run_directory.rewrite_metrics(run_dir, disk.history)  # as a resume would
            note = " (metrics.jsonl written again from its checkpoint)"
        print(f"{label}: finished earlier, skipped{note}", flush=True)
        return True
    (run_dir / FAILED).unlink(missing_ok=True)  # an earlier failure; this attempt decides
    if disk.resume is None:
        try:  # checked here, not in fit: its advice (another --out) is no fix in a study
            run_directory.check_fresh(run_dir)
        except run_directory.NotFreshError as exc:
            return _failed(run_dir, f"{where}: {exc.problem}, which the study neither resumes nor "
                                    f"overwrites; move {run_dir} aside to train the run afresh")
    try:
        if disk.resume is not None:
            print(f"{label}: resuming at epoch {len(disk.history) + 1}", flush=True)
            fit(disk.resume[0], resume=disk.resume[1])
        else:
            print(f"{label}: training", flush=True)
            fit(study_config(study, name, overrides, seed))
    except checkpoint.DataMismatchError as exc:  # train's fix (--data-dir) is a setting here
        return _failed(run_dir, f"{where}: {exc.problem}; set data_dir in the study file to the "
                                f"directory of the original files, and a rerun continues it")
    except DatasetError as exc:  # missing or bad files: their fix names --data-dir too
        return _failed(run_dir, f"{where}: {study_data_advice(str(exc))}. A rerun tries it again")
    except (NonFiniteLossError, ConfigError, checkpoint.CheckpointError) as exc:
        # one variant's divergence, data or settings (a batch larger than its data, a device
        # this machine lacks) should not cost the other variants their runs
        aside = f"move {run_dir} aside, then " if (run_dir / checkpoint.NAME).exists() else ""
        return _failed(run_dir, f"{where}: {exc}. A rerun tries it again; to retry with other "
                                f"settings, {aside}change them in the study file")
    return True


def study_data_advice(message: str) -> str:
    """A data error's message with train's advice (``--data-dir DIR``) said the study's way: a
    study has no --data-dir option; its runs read the data from 'data_dir' in the study file."""
    message = message.replace("pass --data-dir DIR", "set data_dir in the study file ([base] or "
                                                     "the variant) to the directory holding them")
    return message.replace("--data-dir", "data_dir")


def _failed(run_dir: Path, message: str) -> bool:
    """Report a failed run on stderr and mark it failed in its directory; returns False."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).write_text(message + "\n")
    print(f"error: {message}. Carrying on with the other runs.", file=sys.stderr, flush=True)
    return False


def main(argv: list[str] | None = None, prog: str = "metamixer-fast study") -> int:
    # allow_abbrev=False: '--report' must not pass for '--report-only' (see train.build_parser)
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(__doc__), allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="study TOML file ([study], [base], [[variant]] tables)")
    parser.add_argument("--report-only", action="store_true",
                        help="only write the tables and plots from the runs finished so far "
                             "(failed and unfinished runs are listed, not averaged)")
    args = parser.parse_args(argv)
    failed: list[str] = []
    study: Study | None = None
    try:
        study = load_study(args.config)
        with contextlib.ExitStack() as held:
            if not args.report_only:
                # OUT is created and locked before anything is trained: one that cannot be
                # created is an error now, and a second study into it is refused at once (two
                # would train the same runs and write the report over each other). A report
                # alone may be written while a study runs (it reads checkpoints written atomically).
                held.enter_context(run_directory.hold(
                    study.out, setting=f"{args.config}: [study] out",
                    what=f"{args.config}: [study] out", holder="another study",
                    fix="wait for it to end, or set another [study] out"))
                failed = run_study(study)  # the report checks the runs on disk against the file too
            results = outcomes(study)
            try:
                paths = write_report(study.out, results)  # also when none finished: no stale report
            except OSError as exc:
                raise ConfigError(f"the report cannot be written into {study.out}: "
                                  f"{run_directory.os_reason(exc)}") from None
        finished = any(o.finished for o in results.values())
        if not finished and args.report_only:
            listed = f" ({paths[0]} lists the runs left out)" if paths else ""
            raise ConfigError(f"no run under {study.out} has finished yet, so there is nothing to "
                              f"report{listed}; run the study (without --report-only) to train them")
    except (ConfigError, checkpoint.CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: every run's checkpoint is written atomically after each epoch, so a traceback
        # would only hide what to do next: the same command goes on where the study stopped
        where = f" under {study.out}" if study is not None else ""
        print(f"interrupted; the finished runs, and the last checkpoint of an unfinished one (written "
              f"after every epoch), are kept{where}: rerun {prog} {args.config} to go on from there",
              file=sys.stderr, flush=True)
        return 130
    for path in paths:
        print(path)
    if finished:
        print(paths[0].read_text())
    else:  # e.g. every run stopped early as asked (stop_after_epochs): not an error
        print("no run has finished yet, so the report has no means; rerun the study to go on",
              file=sys.stderr)
    if failed:
        # a run another process was writing is reported but not marked (its directory is not ours)
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; the reasons are above (and "
              f"in {FAILED} in the directory of each run marked failed), and the table leaves them "
              f"out", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main(prog="python -m metamixer_fast.study"))
