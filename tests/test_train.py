"""The training loop end to end on small synthetic data: every method, resume, DDP, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metamixer_fast import checkpoint
from metamixer_fast.config import METHODS, from_mapping
from metamixer_fast.train import fit, main

SMALL = {"dataset": "synthetic", "synthetic_size": 256, "arch": "tiny", "batch_size": 32,
         "eval_batch_size": 128, "epochs": 2, "limit_train_batches": 4, "progress": False,
         "stages": "input,stage1,stage2,stage3", "lr": 0.05}


def _cfg(tmp_path: Path, **extra):
    return from_mapping({**SMALL, "out": str(tmp_path / "run"), **extra}).validate()


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = fit(_cfg(tmp_path / "a", epochs=3))
    stopped = _cfg(tmp_path / "b", epochs=3, stop_after_epochs=1)
    fit(stopped)
    assert len(_metrics(tmp_path / "b" / "run")) == 1
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


def test_help_lists_every_option():
    proc = subprocess.run([sys.executable, "-m", "metamixer_fast.cli", "train", "--help"],
                          capture_output=True, text=True, check=True)
    for option in ("--method", "--arch", "--amp", "--resume", "--config", "--stages", "--compile"):
        assert option in proc.stdout


def test_plot_writes_pngs(tmp_path):
    fit(_cfg(tmp_path, epochs=2))
    proc = subprocess.run([sys.executable, "-m", "metamixer_fast.cli", "plot", str(tmp_path / "run")],
                          capture_output=True, text=True, check=True)
    for name in ("loss.png", "accuracy.png"):
        path = tmp_path / "run" / name
        assert str(path) in proc.stdout
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
