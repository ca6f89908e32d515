"""Where a run writes: an output directory that cannot be created is a clear error before any
work is done, and a directory that another process is writing (a run, a study) is refused at once
instead of having two runs' files interleaved in it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_study import ONE_RUN

from metamixer_fast import checkpoint, data, run_directory
from metamixer_fast.study import FAILED
from metamixer_fast.study import main as study_main
from metamixer_fast.train import main as train_main

TRAIN = ["--dataset", "synthetic", "--synthetic-size", "64", "--arch", "tiny", "--batch-size", "32",
         "--epochs", "2", "--limit-train-batches", "1", "--limit-eval-batches", "1", "--no-progress"]

def _study(out: Path) -> str:
    """A one-run study (test_study.py's), in ``out``."""
    return ONE_RUN.format(out=out, seeds="[0]", lr=0.1, stop=0)

# A process that holds the lock of a directory until it is killed (what a run in progress does).
HOLDER = """
import sys, time
from pathlib import Path
from metamixer_fast import run_directory
with run_directory.hold(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""

# A training run that stops after writing its first checkpoint, as if still training its second
# epoch: what a second run, or a --resume, finds while a run is in progress.
PAUSED_RUN = """
import sys, time
from metamixer_fast import checkpoint, train
save = checkpoint.save
def save_then_wait(state, run_dir):
    save(state, run_dir)
    print("held", flush=True)
    time.sleep(600)
checkpoint.save = save_then_wait
sys.exit(train.main(sys.argv[1:]))
"""


def _start(script: str, *args: str) -> subprocess.Popen[str]:
    """Run ``script`` and wait until it says it holds its directory."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "held":
        proc.kill()
        pytest.fail(f"the holder did not start: {line}{proc.communicate()[1][-2000:]}")
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A directory locked by another process (killed at the end of the test)."""
    locked = tmp_path / "locked"
    proc = _start(HOLDER, str(locked))
    yield locked, proc
    if proc.poll() is None:
        _kill(proc)


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the data fails the test: the errors here must come before it."""
    def load_dataset(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data was read before the output directory was checked")

    monkeypatch.setattr(data, "load_dataset", load_dataset)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ------------------------------------------------------------------ directories that cannot be made

def _unwritable(tmp_path: Path, where: str) -> tuple[Path, str]:
    """An --out that cannot be created, and the reason the message must give. A file in the path
    works for every user (root ignores permissions); /proc refuses new directories to anyone."""
    if where == "under a file":
        (tmp_path / "afile").write_text("precious\n")
        return tmp_path / "afile" / "sub", f"{tmp_path / 'afile'} is a file, not a directory"
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    return Path("/proc/metamixer-fast-test/run"), "/proc does not allow it"


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_an_out_that_cannot_be_created_is_refused_before_the_data_is_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_data: None, where: str) -> None:
    out, reason = _unwritable(tmp_path, where)
    assert train_main([*TRAIN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config 'out' {out} cannot be created: ") and reason in err, err
    assert "choose a writable directory" in err and "Traceback" not in err
    if where == "under a file":
        assert (tmp_path / "afile").read_text() == "precious\n"  # nothing saved is lost


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_a_study_out_that_cannot_be_created_names_the_study_setting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_data: None, where: str) -> None:
    out, reason = _unwritable(tmp_path, where)
    path = tmp_path / "s.toml"
    path.write_text(_study(out))
    assert study_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: [study] out {out} cannot be created: ") and reason in err, err
    assert "choose a writable directory" in err and "Traceback" not in err


def test_a_refused_run_leaves_no_directory_it_created(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run that fails before its first write (here: a batch larger than the data, found while
    the data is read, after the directory was created and locked) leaves nothing behind."""
    out = tmp_path / "new" / "run"
    assert train_main([*TRAIN, "--batch-size", "1000", "--out", str(out)]) == 2
    assert "'batch_size' 1000" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ the lock

def test_a_run_in_progress_refuses_a_second_run_and_a_resume_until_it_dies(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs into one --out interleaved their metrics lines and files. Now a second one, fresh
    or --resume, is refused at once, naming the process; once the first one dies (SIGKILL: the
    kernel releases its lock), --resume continues its run."""
    out = tmp_path / "run"
    proc = _start(PAUSED_RUN, *TRAIN, "--out", str(out))
    try:
        before = _files(out)
        assert checkpoint.NAME in before
        with monkeypatch.context() as patched:
            patched.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data read"))
            assert train_main([*TRAIN, "--seed", "1", "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err == (f"error: run directory {out} is in use by another run (pid {proc.pid}); "
                           f"wait for it to end, or choose another --out\n")
            assert train_main(["--resume", str(out)]) == 2
            err = capsys.readouterr().err
            assert f"in use by another run (pid {proc.pid})" in err and "before resuming" in err
        assert _files(out) == before  # neither wrote anything
    finally:
        _kill(proc)
    assert (out / run_directory.LOCK_NAME).exists()  # the killed run could not remove it ...
    assert train_main(["--resume", str(out)]) == 0  # ... and it blocks nothing
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (out / run_directory.LOCK_NAME).exists()  # removed by the run that ended


def test_two_fresh_runs_started_together_do_not_share_a_directory(tmp_path: Path) -> None:
    """The audit's case: the second run starts while the first is still reading its data. One of
    them is refused; the directory holds one run's files, its metrics one line per epoch."""
    out = tmp_path / "cc"
    cmd = [sys.executable, "-m", "metamixer_fast.train", *TRAIN, "--synthetic-size", "2048",
           "--limit-train-batches", "20", "--threads", "1", "--out", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.run([*cmd, "--seed", "1"], capture_output=True, text=True, timeout=300)
    _, first_err = first.communicate(timeout=300)
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], (first_err[-2000:], second.stderr[-2000:])
    refused = second.stderr if second.returncode else first_err
    # in use, as a rule; on a machine so loaded that one run ended before the other looked,
    # refused as holding that run's checkpoint: either way never both in one directory
    assert ("is in use by another run" in refused or "already holds a checkpoint" in refused) \
        and "Traceback" not in refused, refused
    seed = 0 if first.returncode == 0 else 1
    assert json.loads((out / "config.json").read_text())["seed"] == seed
    assert checkpoint.load(out)["config"]["seed"] == seed
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_study_refuses_a_study_directory_in_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], holder: tuple[Path, subprocess.Popen[str]],
        no_data: None) -> None:
    locked, proc = holder
    path = tmp_path / "s.toml"
    path.write_text(_study(locked))
    assert study_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: [study] out {locked} is in use by another study "
                          f"(pid {proc.pid}); wait for it to end"), err
    assert not (locked / "dml").exists()


def test_a_study_skips_a_run_in_use_without_marking_it_failed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run of the study that another process is writing (a train --resume of it, say) is left
    alone: reported, not trained, not marked failed (its directory is the other process's)."""
    out = tmp_path / "out"
    run_dir = out / "dml" / "seed0"
    proc = _start(HOLDER, str(run_dir))
    try:
        path = tmp_path / "s.toml"
        path.write_text(_study(out))
        assert study_main([str(path)]) == 2
        err = capsys.readouterr().err
        assert (f"error: study variant 'dml' seed 0 failed: run directory {run_dir} is in use by "
                f"another run (pid {proc.pid}); rerun the study when it has ended") in err, err
        assert not (run_dir / FAILED).exists() and not (run_dir / checkpoint.NAME).exists()
    finally:
        _kill(proc)
    assert study_main([str(path)]) == 0  # the holder is gone: the rerun trains the run
    assert checkpoint.load(run_dir)["epoch"] == 2  # both epochs of the one-run study


def test_the_lock_is_released_on_death_and_reentrant_in_one_process(
        tmp_path: Path, holder: tuple[Path, subprocess.Popen[str]]) -> None:
    locked, proc = holder
    with pytest.raises(run_directory.InUseError, match=f"pid {proc.pid}"):
        with run_directory.hold(locked):
            pass
    _kill(proc)
    with run_directory.hold(locked):
        with run_directory.hold(locked):  # the study holds a run's lock while fit takes it
            pass
        # still held after the inner block: another process is refused
        probe = subprocess.run([sys.executable, "-c", HOLDER, str(locked)], capture_output=True,
                               text=True, timeout=120)
        assert probe.returncode == 1 and "InUseError" in probe.stderr
    assert list(locked.iterdir()) == []  # the lock file goes with the lock
