"""mixed_kd_loss on every CPU backend where the peers' logits differ by a constant per row:
softmax ignores such an offset, so kd must too, to the fp32 rule."""

from __future__ import annotations

import pytest
import torch
from loss_autograd import assert_results_close, grad_outputs, ours_with_grads, reference_with_grads

import metamixer_fast as mf
from metamixer_fast import reference

MODES = ["pairwise", "ensemble"]

# softmax(z_k / T) does not see a constant added to all of peer k's logits, so neither may kd.
# The forward once formed each KL as sum_c p_j (z_j - z_k) / T - (lseT_j - lseT_k): both terms
# carry the offsets / T and cancelled in fp32 (kd off by ~1e-3 relative at an offset of 30).
#
# The bound: 1e-5 relative plus a floor of a few fp32 roundings of each log-ratio, times T^2
# (kd = T^2 KL; KL is a difference of O(1) logs). The float32 reference on the same input must
# pass it too, so it asks for no more than fp32 can give. The inputs are seeded rather than
# fresh: the float32 reference's own error reaches ~4 eps T^2 on some random draws, which would
# make that second assertion flaky.

_EPS32 = torch.finfo(torch.float32).eps
_OFFSETS = [(0.0, 30.0), (-50.0, 20.0, 7.0)]


def _offset_peers(offsets, b, c, g, sigma=0.1):
    """[K, B, C] float32 peers: one shared row, a constant per peer, and noise of size sigma (small,
    so kd is small and an error of the size of the offsets' rounding shows)."""
    base = torch.randn(b, c, generator=g, dtype=torch.float64) * 2
    return torch.stack([base + o + sigma * torch.randn(b, c, generator=g, dtype=torch.float64)
                        for o in offsets]).float()


def _assert_kd_close_at_offset(kd, z, t, **kw):
    """kd (ours) within 1e-5 relative + 4 eps T^2 of the float64 reference; the float32
    reference on the same input passes the same bound."""
    b = z.shape[1]
    labels, weights = torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.float64)
    pm = kw.pop("peer_matrix", None)
    _, want = reference.mixed_kd_loss(z.double(), labels, weights, t, 0.0, peer_matrix=pm, **kw)
    _, ref32 = reference.mixed_kd_loss(z, labels, weights.float(), t, 0.0,
                                       peer_matrix=None if pm is None else pm.float(), **kw)
    allowed = 1e-5 * want.abs() + 4 * _EPS32 * t * t
    for name, got in (("ours", kd), ("float32 reference", ref32)):
        err = (got.double() - want).abs()
        assert (err <= allowed).all(), (name, err.tolist(), allowed.tolist(), want.tolist())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t", [1.0, 4.0])
@pytest.mark.parametrize("offsets", _OFFSETS)
@pytest.mark.parametrize("c", [100, 1271, 4099])  # 4099: chunked for K = 2 too
def test_kd_is_invariant_to_per_peer_offsets(loss_backend, mode, t, offsets, c):
    g = torch.Generator().manual_seed(1000 * c + 10 * len(offsets) + int(t))
    z = _offset_peers([o * t for o in offsets], 4, c, g)  # offsets of z / T: (0, 30), ...
    _, kd = mf.mixed_kd_loss(z, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1),
                             temperature=t, mode=mode)
    _assert_kd_close_at_offset(kd, z, t, mode=mode)


def test_kd_at_a_per_peer_offset_the_bug_report(loss_backend):
    """The reported case: peer 1 = peer 0 + 30 + small noise; kd was 1e-3 relative off."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 100, generator=g) * 3
    z = torch.stack([base, base + 30 + 0.1 * torch.randn(4, 100, generator=g)])
    for mode in MODES:
        _, kd = mf.mixed_kd_loss(z, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1),
                                 temperature=1.0, mode=mode)
        _assert_kd_close_at_offset(kd, z, 1.0, mode=mode)


@pytest.mark.parametrize("t", [1.0, 4.0])
@pytest.mark.parametrize("c", [100, 1271])
def test_ensemble_kd_with_a_large_peer_matrix(loss_backend, t, c):
    """A = 100 * rand: the ensemble logits E_k reach hundreds times the logits; kd must not
    carry their maxima through a cancellation (V = sum q (E - z_k) against lseE - lseT)."""
    g = torch.Generator().manual_seed(0)
    z = _offset_peers([o * t for o in _OFFSETS[1]], 4, c, g, sigma=1.0)
    a = 100 * torch.rand(3, 3, generator=g, dtype=torch.float64)
    _, kd = mf.mixed_kd_loss(z, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1),
                             temperature=t, mode="ensemble", peer_matrix=a.float())
    _assert_kd_close_at_offset(kd, z, t, mode="ensemble", peer_matrix=a)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t", [1.0, 4.0])
@pytest.mark.parametrize("offsets", _OFFSETS)
def test_gradient_not_detached_at_per_peer_offsets(loss_backend, mode, t, offsets, rng):
    """ce, kd and the gradient with targets not detached, at offsets, by the fp32 rule against the
    float64 reference (the float32 reference passes the same rule)."""
    k, b, c = len(offsets), 3, 1271
    z = _offset_peers([o * t for o in offsets], b, c, rng, sigma=1.0)  # kd of O(1): the fp32 rule
    labels = torch.randint(0, c, (b, 2), generator=rng)
    weights = torch.full((b, 2), 0.5, dtype=torch.float64)
    gce, gkd = grad_outputs(k, rng)
    kw = dict(temperature=t, label_smoothing=0.1, mode=mode, detach_targets=False)
    got = ours_with_grads(z, labels, weights.float(), gce.float(), gkd.float(), **kw)
    want = reference_with_grads(z, labels, weights, gce, gkd, **kw)
    assert_results_close(got, want)
    assert_results_close(reference_with_grads(z, labels, weights, gce, gkd, dtype=torch.float32, **kw), want)


# ------------------------------------------------------- a large common offset in the backward
# The backward rebuilds its softmaxes from the forward's per-row log-sum-exps (row_stats). Kept
# in fp32, an lse of ~1000 carried an absolute rounding of ~6e-5 into every probability; they
# are float64, and the backward takes the logits relative to an anchor near them.

def _op_loss(z, labels, weights, *, temperature, label_smoothing, mode, peer_matrix,
             detach_targets):
    """The custom op itself (no eager shortcut: the backward reads row_stats on every backend)."""
    ce, kd, _ = torch.ops.metamixer.mixed_kd_loss([z], labels, weights.float(), temperature,
                                                  label_smoothing, mode, peer_matrix,
                                                  detach_targets)
    return ce, kd


@pytest.mark.parametrize("detach", [True, False])
# (At 1e4 the ensemble target sum_j A z_j itself rounds by ~1e-3 in fp32, and the float32
# reference misses the rule there: no fp32 kernel can be asked for it.)
@pytest.mark.parametrize("mode, offset, t", [("pairwise", 1000.0, 1.0), ("ensemble", 1000.0, 1.0),
                                             ("pairwise", 1e4, 0.5)])
@pytest.mark.parametrize("k, c", [(3, 8), (2, 1271)])
def test_gradient_at_a_large_common_offset(loss_backend, mode, detach, offset, t, k, c):
    g = torch.Generator().manual_seed(int(offset) + 10 * k + c)
    z = (torch.randn(k, 2, c, generator=g, dtype=torch.float64) * 2 + offset).float()
    labels = torch.randint(0, c, (2, 1), generator=g)
    weights = torch.ones(2, 1, dtype=torch.float64)
    gce, gkd = grad_outputs(k, g)
    kw = dict(temperature=t, label_smoothing=0.1, mode=mode, detach_targets=detach)
    want = reference_with_grads(z, labels, weights, gce, gkd, **kw)
    assert_results_close(ours_with_grads(z, labels, weights.float(), gce.float(), gkd.float(), **kw), want)
    assert_results_close(_run_op(z, labels, weights, gce, gkd, kw), want)
    assert_results_close(reference_with_grads(z, labels, weights, gce, gkd, dtype=torch.float32, **kw), want)


def _run_op(z, labels, weights, gce, gkd, kw):
    leaf = z.detach().clone().requires_grad_(True)
    ce, kd = _op_loss(leaf, labels, weights, peer_matrix=None, **kw)
    torch.autograd.backward((ce, kd), (gce.to(ce.dtype), gkd.to(kd.dtype)))
    return ce, kd, [leaf.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_stats_are_float64(loss_backend, dtype):
    z = torch.randn(2, 3, 5).to(dtype)
    labels, weights = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    *_, stats = torch.ops.metamixer.mixed_kd_loss([z], labels, weights, 2.0, 0.0, "pairwise", None,
                                                   True)
    assert stats.dtype == torch.float64 and stats.shape == (2, 3, 3)
    torch.testing.assert_close(stats, reference.row_stats(z.double(), 2.0, "pairwise", None),
                               rtol=1e-6, atol=1e-6)
