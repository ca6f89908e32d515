"""Every documented bad input raises an error that names the argument."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import metamixer_fast as mf
from metamixer_fast import MixedKDLoss, MixedTarget

Z = torch.randn(2, 4, 5)
Y = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("call, match", [
    (lambda: mf.mixed_kd_loss(torch.randn(1, 4, 5), Y), "K >= 2"),
    (lambda: mf.mixed_kd_loss(torch.randn(4, 5), Y), "logits"),
    (lambda: mf.mixed_kd_loss(Z.int(), Y), "logits"),
    (lambda: mf.mixed_kd_loss([Z[0], Z[1, :3]], Y), "share shape"),
    (lambda: mf.mixed_kd_loss(Z, torch.tensor([0, 1, 2, 5])), r"labels.*\[0, 5\)"),
    (lambda: mf.mixed_kd_loss(Z, torch.tensor([0, 1, -1, 2])), "labels"),
    (lambda: mf.mixed_kd_loss(Z, Y[:3]), "labels"),
    (lambda: mf.mixed_kd_loss(Z, Y.float()), "labels"),
    (lambda: mf.mixed_kd_loss(Z, Y, temperature=0.0), "temperature"),
    (lambda: mf.mixed_kd_loss(Z, Y, temperature=float("nan")), "temperature"),
    (lambda: mf.mixed_kd_loss(Z, Y, label_smoothing=1.5), "label_smoothing"),
    (lambda: mf.mixed_kd_loss(Z, Y, mode="dml"), "mode"),
    (lambda: mf.mixed_kd_loss(Z, Y, peer_matrix=torch.eye(2)), "peer_matrix"),
    (lambda: mf.mixed_kd_loss(Z, Y, mode="ensemble", peer_matrix=torch.eye(3)), "peer_matrix"),
    (lambda: mf.mixed_kd_loss(Z, Y, mode="ensemble",
                              peer_matrix=torch.tensor([[0.0, float("nan")], [1.0, 0.0]])), "peer_matrix"),
    (lambda: mf.mixed_kd_loss(Z, Y[:, None].repeat(1, 2), torch.ones(4, 2)), "sum to 1"),
    (lambda: mf.mixed_kd_loss(Z, Y[:, None].repeat(1, 2), torch.ones(4, 3) / 3), "weights"),
    (lambda: mf.mixed_kd_loss(Z, Y[:, None].repeat(1, 2)), "weights"),
    (lambda: mf.mixed_kd_loss(Z, Y, torch.ones(4)), "weights"),
    (lambda: mf.mixed_kd_loss(Z, Y[:, None].repeat(1, 2),
                              torch.tensor([[1.5, -0.5]] * 4)), "weights"),
    (lambda: mf.mixed_kd_loss(Z, Y.to("meta")), "labels"),
    (lambda: MixedKDLoss(temperature=-1), "temperature"),
    (lambda: MixedKDLoss(kd_weight=float("inf")), "kd_weight"),
    (lambda: MixedKDLoss(ce_weight=-1), "ce_weight"),
    (lambda: MixedKDLoss(mode="ensemble", peer_weights=torch.ones(3)), "peer_weights"),
    (lambda: MixedKDLoss(peer_weights=torch.ones(2, 2)), "peer_weights"),
    (lambda: MixedKDLoss(label_smoothing=-0.1), "label_smoothing"),
    (lambda: MixedKDLoss()(Z, Y[:, None]), "target"),
    (lambda: MixedKDLoss()(Z, [0, 1, 2, 3]), "target"),
    (lambda: MixedKDLoss(mode="ensemble", peer_weights=torch.ones(3, 3))(Z, Y), "peer_weights"),
    (lambda: MixedKDLoss()(Z, MixedTarget(Y[:, None], torch.full((4, 1), 2.0))), "sum to 1"),
])
def test_mixed_kd_loss_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


X = torch.randn(3, 2, 4, 4)
SRC = torch.tensor([1, 2, 0])
W = torch.tensor([0.0, 0.5, 1.0])
BOX = torch.tensor([[0, 2, 0, 2]] * 3)


@pytest.mark.parametrize("call, match", [
    (lambda: mf.mix(X.int(), SRC, W, BOX), "'x'"),
    (lambda: mf.mix(torch.randn(3, 2, 4), SRC, W, BOX), "'x'"),
    (lambda: mf.mix(X, SRC.int(), W, BOX), "'src'"),
    (lambda: mf.mix(X, SRC[:2], W, BOX), "'src'"),
    (lambda: mf.mix(X, torch.tensor([0, 1, 3]), W, BOX), "'src'"),
    (lambda: mf.mix(X, SRC, W[:2], BOX), "'w'"),
    (lambda: mf.mix(X, SRC, torch.tensor([0.0, 1.5, 0.2]), BOX), "'w'"),
    (lambda: mf.mix(X, SRC, torch.tensor([0.0, float("nan"), 0.2]), BOX), "'w'"),
    (lambda: mf.mix(X, SRC, W, BOX.float()), "'box'"),
    (lambda: mf.mix(X, SRC, W, torch.tensor([[0, 5, 0, 2]] * 3)), "'box'"),
    (lambda: mf.mix(X, SRC, W, torch.tensor([[2, 1, 0, 2]] * 3)), "'box'"),
    (lambda: mf.mix(torch.randn(3, 8), SRC, W, BOX), "'box'"),
])
def test_mix_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


CALL_LOSS = ("import torch, metamixer_fast as mf; "
             "mf.mixed_kd_loss(torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.long))")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_unknown_backend_is_refused():
    proc = _run(CALL_LOSS, METAMIXER_BACKEND="fastest")
    assert proc.returncode != 0
    assert "METAMIXER_BACKEND='fastest' is not a backend" in proc.stderr


def test_triton_on_cpu_without_interpreter_is_refused():
    proc = _run(CALL_LOSS, METAMIXER_BACKEND="triton", TRITON_INTERPRET="0")
    assert proc.returncode != 0
    assert "METAMIXER_BACKEND=triton cannot run" in proc.stderr


def test_cpp_backend_without_the_extension_is_refused():
    blocked = "import sys; sys.modules['metamixer_fast._C'] = None; " + CALL_LOSS
    proc = _run(blocked, METAMIXER_BACKEND="cpp")
    assert proc.returncode != 0
    assert "METAMIXER_BACKEND=cpp cannot run" in proc.stderr and "not built" in proc.stderr


XU = torch.randint(0, 256, (3, 2, 4, 4), dtype=torch.uint8)


@pytest.mark.parametrize("call, match", [
    (lambda: mf.mix(X, SRC, 0.5, BOX), "'w' must be a torch.Tensor, got float"),
    (lambda: mf.mix(X, [1, 2, 0], W, BOX), "'src' must be a torch.Tensor, got list"),
    (lambda: mf.mix(X.numpy(), SRC, W, BOX), "'x' must be a torch.Tensor, got numpy.ndarray"),
    (lambda: mf.mix(X, SRC, W, [[0, 2, 0, 2]] * 3), "'box' must be a torch.Tensor or None"),
    (lambda: mf.mix2(X, SRC, W, BOX, SRC, 0.5), "^mix2: 'w2' must be a torch.Tensor"),
    (lambda: mf.mix2(X, SRC, W, BOX, (1, 2, 0), W), "^mix2: 'src2' must be a torch.Tensor"),
])
def test_mix_non_tensor_arguments_are_named(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda: mf.mix(XU, SRC, W.clone().requires_grad_(), BOX), r"^mix: 'w' requires grad.*w.detach\(\)"),
    (lambda: mf.mix2(XU, SRC, W.clone().requires_grad_(), BOX, SRC, W), "^mix2: 'w' requires grad"),
    (lambda: mf.mix2(XU, SRC, W, BOX, SRC, W.clone().requires_grad_()),
     r"^mix2: 'w2' requires grad.*w2.detach\(\)"),
])
def test_mix_of_integer_images_refuses_a_weight_that_needs_a_gradient(mix_backend, call, match):
    with pytest.raises(ValueError, match=match):
        call()
    with torch.no_grad():  # no gradient asked for: fine
        mf.mix(XU, SRC, W.clone().requires_grad_(), BOX)
    mf.mix(XU, SRC, W, BOX)


@pytest.mark.parametrize("call, match", [
    (lambda: mf.mix2(X, SRC, W, BOX, SRC, torch.tensor([0.0, 2.0, 0.0])), "^mix2: 'w2'"),
    (lambda: mf.mix2(X, SRC, W, BOX, torch.tensor([0, 5, 0]), W), "^mix2: 'src2'"),
    (lambda: mf.mix2(X, SRC, torch.tensor([0.0, 2.0, 0.0]), BOX, SRC, W), "^mix2: 'w'"),
    (lambda: mf.mix2(X, SRC, W.clone().requires_grad_(), BOX, SRC, torch.tensor([0.0, 2.0, 0.0])),
     "^mix2: 'w2'"),
])
def test_mix2_errors_say_mix2(mix_backend, call, match):
    with pytest.raises(ValueError, match=match):
        call()
