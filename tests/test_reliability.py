"""Crash safety, non-finite losses, determinism and thread safety."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import metamixer_fast as mf
from metamixer_fast import _backend, checkpoint, reference
from metamixer_fast.config import from_mapping
from metamixer_fast.train import NonFiniteLossError, fit, main

HERE = Path(__file__).resolve().parent
TRAIN_ARGS = ["--dataset", "synthetic", "--synthetic-size", "192", "--arch", "tiny", "--batch-size", "32",
              "--epochs", "3", "--limit-train-batches", "4", "--no-progress", "--lr", "0.05"]


def _final(run_dir: Path) -> dict:
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {k: v for k, v in record.items() if k not in ("images_per_s", "epoch_seconds")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main([*TRAIN_ARGS, "--out", str(out)]) == 0
    return _final(out), checkpoint.load(out)["peers"]


@pytest.mark.parametrize("moment, n, last_good_epoch", [
    ("step", 6, 1),     # SIGKILL in the middle of epoch 2 (4 steps per epoch)
    ("write", 2, 1),    # SIGKILL half way through writing epoch 2's checkpoint
    ("rename", 2, 1),   # SIGKILL after the temporary file, before the rename
])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, uninterrupted, moment, n, last_good_epoch):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(HERE / "crash_runner.py"), moment, str(n), "--",
                           *TRAIN_ARGS, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert checkpoint.load(out)["epoch"] == last_good_epoch  # the last good checkpoint is intact
    assert main(["--resume", str(out), "--no-progress"]) == 0
    final, peers = uninterrupted
    assert _final(out) == final
    resumed = checkpoint.load(out)["peers"]
    for a, b in zip(peers, resumed):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert not list(out.glob(".checkpoint*"))  # a killed writer's temporary file is gone too


class ExplodingPeer(nn.Module):
    """A classifier whose logits turn NaN from its 3rd training forward on (a stand-in for a
    diverging run), to check that training stops and names the step and the peer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(in_channels, num_classes)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x.mean((2, 3)))
        if self.training:
            self.calls += 1
            if self.calls >= 3:
                logits = logits * float("nan")
        return logits


def exploding_peer(num_classes: int, in_channels: int) -> nn.Module:
    return ExplodingPeer(num_classes, in_channels)


def test_non_finite_loss_stops_with_step_and_peer(tmp_path):
    cfg = from_mapping({"dataset": "synthetic", "synthetic_size": 192, "batch_size": 32, "epochs": 1,
                        "arch": "tiny,test_reliability:exploding_peer", "method": "dml",
                        "progress": False, "out": str(tmp_path / "run")}).validate()
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(epoch 1\), first in peer 1.*no "
                       r"checkpoint was written yet"):
        fit(cfg)


def test_deterministic_runs_are_bitwise_identical(tmp_path):
    finals = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main([*TRAIN_ARGS, "--epochs", "1", "--deterministic", "--out", str(out)]) == 0
        finals.append((_final(out), checkpoint.load(out)["peers"]))
    assert finals[0][0] == finals[1][0]
    for a, b in zip(finals[0][1], finals[1][1]):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_ops_are_thread_safe(loss_backend):
    if loss_backend == "triton" and _backend.triton_interpreted():
        pytest.skip("on CPU the Triton kernels run in triton's interpreter, which keeps its launch "
                    "grid in global state and is itself not thread-safe; GPU launches are")
    g = torch.Generator().manual_seed(0)
    cases = []
    for i in range(8):
        z = torch.randn(3, 16 + i, 37, generator=g, requires_grad=True)
        y = torch.randint(0, 37, (16 + i,), generator=g)
        x = torch.randn(6, 3, 9, 11, generator=g)
        cases.append((z, y, x))

    def compute(z, y, x):
        ce, kd = mf.mixed_kd_loss(z, y, temperature=2.0)
        (dz,) = torch.autograd.grad(ce.sum() + kd.sum(), z)
        mixed = mf.mix(x, torch.tensor([1, 0, 3, 2, 5, 4]), torch.full((6,), 0.3),
                       torch.tensor([[1, 5, 2, 8]] * 6))
        return ce.detach(), kd.detach(), dz, mixed

    expected = [compute(*c) for c in cases]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for _ in range(5):
                for j, c in enumerate(cases):
                    got = compute(*c)
                    if not all(torch.equal(a, b) for a, b in zip(got, expected[j])):
                        results[index] = got
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not results, "a concurrent call returned a different result"
    ce, _ = reference.mixed_kd_loss(cases[0][0].detach(), cases[0][1][:, None],
                                    torch.ones(16, 1), 2.0)
    torch.testing.assert_close(expected[0][0], ce)
