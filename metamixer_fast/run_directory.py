"""A training run's directory: what a fresh run may write into, and the metrics file.

A run directory holds config.json, metrics.jsonl (one JSON line per epoch) and checkpoint.pt
(see ``checkpoint``). A fresh run never overwrites another run's results.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import ConfigError, TrainConfig


class NotFreshError(ConfigError):
    """A fresh run's directory holds what the run may not overwrite. ``problem`` is the message
    without its advice (``fix``), for a caller that advises otherwise (a study sets each run's
    directory itself: the fix there is to move that directory aside, not to choose another --out)."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem


def check_fresh(run_dir: Path) -> None:
    """A fresh run writes config.json, metrics.jsonl and checkpoint.pt into ``run_dir``: refuse
    a directory where that would overwrite anything of value. The files of a run that ended
    before its first epoch (a config.json of ours, an empty metrics.jsonl) may be replaced."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotFreshError(f"config 'out' names {run_dir}, which is a file, not a directory",
                            "choose another --out")
    if (run_dir / checkpoint.NAME).exists():
        raise NotFreshError(f"run directory {run_dir} already holds a checkpoint",
                            f"continue it with --resume {run_dir} or choose another --out")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and (not metrics.is_file() or metrics.stat().st_size > 0):
        raise NotFreshError(f"run directory {run_dir} already holds a metrics.jsonl (but no "
                            f"checkpoint)", "choose another --out, or move the file aside")
    config_file = run_dir / "config.json"
    if config_file.exists() and not is_run_config(config_file):
        raise NotFreshError(f"run directory {run_dir} holds a config.json that is not a run's "
                            f"config", "choose another --out, or move the file aside")


def is_run_config(path: Path) -> bool:
    """Whether ``path`` holds a config.json that a run wrote (a mapping of TrainConfig's fields)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return isinstance(saved, dict) and "method" in saved and set(saved) <= fields


def prepare(run_dir: Path, config: dict[str, Any]) -> None:
    """Start a fresh run's directory: its config.json and an empty metrics.jsonl."""
    check_fresh(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (run_dir / "metrics.jsonl").write_text("")


def rewrite_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """On resume, metrics.jsonl becomes exactly the checkpoint's history (a line written after
    the last checkpoint belongs to an epoch that will run again)."""
    tmp = run_dir / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, run_dir / "metrics.jsonl")
