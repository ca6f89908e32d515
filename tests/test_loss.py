"""MixedKDLoss against the DML loss as research code writes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_mixed_kd_loss_kernels import assert_fp32_close, zero_kd_tolerances

from metamixer_fast import MixedKDLoss, MixedTarget


def hand_written_dml(logits: list[torch.Tensor], y: torch.Tensor, temperature: float,
                     kd_weight: float) -> torch.Tensor:
    """The usual DML step: per peer, CE + mean over the other peers of the softened KL."""
    total = 0.0
    for k, student in enumerate(logits):
        loss = F.cross_entropy(student, y)
        kl = 0.0
        for j, teacher in enumerate(logits):
            if j != k:
                kl = kl + F.kl_div(F.log_softmax(student / temperature, dim=1),
                                   F.softmax(teacher / temperature, dim=1).detach(),
                                   reduction="batchmean") * temperature * temperature
        total = total + loss + kd_weight * kl / (len(logits) - 1)
    return total


@pytest.mark.parametrize("k", [2, 4])
def test_mixed_kd_loss_module_equals_hand_written_dml(k, rng):
    batch, classes, temperature, kd_weight = 16, 10, 3.0, 0.7
    base = [torch.randn(batch, classes, generator=rng) * 2 for _ in range(k)]
    y = torch.randint(0, classes, (batch,), generator=rng)

    ours = [b.clone().requires_grad_(True) for b in base]
    out = MixedKDLoss(temperature=temperature, kd_weight=kd_weight)(ours, y)
    out.loss.backward()

    theirs = [b.clone().requires_grad_(True) for b in base]
    want = hand_written_dml(theirs, y, temperature, kd_weight)
    want.backward()

    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert out.ce.shape == out.kd.shape == (k,)


def test_stacked_and_listed_logits_agree(rng):
    z = torch.randn(3, 5, 7, generator=rng)
    target = MixedTarget(torch.randint(0, 7, (5, 2), generator=rng), torch.full((5, 2), 0.5))
    loss = MixedKDLoss(mode="ensemble", label_smoothing=0.1)
    a, b = loss(z, target), loss(list(z.unbind(0)), target)
    torch.testing.assert_close(a.loss, b.loss)


def test_identical_peers_have_zero_kd_and_kd_gradient(rng):
    z = torch.randn(1, 6, 9, generator=rng).expand(3, 6, 9).clone().requires_grad_(True)
    y = torch.randint(0, 9, (6,), generator=rng)
    loss = MixedKDLoss(ce_weight=0.0)
    out = loss(z, y)
    kd_tol, grad_tol = zero_kd_tolerances(loss.temperature)
    torch.testing.assert_close(out.kd, torch.zeros(3), rtol=0, atol=kd_tol)
    out.loss.backward()
    torch.testing.assert_close(z.grad, torch.zeros_like(z), rtol=0, atol=grad_tol)


def test_peer_weights_select_a_single_teacher(rng):
    z = torch.randn(2, 4, 5, generator=rng)
    y = torch.randint(0, 5, (4,), generator=rng)
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    ens = MixedKDLoss(mode="ensemble", peer_weights=a)(z, y)
    pair = MixedKDLoss(mode="pairwise")(z, y)
    torch.testing.assert_close(ens.kd, pair.kd)  # with K=2 both are KL(other || self)


@pytest.mark.parametrize("convert", ["half", "double", "to_bf16", "module_half"])
def test_converting_the_criterion_keeps_its_peer_weights_float32(convert, rng):
    """``.half()`` on a criterion (or on a module holding it) would round a weight of 1/3 to
    fp16 and change the loss; the weights stay float32, the precision the loss reads them in."""
    a = torch.tensor([[0.0, 1 / 3, 2 / 3], [0.5, 0.0, 0.5], [1 / 3, 2 / 3, 0.0]])
    criterion = MixedKDLoss(mode="ensemble", peer_weights=a)
    z = torch.randn(3, 4, 5, generator=rng)
    y = torch.randint(0, 5, (4,), generator=rng)
    before = criterion(z, y)
    {"half": lambda: criterion.half(), "double": lambda: criterion.double(),
     "to_bf16": lambda: criterion.to(torch.bfloat16),
     "module_half": lambda: torch.nn.ModuleList([criterion]).half()}[convert]()
    assert criterion.peer_weights.dtype == torch.float32 and torch.equal(criterion.peer_weights, a)
    after = criterion(z, y)
    assert torch.equal(after.kd, before.kd) and torch.equal(after.ce, before.ce)
    criterion.to("cpu")  # a device move still applies
    assert criterion.peer_weights.device.type == "cpu"


@pytest.mark.parametrize("form", ["generator", "iterator", "map", "tuple", "list of one [K, B, C]"])
@pytest.mark.parametrize("peer_weights", [False, True])
def test_peer_logits_in_any_form_the_functional_takes(loss_backend, form, peer_weights, rng):
    """MixedKDLoss takes the peers' logits in every form mixed_kd_loss does (any iterable of
    [B, C] tensors, read once), with peer_weights as without: their K check read len() of the
    argument, which a generator has not ("object of type 'generator' has no len()")."""
    k, batch, classes = 3, 5, 7
    base = torch.randn(k, batch, classes, generator=rng)
    y = torch.randint(0, classes, (batch,), generator=rng)
    a = torch.rand(k, k, generator=rng) if peer_weights else None
    criterion = MixedKDLoss(mode="ensemble", peer_weights=a)
    stacked = base.clone().requires_grad_(True)
    want = criterion(stacked, y)
    want.loss.backward()

    leaves = [p.clone().requires_grad_(True) for p in base.unbind(0)]
    one = base.clone().requires_grad_(True)
    given = {"generator": lambda: (p for p in leaves), "iterator": lambda: iter(leaves),
             "map": lambda: map(lambda p: p, leaves), "tuple": lambda: tuple(leaves),
             "list of one [K, B, C]": lambda: [one]}[form]()
    got = criterion(given, y)
    got.loss.backward()
    # (within the fp32 rule, not bit for bit: a form the C++ eager entry does not take runs the
    # custom op's route, whose gradient rounds differently)
    for g, w in zip(got, want):
        assert_fp32_close(g, w)
    grad = one.grad if form == "list of one [K, B, C]" else torch.stack([p.grad for p in leaves])
    assert_fp32_close(grad, stacked.grad)
