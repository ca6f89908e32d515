"""The reference maths against independent per-element float64 loops and torch's own losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from naive import naive_mix, naive_mixed_kd_loss

from metamixer_fast import reference


def _label_plan(batch: int, classes: int, m: int, g: torch.Generator):
    labels = torch.randint(0, classes, (batch, m), generator=g)
    weights = torch.rand(batch, m, generator=g, dtype=torch.float64) + 0.1
    return labels, weights / weights.sum(1, keepdim=True)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("m", [1, 4])
def test_mixed_kd_loss_matches_naive(mode, k, eps, m, rng):
    batch, classes, temperature = 3, 7, 2.5
    z = torch.randn(k, batch, classes, generator=rng, dtype=torch.float64) * 3
    labels, weights = _label_plan(batch, classes, m, rng)
    ce, kd = reference.mixed_kd_loss(z, labels, weights, temperature, eps, mode)
    want_ce, want_kd = naive_mixed_kd_loss(z, labels, weights, temperature, eps, mode, None)
    torch.testing.assert_close(ce, torch.tensor(want_ce, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kd, torch.tensor(want_kd, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_ensemble_with_peer_matrix_matches_naive(rng):
    k, batch, classes = 4, 5, 6
    z = torch.randn(k, batch, classes, generator=rng, dtype=torch.float64)
    a = torch.rand(k, k, generator=rng, dtype=torch.float64)
    a[0, 1] = 0.0
    labels, weights = _label_plan(batch, classes, 2, rng)
    _, kd = reference.mixed_kd_loss(z, labels, weights, 3.0, 0.0, "ensemble", a)
    _, want_kd = naive_mixed_kd_loss(z, labels, weights, 3.0, 0.0, "ensemble", a)
    torch.testing.assert_close(kd, torch.tensor(want_kd, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_masked_logits_match_naive_and_stay_finite(mode, rng):
    k, batch, classes = 3, 4, 9
    z = torch.randn(k, batch, classes, generator=rng, dtype=torch.float64)
    z[:, :, [2, 5]] = float("-inf")  # classes masked in every peer
    labels = torch.tensor([[0], [1], [3], [8]])
    weights = torch.ones(batch, 1, dtype=torch.float64)
    zr = z.clone().requires_grad_(True)
    ce, kd = reference.mixed_kd_loss(zr, labels, weights, 2.0, 0.0, mode)
    want_ce, want_kd = naive_mixed_kd_loss(z, labels, weights, 2.0, 0.0, mode, None)
    torch.testing.assert_close(ce.detach(), torch.tensor(want_ce, dtype=torch.float64))
    torch.testing.assert_close(kd.detach(), torch.tensor(want_kd, dtype=torch.float64))
    (ce.sum() + kd.sum()).backward()
    assert torch.isfinite(zr.grad).all()
    assert (zr.grad[:, :, [2, 5]] == 0).all()


def test_single_class_gives_zero_loss():
    z = torch.randn(3, 4, 1, dtype=torch.float64)
    labels = torch.zeros(4, 1, dtype=torch.int64)
    ce, kd = reference.mixed_kd_loss(z, labels, torch.ones(4, 1, dtype=torch.float64), 2.0, 0.1)
    assert (ce == 0).all() and (kd == 0).all()


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_ce_equals_torch_cross_entropy(eps, rng):
    z = torch.randn(2, 6, 11, generator=rng, dtype=torch.float64)
    y = torch.randint(0, 11, (6,), generator=rng)
    ce, _ = reference.mixed_kd_loss(z, y[:, None], torch.ones(6, 1, dtype=torch.float64), 1.0, eps)
    for k in range(2):
        torch.testing.assert_close(ce[k], F.cross_entropy(z[k], y, label_smoothing=eps))


def test_nan_logits_propagate():
    z = torch.randn(2, 3, 4, dtype=torch.float64)
    z[1, 0, 2] = float("nan")
    labels = torch.zeros(3, 1, dtype=torch.int64)
    for mode in ("pairwise", "ensemble"):
        ce, kd = reference.mixed_kd_loss(z, labels, torch.ones(3, 1), 2.0, 0.0, mode)
        assert torch.isnan(ce[1]) and torch.isnan(kd).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
@pytest.mark.parametrize("features", [False, True])
def test_mix_matches_naive(dtype, features, rng):
    n = 5
    shape = (n, 6) if features else (n, 2, 5, 4)
    x = (torch.rand(shape, generator=rng) * 255).to(dtype)
    src = torch.randint(0, n, (n,), generator=rng)  # repeats allowed
    w = torch.rand(n, generator=rng)
    w[0] = 0.0
    box = None
    if not features:
        box = torch.tensor([[0, 5, 0, 4], [1, 3, 2, 4], [2, 2, 0, 4], [0, 1, 3, 4], [4, 5, 1, 2]])
    out = reference.mix(x, src, w, box)
    assert out.dtype == dtype and out.shape == x.shape
    want = naive_mix(x, src, w, box)
    # uint8 blends round in float32 here and in float64 in the loops: a tie may differ by 1.
    rtol, atol = {torch.uint8: (0, 1.0), torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12)}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
    assert torch.equal(out[0].double(), want[0])  # w = 0 rows are exact copies in every dtype
