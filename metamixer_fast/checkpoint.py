"""Crash-safe checkpoints: written atomically, read back with validation.

``save`` writes to a temporary file in the same directory, fsyncs it, renames it over the old
checkpoint and fsyncs the directory, so at every instant ``checkpoint.pt`` is either the previous
complete checkpoint or the new complete one. ``load`` checks the CRC of every member of the archive,
uses ``torch.load(weights_only=True)`` (tensors and plain containers only, no arbitrary code)
and checks the format before anything is restored; it never writes.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "metamixer_fast.checkpoint/1"
NAME = "checkpoint.pt"
REQUIRED = ("format", "config", "epoch", "step", "peers", "optimizer", "scheduler", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not belong to this run.

    ``problem`` is the message without its advice (``fix``), for a caller that advises otherwise
    (a study moves a run's directory aside; it has no --out to change)."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}; {fix}" if fix else problem)
        self.problem = problem


class DataMismatchError(CheckpointError):
    """The data a run is resumed on is not the data it was trained on (its fix names where the
    data directory is set: --data-dir for ``train``, 'data_dir' in a study file)."""


def save(state: dict[str, Any], run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / NAME
    tmp = run_dir / f".{NAME}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    for stale in run_dir.glob(f".{NAME}.tmp-*"):  # left by a writer that was killed mid-write
        stale.unlink(missing_ok=True)
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def load(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}", fix="--resume needs the run directory of "
                              "an earlier run that finished at least one epoch")
    # torch.load checks no CRC: a flipped bit in a tensor would load as a silently wrong weight.
    # So every member's CRC is checked first; and any failure of the load itself (the
    # weights-only unpickler meets damage with KeyError and friends too) is the same clear error.
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
        if bad_member is not None:
            raise zipfile.BadZipFile(f"member {bad_member} fails its CRC check")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever the damage, the answer is the same
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated and was left untouched "
                              f"({type(exc).__name__}: {exc})", fix="resume from a copy of it if you "
                              "have one, or start the run afresh with another --out") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a metamixer_fast checkpoint (format {found!r}, "
                              f"expected {FORMAT!r}); it was left untouched")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it was left untouched")
    wrong = _malformed(state)
    if wrong:
        raise CheckpointError(f"checkpoint {path} is malformed ({'; '.join(wrong)}); it was left "
                              f"untouched and nothing was resumed")
    return state


def _malformed(state: dict[str, Any]) -> list[str]:
    """What in the bookkeeping of a CRC-clean checkpoint has the wrong type or value: a resume
    rewrites metrics.jsonl from 'history' and trains on from 'epoch', so both are checked before
    anything is written."""
    wrong = []
    if not isinstance(state["config"], dict):
        wrong.append(f"'config' is a {type(state['config']).__name__}, not a mapping")
    for key in ("epoch", "step"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            wrong.append(f"'{key}' is {value!r}, not an integer >= 0")
    if "history" not in state:
        return wrong
    history = state["history"]
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        wrong.append("'history' is not a list of per-epoch records")
    elif isinstance(state["epoch"], int) and len(history) != state["epoch"]:
        wrong.append(f"'history' holds {len(history)} epochs but 'epoch' is {state['epoch']}")
    return wrong
