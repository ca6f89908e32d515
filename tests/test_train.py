"""The training loop end to end on small synthetic data: every method, resume, DDP, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from idx_files import fake_fashion_mnist

from metamixer_fast import checkpoint, train
from metamixer_fast.config import METHODS, ConfigError, from_mapping
from metamixer_fast.train import fit, main

SMALL = {"dataset": "synthetic", "synthetic_size": 256, "arch": "tiny", "batch_size": 32,
         "eval_batch_size": 128, "epochs": 2, "limit_train_batches": 4, "progress": False,
         "stages": "input,stage1,stage2,stage3", "lr": 0.05}


def _cfg(tmp_path: Path, **extra):
    return from_mapping({**SMALL, "out": str(tmp_path / "run"), **extra}).validate()


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_limit_eval_batches_makes_only_those_batches(tmp_path):
    """Each evaluation makes the first limit_eval_batches test batches and no others."""
    run = train.Run(_cfg(tmp_path, eval_batch_size=16, limit_eval_batches=2))
    assert len(run.test_batches) > 2
    made = []
    make = run.test_batches._batch
    run.test_batches._batch = lambda i: made.append(i) or make(i)
    first, second = run.evaluate(), run.evaluate()
    assert made == [0, 1, 0, 1] and first == second
    unlimited = train.Run(_cfg(tmp_path / "all", eval_batch_size=16))
    make = unlimited.test_batches._batch
    made.clear()
    unlimited.test_batches._batch = lambda i: made.append(i) or make(i)
    unlimited.evaluate()
    assert made == list(range(len(unlimited.test_batches)))


def _same_weights(a: Path, b: Path) -> bool:
    pa, pb = checkpoint.load(a)["peers"], checkpoint.load(b)["peers"]
    return all(torch.equal(x[key], y[key]) for x, y in zip(pa, pb, strict=True) for key in x)


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reports(tmp_path, method):
    final = fit(_cfg(tmp_path, method=method, epochs=1))
    run_dir = tmp_path / "run"
    (record,) = _metrics(run_dir)
    assert record == final
    assert len(record["top1"]) == 2 and 0 <= record["ensemble_top1"] <= 100
    assert all(torch.isfinite(torch.tensor(record["train_ce"] + record["train_kd"])))
    if method == "independent":
        assert record["train_loss"] == pytest.approx(sum(record["train_ce"]), rel=1e-4)
    state = checkpoint.load(run_dir)
    assert state["epoch"] == 1 and state["config"]["method"] == method


def test_training_learns_the_synthetic_task(tmp_path):
    final = fit(_cfg(tmp_path, method="metamixer", epochs=3, limit_train_batches=0,
                     synthetic_size=512, lr=0.1))
    assert final["ensemble_top1"] > 50  # 10 classes: chance is 10 %


def _to_old_format(run_dir: Path) -> None:
    """The checkpoint as versions before per-rank states wrote it (one process)."""
    state = checkpoint.load(run_dir)
    state["mixer"], state["rng"] = state["mixer"][0], state["rng"][0]
    del state["data"], state["format"]
    checkpoint.save(state, run_dir)


@pytest.mark.parametrize("old_format", [False, True])
def test_resume_equals_uninterrupted_run(tmp_path, old_format):
    straight = fit(_cfg(tmp_path / "a", epochs=3))
    stopped = _cfg(tmp_path / "b", epochs=3, stop_after_epochs=1)
    fit(stopped)
    assert len(_metrics(tmp_path / "b" / "run")) == 1
    if old_format:  # a checkpoint without per-rank lists still resumes in one process
        _to_old_format(tmp_path / "b" / "run")
    assert main(["--resume", str(tmp_path / "b" / "run"), "--no-progress"]) == 0
    resumed = _metrics(tmp_path / "b" / "run")
    assert resumed[-1] == straight | {k: resumed[-1][k] for k in ("images_per_s", "epoch_seconds")}
    a, b = checkpoint.load(tmp_path / "a" / "run"), checkpoint.load(tmp_path / "b" / "run")
    for pa, pb in zip(a["peers"], b["peers"]):
        for key in pa:
            assert torch.equal(pa[key], pb[key]), key


def test_cli_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nope"), "--out", out]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    base = ["--dataset", "synthetic", "--synthetic-size", "128", "--arch", "tiny", "--epochs", "1",
            "--batch-size", "32", "--no-progress", "--out", out]
    assert main(base) == 0
    assert main(base) == 2  # the run dir holds a checkpoint: never overwritten
    assert "--resume" in capsys.readouterr().err
    assert main(["--resume", out, "--lr", "0.5"]) == 2
    assert "'lr'" in capsys.readouterr().err
    ckpt = Path(out) / checkpoint.NAME
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    damaged = ckpt.read_bytes()
    assert main(["--resume", out]) == 2
    assert "corrupt" in capsys.readouterr().err and ckpt.read_bytes() == damaged
    assert main(["--method", "nope"]) == 2
    assert main([*base[:-1], str(tmp_path / "other"), "--arch", "resnet21"]) == 2
    assert "unknown model 'resnet21'" in capsys.readouterr().err
    bad_data = tmp_path / "fmnist"
    bad_data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (bad_data / name).write_bytes(b"not gzip")
    assert main(["--dataset", "fashion-mnist", "--data-dir", str(bad_data), "--out", out + "2"]) == 2
    assert "not a valid gzip file" in capsys.readouterr().err


def test_a_fresh_run_never_overwrites_another_runs_files(tmp_path, capsys):
    """Refused before the data is read: a directory holding metrics or a foreign config.json, and
    an --out that is a file; the files of a run that ended before its first epoch are replaced."""
    base = ["--dataset", "synthetic", "--synthetic-size", "64", "--arch", "tiny", "--batch-size", "32",
            "--epochs", "1", "--limit-train-batches", "1", "--no-progress"]
    cases = {"metrics": ("metrics.jsonl", "precious\n", "metrics.jsonl"),
             "foreign": ("config.json", '{"a": 1}\n', "config.json"),
             "file": (None, "a file\n", "is a file")}
    for name, (file, text, match) in cases.items():
        target = tmp_path / name
        if file is None:
            target.write_text(text)
        else:
            target.mkdir()
            (target / file).write_text(text)
        before = (target if file is None else target / file).read_text()
        assert main([*base, "--out", str(target)]) == 2
        assert match in capsys.readouterr().err
        assert (target if file is None else target / file).read_text() == before
        assert file is None or sorted(p.name for p in target.iterdir()) == [file]
    unfinished = tmp_path / "unfinished"  # a run that stopped before its first epoch ended
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps(from_mapping({}).to_dict()))
    (unfinished / "metrics.jsonl").write_text("")
    assert main([*base, "--out", str(unfinished)]) == 0
    assert len(_metrics(unfinished)) == 1


def test_help_lists_every_option():
    proc = subprocess.run([sys.executable, "-m", "metamixer_fast.cli", "train", "--help"],
                          capture_output=True, text=True, check=True)
    for option in ("--method", "--arch", "--amp", "--resume", "--config", "--stages", "--compile"):
        assert option in proc.stdout


@pytest.mark.parametrize("command", ["train", "study", "plot", "info"])
def test_help_is_plain_text(command, capsys):
    """The descriptions come from docstrings: their reStructuredText markup must not show."""
    from metamixer_fast import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and f"metamixer-fast {command}" in out
    for markup in ("``", ":func:", ":class:", ":mod:", "::\n"):
        assert markup not in out, (markup, out)


@pytest.mark.parametrize("epochs_saved", [0, 1])
def test_ctrl_c_ends_train_with_one_line_and_status_130(tmp_path, capsys, monkeypatch, epochs_saved):
    """No traceback: one line saying what is saved and how to go on (--resume), status 130."""
    from metamixer_fast import cli

    real_epoch = train.Run.train_epoch

    def train_epoch(self):
        if self.epoch == epochs_saved:
            raise KeyboardInterrupt
        return real_epoch(self)

    monkeypatch.setattr(train.Run, "train_epoch", train_epoch)
    out = tmp_path / "run"
    argv = ["train", "--dataset", "synthetic", "--synthetic-size", "64", "--arch", "tiny", "--batch-size",
            "32", "--epochs", "2", "--limit-train-batches", "1", "--limit-eval-batches", "1",
            "--no-progress", "--out", str(out)]
    try:
        rc = cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the train command as a KeyboardInterrupt (a traceback)")
    [line] = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and line.startswith("interrupted")
    if epochs_saved:
        assert f"metamixer-fast train --resume {out}" in line and "checkpoint" in line
    else:
        assert "no checkpoint" in line and "--resume" not in line
    monkeypatch.undo()
    assert cli.main(["train", "--resume", str(out)] if epochs_saved else argv) == 0
    assert len(_metrics(out)) == 2


def test_plot_writes_pngs(tmp_path):
    fit(_cfg(tmp_path, epochs=2))
    proc = subprocess.run([sys.executable, "-m", "metamixer_fast.cli", "plot", str(tmp_path / "run")],
                          capture_output=True, text=True, check=True)
    for name in ("loss.png", "accuracy.png"):
        path = tmp_path / "run" / name
        assert str(path) in proc.stdout
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a last line cut short (a run stopped while writing it) is left out, with a warning
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "top')
    from metamixer_fast import plot
    assert plot.main([str(tmp_path / "run")]) == 0
    assert len(plot.read_metrics(tmp_path / "run")) == 2
    (tmp_path / "afile").write_text("x")
    assert plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "afile")]) == 2
    metrics.write_text('{"epoch": 1}\n')
    with pytest.raises(ValueError, match="not an epoch record"):
        plot.read_metrics(tmp_path / "run")


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "metamixer_fast.train", "--dataset", "synthetic", "--synthetic-size", "256",
           "--arch", "tiny", "--batch-size", "32", "--epochs", "2", "--limit-train-batches", "3",
           "--threads", "1", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _metrics(out)
    assert len(records) == 2
    assert all(r["world_size"] == 2 and r["ranks_in_sync"] for r in records)
    assert proc.stdout.count("final:") == 1  # printed by rank 0 only


def test_exit_process_skips_teardown_only_after_a_process_group(monkeypatch):
    """A torchrun worker leaves through os._exit once its output is flushed (torch's teardown
    of a gloo process group can abort the process after the run is saved); any other process
    exits normally."""
    from metamixer_fast import process_group

    code = ("from metamixer_fast import process_group as pg; pg.started = True; import sys; "
            "print('saved', end=''); sys.stderr.write('note'); pg.exit_process(3); print('!')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "saved", "note")
    monkeypatch.setattr(process_group, "started", False)
    with pytest.raises(SystemExit) as exc:
        process_group.exit_process(4)
    assert exc.value.code == 4


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs(tmp_path, amp):
    final = fit(_cfg(tmp_path, amp=amp, epochs=1))
    assert all(torch.isfinite(torch.tensor(final["train_ce"] + final["train_kd"])))
    state = checkpoint.load(tmp_path / "run")
    if amp == "fp16":  # the GradScaler's state is part of the checkpoint
        assert state["scaler"]["scale"] > 0


@pytest.mark.parametrize("retain", [True, False])
def test_cpu_runs_retain_freed_memory_unless_told_not_to(tmp_path, monkeypatch, retain):
    from metamixer_fast import memory, train

    calls = []
    monkeypatch.setattr(memory, "retain_freed_memory", lambda: calls.append(1) or True)
    train.Run(_cfg(tmp_path, retain_memory=retain))
    assert calls == ([1] if retain else [])
    assert "retain_memory" in train.RESUME_MUTABLE  # it changes speed, not results


@pytest.mark.parametrize("saved", [False, True], ids=["before-the-checkpoint", "after-it"])
def test_a_run_stopped_while_saving_its_first_epoch_can_go_on(tmp_path, monkeypatch, saved):
    """Stopped around the first checkpoint: either nothing is saved, and the same command starts
    afresh, or the checkpoint is, and --resume finishes the run with every epoch's metrics."""
    save = checkpoint.save

    def stop(state, run_dir):
        if saved:
            save(state, run_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", stop)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tmp_path))
    monkeypatch.setattr(checkpoint, "save", save)
    run_dir = tmp_path / "run"
    if saved:
        fit(_cfg(tmp_path), resume=checkpoint.load(run_dir))
    else:
        fit(_cfg(tmp_path))
    assert [r["epoch"] for r in _metrics(run_dir)] == [1, 2]
    assert checkpoint.load(run_dir)["epoch"] == 2


def test_resume_writes_only_into_the_resumed_directory(tmp_path, capsys):
    run, other = tmp_path / "a" / "run", tmp_path / "other" / "run"
    fit(_cfg(tmp_path / "a", stop_after_epochs=1))
    fit(_cfg(tmp_path / "other", epochs=1))
    before = _files(other)
    # an explicit --out elsewhere is refused, and nothing is written anywhere
    assert main(["--resume", str(run), "--out", str(other)]) == 2
    assert f"--out {other}" in capsys.readouterr().err
    assert _files(other) == before and len(_metrics(run)) == 1
    # a config file's 'out' is where its fresh runs go: ignored on resume
    toml = tmp_path / "run.toml"
    toml.write_text(f'[train]\nout = "{other}"\nprogress = false\n')
    assert main(["--resume", str(run), "--config", str(toml), "--out", str(run) + "/"]) == 0
    assert _files(other) == before and len(_metrics(run)) == 2


def test_resume_after_the_data_directory_moved(tmp_path, capsys):
    data, moved, other = tmp_path / "data", tmp_path / "moved", tmp_path / "other"
    fake_fashion_mnist(data, torch.Generator().manual_seed(0), n_train=64, n_test=16)
    fake_fashion_mnist(other, torch.Generator().manual_seed(0), n_train=64, n_test=16,
                       shuffle_train_labels=True)
    run = tmp_path / "run"
    fit(_cfg(tmp_path, dataset="fashion-mnist", data_dir=str(data), batch_size=16, stop_after_epochs=1))
    shutil.move(data, moved)
    assert main(["--resume", str(run)]) == 2
    assert "--data-dir" in capsys.readouterr().err  # the hint the next command follows
    assert main(["--resume", str(run), "--data-dir", str(other)]) == 2  # other labels: other data
    assert "not the data this run was trained on" in capsys.readouterr().err
    assert len(_metrics(run)) == 1
    assert main(["--resume", str(run), "--data-dir", str(moved)]) == 0
    assert len(_metrics(run)) == 2 and checkpoint.load(run)["config"]["data_dir"] == str(moved)


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "100000"], "'batch_size' 100000"),
    (["--synthetic-size", "1"], "'synthetic_size'"),
    (["--local-pairing", "bogus"], "'local_pairing'"),
    (["--global-pairing", "same_class"], "'global_pairing'"),
    (["--local-alpha", "inf"], "'local_alpha'"),
    (["--temperature", "inf"], "'temperature'"),
    (["--kd-weight", "inf"], "'kd_weight'"),
    (["--gamma", "-1"], "'gamma'"),
    (["--stages", "input,foo"], "'stages'"),
    (["--arch", "metamixer_fast.models:tiny", "--stages", "input,stage9"], "'stage9'"),
])
def test_cli_bad_options_are_clear_errors(tmp_path, capsys, argv, match):
    out = tmp_path / "run"
    base = ["--dataset", "synthetic", "--synthetic-size", "64", "--arch", "tiny", "--batch-size", "32",
            "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config ") and match in err, err
    assert not out.exists()  # refused before anything is written


@pytest.mark.parametrize("option", [{"temperature": float("inf")}, {"local_alpha": float("inf")},
                                    {"local_pairing": "bogus"}])
def test_a_bad_option_that_skipped_validation_is_a_config_error(tmp_path, option):
    """What the loss or the mixer refuses while the run is built becomes a ConfigError too."""
    cfg = from_mapping({**SMALL, "out": str(tmp_path / "run"), **option})  # not validated
    with pytest.raises(ConfigError, match=next(iter(option))):
        train.Run(cfg)


def test_warmup_never_exceeds_the_peak_lr(tmp_path):
    short = _cfg(tmp_path, warmup_epochs=0.01)  # 0.08 of a step at 8 steps per epoch
    assert train.lr_factor(short, 0, 8) == 1.0  # was 12.5: above the peak
    assert max(train.lr_factor(short, step, 8) for step in range(16)) == 1.0
    long = _cfg(tmp_path, warmup_epochs=1.5)
    assert train.lr_factor(long, 0, 8) == pytest.approx(1 / 12)
    assert max(train.lr_factor(long, step, 8) for step in range(16)) == 1.0


def test_old_single_mixer_state_is_refused_under_ddp():
    old = {"generator": torch.Generator().get_state(), "stats": {}}
    one = SimpleNamespace(world=1, rank=0)
    assert train.Run.own_entry(one, old, "mixer") is old
    with pytest.raises(checkpoint.CheckpointError, match="rank 0 only"):
        train.Run.own_entry(SimpleNamespace(world=2, rank=1), old, "mixer")
    with pytest.raises(checkpoint.CheckpointError, match="2 processes"):
        train.Run.own_entry(one, [old, old], "mixer")


def test_ddp_resume_equals_uninterrupted_run(tmp_path):
    """Every rank mixes with its own generator: a resumed run must continue each rank's."""
    def torchrun(*args: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "metamixer_fast.train", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    common = ["--dataset", "synthetic", "--synthetic-size", "256", "--arch", "tiny", "--batch-size", "32",
              "--epochs", "3", "--limit-train-batches", "3", "--limit-eval-batches", "1", "--threads", "1",
              "--no-progress"]
    torchrun(*common, "--out", str(tmp_path / "a"))
    torchrun(*common, "--out", str(tmp_path / "b"), "--stop-after-epochs", "1")
    torchrun("--resume", str(tmp_path / "b"))
    mixers = checkpoint.load(tmp_path / "b")["mixer"]  # one state per rank, and they differ
    assert isinstance(mixers, list) and len(mixers) == 2
    assert not torch.equal(mixers[0]["generator"], mixers[1]["generator"])
    timing = ("images_per_s", "epoch_seconds")
    a, b = ([{k: v for k, v in r.items() if k not in timing} for r in _metrics(tmp_path / d)] for d in "ab")
    assert a == b and len(a) == 3
    assert _same_weights(tmp_path / "a", tmp_path / "b")


def test_a_stopped_run_does_not_print_a_final_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--stop-after-epochs: the accuracy after the last epoch run is not the run's result, so
    stdout must not say 'final:' (a script reading it would take it for one) until it is."""
    out = tmp_path / "run"
    base = ["--dataset", "synthetic", "--synthetic-size", "64", "--arch", "tiny", "--batch-size", "32",
            "--epochs", "2", "--limit-train-batches", "1", "--limit-eval-batches", "1", "--no-progress"]
    assert main([*base, "--stop-after-epochs", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "final:" not in captured.out and "after epoch 1/2: top-1 per peer" in captured.out
    assert f"continue with --resume {out}" in captured.err
    assert main(["--resume", str(out)]) == 0
    captured = capsys.readouterr()
    assert "final: top-1 per peer" in captured.out and "after epoch" not in captured.out


@pytest.mark.parametrize("argv", [["--epoch", "1"], ["--stop-after", "1"], ["--res", "x"]])
def test_abbreviated_options_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """'--epoch 1' was silently '--epochs 1': an abbreviation may also come to mean another option
    once one is added. Only the full names are accepted."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2 and f"unrecognized arguments: {' '.join(argv)}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_a_directory_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: config file {tmp_path} is a directory; pass a TOML file\n"


def test_a_moved_run_resumed_says_where_it_is_in_its_config_json(tmp_path: Path) -> None:
    """After `mv run1 run2; train --resume run2`, config.json said "out": "run1" (only the
    checkpoint's copy of the config was updated): both now name the directory the run is in."""
    fit(_cfg(tmp_path, stop_after_epochs=1))
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "run", moved)
    assert main(["--resume", str(moved), "--no-progress"]) == 0
    saved = json.loads((moved / "config.json").read_text())
    assert saved["out"] == str(moved) and saved == checkpoint.load(moved)["config"]
