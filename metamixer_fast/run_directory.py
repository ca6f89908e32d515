"""A training run's directory: what a fresh run may write into, who writes into it, and the
metrics file.

A run directory holds config.json, metrics.jsonl (one JSON line per epoch) and checkpoint.pt
(see ``checkpoint``). A fresh run never overwrites another run's results, and while a run (or a
study) writes into a directory it holds an exclusive lock on it (``hold``): a second run into the
same directory is refused at once instead of interleaving its files with the first one's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
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
    create(run_dir)
    write_config(run_dir, config)
    (run_dir / "metrics.jsonl").write_text("")


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """config.json, replaced atomically. A resume writes it again: the run may have been moved
    (its 'out' is the directory it is resumed from) or resumed with other --data-dir, --progress,
    ..., and config.json must say what the checkpoint says."""
    _replace_file(run_dir / "config.json", json.dumps(config, indent=2) + "\n")


def rewrite_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """On resume, metrics.jsonl becomes exactly the checkpoint's history (a line written after
    the last checkpoint belongs to an epoch that will run again)."""
    _replace_file(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _replace_file(path: Path, text: str) -> None:
    """Write ``path`` through a hidden temporary file and a rename: a run stopped mid-write
    leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------ creating and locking

LOCK_NAME = ".lock"  # in the locked directory; a leading '.': no variant or report file is named so


class CannotCreateError(ConfigError):
    """A directory that a command must write into cannot be created or written (a file in its
    path, no permission, a read-only or special file system). ``reason``: why, alone."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class InUseError(ConfigError):
    """Another process holds the lock of a directory that this command would write into."""


def os_reason(exc: OSError) -> str:
    """What went wrong, for a message: the OS's words ('permission denied'), not the exception's
    repr with its errno and path."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _create_reason(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be created: a file where a directory must be is named (the OS says
    only 'not a directory' or 'file exists'); otherwise the OS's reason, and where it arose when
    that is a parent of ``path`` (mkdir creates the missing parents first)."""
    ancestor = path
    for ancestor in (path, *path.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():  # a file, or a link to nothing
                what = "a file, not a directory" if ancestor.is_file() else "not a directory"
                return f"{'it' if ancestor == path else ancestor} is {what}"
            break
    if exc.errno == errno.ENOENT:  # a parent that exists, on a file system of its own (/proc)
        return f"{os_reason(exc)} (the file system of {ancestor} does not allow it)"
    where = f" (creating {exc.filename})" if exc.filename and Path(exc.filename) != path else ""
    return os_reason(exc) + where


def create(path: Path, setting: str = "config 'out'") -> list[Path]:
    """Create the directory ``path`` and its missing parents; returns the directories created,
    outermost first. A directory that cannot be created raises CannotCreateError naming
    ``setting`` (where the path was given) before anything else is done, instead of an OSError
    traceback from the first write."""
    missing = []
    ancestor = path
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = _create_reason(path, exc)
        raise CannotCreateError(f"{setting} {path} cannot be created: {reason}; choose a writable "
                                f"directory", reason) from None
    return missing[::-1]


def is_writer() -> bool:
    """Whether this process writes the run directory: under torchrun only rank 0 does (the others
    read it, and locking it from every rank would refuse all ranks but one)."""
    return os.environ.get("RANK", "0") == "0"


# The directories this process holds the lock of, by real path, with how many holders: the study
# locks a run's directory and then calls fit, which locks it again (a second flock by the same
# process, on a second open file, would be refused as if another run held it).
_held: dict[str, int] = {}


@contextlib.contextmanager
def hold(path: Path, *, create_it: bool = True, setting: str = "config 'out'",
         what: str = "run directory", holder: str = "another run",
         fix: str = "wait for it to end, or choose another --out") -> Iterator[None]:
    """Hold an exclusive lock on the directory ``path`` while the body runs (a run's whole life):
    a second process that asks for it is refused at once with InUseError ("{what} {path} is in
    use by {holder} (pid N); {fix}"). ``create_it``: create the directory first (CannotCreateError
    naming ``setting`` if it cannot be); without it a missing directory is not locked (the caller
    fails on its own: there is nothing in it to protect).

    The lock is ``flock`` on ``path/.lock``: the kernel releases it when the process ends in any
    way (SIGKILL included), so a crashed run never blocks its own --resume. The file is removed
    on release; a file left by a killed process is simply locked again. Directories that this
    call created and that are still empty on release (the run failed before writing anything)
    are removed, so a refused run leaves nothing behind."""
    created = create(path, setting) if create_it else []
    if not path.is_dir():
        yield
        return
    key = os.path.realpath(path)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    try:
        fd = _lock(path / LOCK_NAME, what, holder, fix)
    except BaseException:
        _remove_empty(created)
        raise
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        if fd is not None:
            _unlock(fd, path / LOCK_NAME)
        _remove_empty(created)


def _lock(lock_file: Path, what: str, holder: str, fix: str) -> int | None:
    """The open, flock'ed lock file (our pid and host written in it); None where the file system
    cannot lock (a warning says that concurrent runs are then not detected)."""
    directory = lock_file.parent
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CannotCreateError(f"{what} {directory} cannot be written: {os_reason(exc)}; "
                                    f"choose a writable directory", os_reason(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise InUseError(f"{what} {directory} is in use by {holder}{owner}; {fix}") from None
        except OSError as exc:  # e.g. ENOLCK: a network file system without locking
            os.close(fd)
            lock_file.unlink(missing_ok=True)
            print(f"warning: cannot lock {directory} ({os_reason(exc)}); a second run writing into "
                  f"it at the same time would not be noticed", file=sys.stderr)
            return None
        # The holder removes the file on release: a lock taken on a file that was unlinked (or
        # replaced) between our open and our flock guards nothing. Open the path again.
        if _same_file(fd, lock_file):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _owner(fd: int) -> str:
    """' (pid N)' (and the host where it is not ours) as the holder wrote it; '' if unknown
    (it may not have written it yet)."""
    try:
        pid, _, host = os.pread(fd, 256, 0).decode().strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return ""
    if not pid.isdigit():
        return ""
    return f" (pid {pid}{f' on {host}' if host and host != socket.gethostname() else ''})"


def _unlock(fd: int, lock_file: Path) -> None:
    """Remove the lock file while still holding it (so that no one locks a file about to go),
    then release it. Only our file is removed: one that replaced it is another holder's."""
    try:
        if _same_file(fd, lock_file):
            lock_file.unlink()
    except OSError:
        pass  # a read-only directory now, say: the lock is released all the same
    finally:
        os.close(fd)


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories that ``create`` made, innermost first, as long as they are empty."""
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:
            return
