"""The Triton kernels of metamixer::mixed_kd_loss, run on CPU by the Triton interpreter, against
the float64 reference (fresh random inputs each run; shapes small so the interpreter is quick)."""

from __future__ import annotations

import pytest
import torch
from loss_autograd import (
    assert_results_close,
    flat_results,
    grad_outputs,
    ours_with_grads,
    reference_with_grads,
)
from test_mixed_kd_loss_kernels import assert_fp32_close, zero_kd_tolerances

import metamixer_fast as mf
from metamixer_fast import _backend, reference

pytest.importorskip("triton")
from metamixer_fast.kernels import mixed_kd_loss as tk

MODES = ["pairwise", "ensemble"]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch) -> None:
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    assert _backend.backend_for("mixed_kd_loss", torch.device("cpu")) == "triton"


def _inputs(k, b, c, m, g, dtype=torch.float64):
    z = torch.randn(k, b, c, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, c, (b, m), generator=g)
    weights = torch.rand(b, m, generator=g, dtype=torch.float64) + 0.1
    return z.to(dtype), labels, weights / weights.sum(1, keepdim=True)


def _peer_matrix(k, g, with_zeros=True):
    a = torch.rand(k, k, generator=g, dtype=torch.float64)
    if with_zeros:
        a[0, k - 1] = 0.0
    return a


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("k,b,c,m,eps,t", [
    (2, 1, 1, 1, 0.0, 1.0),       # C = 1, B = 1
    (3, 5, 7, 2, 0.1, 2.0),       # packed rows
    (5, 3, 33, 4, 0.2, 0.7),      # K not a power of two
    (4, 3, 1271, 3, 0.05, 3.0),   # chunked online softmax, tail chunk
    (8, 2, 100, 2, 0.1, 4.0),     # K = 8
])
def test_fp32_matches_float64_reference(mode, detach, k, b, c, m, eps, t, rng):
    z, labels, weights = _inputs(k, b, c, m, rng, torch.float32)
    gce, gkd = grad_outputs(k, rng)
    pm = _peer_matrix(k, rng) if mode == "ensemble" and k % 2 else None
    kw = dict(temperature=t, label_smoothing=eps, mode=mode, detach_targets=detach)
    got = ours_with_grads(z, labels, weights.float(), gce.float(), gkd.float(),
                peer_matrix=None if pm is None else pm.float(), **kw)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[2][0].dtype == torch.float32
    assert_results_close(got, reference_with_grads(z, labels, weights, gce, gkd, peer_matrix=pm, **kw))


def test_packed_and_chunked_paths_are_both_covered():
    """The shapes above and below run both launch shapes: several rows per program with the whole
    row in one tile, and one row per program walking chunks of classes (incl. C = 32768)."""
    for backward in (False, True):
        for ensemble in (False, True):
            _, block_c, rows, _ = tk.launch_config(3, 7, ensemble, backward)
            assert block_c >= 7 and rows > 1
            for k, c in ((4, 1271), (2, 32768)):
                _, block_c, rows, _ = tk.launch_config(k, c, ensemble, backward)
                assert block_c < c and rows == 1


@pytest.mark.parametrize("mode,detach", [("pairwise", True), ("ensemble", False)])
def test_large_c(mode, detach, rng):
    z, labels, weights = _inputs(2, 1, 32768, 2, rng, torch.float32)
    gce, gkd = grad_outputs(2, rng)
    kw = dict(temperature=2.0, label_smoothing=0.1, mode=mode, detach_targets=detach)
    got = ours_with_grads(list(z.unbind(0)), labels, weights.float(), gce.float(), gkd.float(), **kw)
    assert_results_close(got, reference_with_grads(list(z.unbind(0)), labels, weights, gce, gkd, **kw))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("detach", [True, False])
def test_float64_accumulates_in_float64(mode, detach, rng):
    z, labels, weights = _inputs(3, 3, 1300, 2, rng)  # chunked: the online rescaling in fp64
    gce, gkd = grad_outputs(3, rng)
    kw = dict(temperature=0.7, label_smoothing=0.1, mode=mode, detach_targets=detach)
    got = ours_with_grads(list(z.unbind(0)), labels, weights, gce, gkd, **kw)
    want = reference_with_grads(list(z.unbind(0)), labels, weights, gce, gkd, **kw)
    for a, b in zip(flat_results(got), flat_results(want)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_within_twice_the_reference_error(dtype, mode, rng):
    z, labels, weights = _inputs(3, 4, 300, 2, rng, dtype)
    gce, gkd = grad_outputs(3, rng)
    kw = dict(temperature=2.0, label_smoothing=0.1, mode=mode, detach_targets=False)
    got = ours_with_grads(z, labels, weights.float(), gce.float(), gkd.float(), **kw)
    assert got[2][0].dtype == dtype
    oracle = reference_with_grads(z, labels, weights, gce, gkd, **kw)
    same_dtype = reference_with_grads(z, labels, weights, gce, gkd, dtype=dtype, **kw)
    for ours, want, ref_low in zip(*map(flat_results, (got, oracle, same_dtype))):
        err = (ours.double() - want).abs().max()
        allowed = 2 * (ref_low.double() - want).abs().max() + 1e-6 * want.abs().max()
        assert err <= allowed, (err, allowed)


def _layouts(k, b, c, g):
    """Logits in every form the op accepts, none of them a plain contiguous [K, B, C] tensor."""
    yield torch.randn(b, k, c, generator=g).transpose(0, 1)           # [K, B, C], B-major
    yield torch.randn(k, b, 2 * c, generator=g)[:, :, ::2]             # stride_c = 2
    yield [torch.randn(c, b, generator=g).t() for _ in range(k)]       # K [B, C], column-major
    yield [torch.randn(b, c, generator=g) for _ in range(k)]           # K separate allocations
    yield [torch.randn(b, c, generator=g)] + [torch.randn(c, b, generator=g).t()
                                              for _ in range(k - 1)]   # mixed strides


@pytest.mark.parametrize("mode", MODES)
def test_noncontiguous_and_separate_peers(mode, rng):
    k, b, c = 3, 4, 9
    _, labels, weights = _inputs(k, b, c, 2, rng)
    gce, gkd = grad_outputs(k, rng)
    kw = dict(temperature=2.0, label_smoothing=0.1, mode=mode, detach_targets=False)
    for peers in _layouts(k, b, c, rng):
        got = ours_with_grads(peers, labels, weights.float(), gce.float(), gkd.float(), **kw)
        shapes = [p.shape for p in peers] if isinstance(peers, list) else [peers.shape]
        assert [g.shape for g in got[2]] == shapes
        ref_peers = [p.double() for p in peers] if isinstance(peers, list) else peers.double()
        assert_results_close(got, reference_with_grads(ref_peers, labels, weights, gce, gkd, **kw))


@pytest.mark.parametrize("mode", MODES)
def test_separate_peers_are_not_stacked(mode, rng, monkeypatch):
    k, b, c = 4, 3, 40
    z, labels, weights = _inputs(k, b, c, 1, rng, torch.float32)
    peers = [p.clone().requires_grad_(True) for p in z.unbind(0)]

    def no_copies(*args, **kwargs):
        raise AssertionError("the Triton path copied the peers into one tensor")

    monkeypatch.setattr(torch, "stack", no_copies)
    monkeypatch.setattr(torch, "cat", no_copies)
    ce, kd = mf.mixed_kd_loss(peers, labels, weights.float(), temperature=2.0, mode=mode,
                              detach_targets=False)
    (ce.sum() + kd.sum()).backward()
    monkeypatch.undo()
    assert all(p.grad is not None and p.grad.shape == (b, c) for p in peers)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("detach", [True, False])
def test_identical_peers_give_zero_kd_and_zero_kd_gradient(mode, detach, rng):
    k, b, c = 4, 3, 50
    z, labels, weights = _inputs(1, b, c, 1, rng, torch.float32)
    peers = [z[0].clone() for _ in range(k)]
    gkd = torch.randn(k, generator=rng)
    _, kd, grads = ours_with_grads(peers, labels, weights.float(), torch.zeros(k), gkd, temperature=3.0,
                          mode=mode, detach_targets=detach)
    kd_tol, grad_tol = zero_kd_tolerances(3.0, gkd.abs().max().item())
    torch.testing.assert_close(kd, torch.zeros(k), rtol=0, atol=kd_tol)
    for grad in grads:
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=grad_tol)


@pytest.mark.parametrize("which", ["ce", "kd"])
@pytest.mark.parametrize("mode", MODES)
def test_gradient_of_ce_alone_and_kd_alone(which, mode, rng):
    z, labels, weights = _inputs(3, 4, 20, 2, rng, torch.float32)
    g = torch.randn(3, generator=rng, dtype=torch.float64) * 3
    gce, gkd = (g, torch.zeros(3, dtype=torch.float64)) if which == "ce" else \
        (torch.zeros(3, dtype=torch.float64), g)
    kw = dict(temperature=2.0, label_smoothing=0.1, mode=mode, detach_targets=False)
    got = ours_with_grads(z, labels, weights.float(), gce.float(), gkd.float(), **kw)
    assert_results_close(got, reference_with_grads(z, labels, weights, gce, gkd, **kw))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("c", [12, 1300])
def test_neg_inf_logits_masked_in_every_peer(mode, detach, c, rng):
    z, labels, weights = _inputs(3, 3, c, 2, rng, torch.float32)
    masked = torch.tensor([1, 5, c - 1])
    z[:, :, masked] = float("-inf")
    labels[labels == 1] = 0
    labels[labels == 5] = 0
    labels[labels == c - 1] = 0
    gce, gkd = grad_outputs(3, rng)
    kw = dict(temperature=2.0, mode=mode, detach_targets=detach)
    got = ours_with_grads(z, labels, weights.float(), gce.float(), gkd.float(), **kw)
    assert all(torch.isfinite(t).all() for t in flat_results(got))
    assert_results_close(got, reference_with_grads(z, labels, weights, gce, gkd, **kw))
    # Label smoothing spreads mass onto the masked classes too: ce is +inf, as in the reference.
    ce, _, _ = ours_with_grads(z, labels, weights.float(), gce.float(), gkd.float(), label_smoothing=0.1,
                     **kw)
    assert torch.isinf(ce).all()


@pytest.mark.parametrize("mode", MODES)
def test_neg_inf_in_one_peer(mode, rng):
    """A class masked in peer 0 only: peer 0 as the student of a target that keeps the class has
    kd = +inf; as a target (p_0 = 0 there) it adds nothing. In ensemble mode the peer matrix
    leaves peer 0 out of every target, so its -inf is never multiplied: no NaN anywhere."""
    z, labels, weights = _inputs(3, 2, 10, 1, rng, torch.float32)
    z[0, :, 4] = float("-inf")
    labels[labels == 4] = 0
    gce, gkd = grad_outputs(3, rng)
    pm = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    kw = dict(temperature=2.0, mode=mode, detach_targets=True,
              peer_matrix=pm if mode == "ensemble" else None)
    got = ours_with_grads(z, labels, weights.float(), gce.float(), gkd.float(),
                **{**kw, "peer_matrix": None if kw["peer_matrix"] is None else pm.float()})
    want = reference_with_grads(z, labels, weights, gce, gkd, **kw)
    assert torch.isinf(got[1][0]) and torch.isfinite(got[1][1:]).all()
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[2])
    assert_results_close(got, want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("c", [9, 1300])
def test_nan_in_nan_out(mode, c, rng):
    z, labels, weights = _inputs(3, 3, c, 2, rng, torch.float32)
    z[1, 0, c // 2] = float("nan")
    gce, gkd = grad_outputs(3, rng)
    kw = dict(temperature=2.0, mode=mode, detach_targets=False)
    got = ours_with_grads(z, labels, weights.float(), gce.float(), gkd.float(), **kw)
    want = reference_with_grads(z, labels, weights, gce, gkd, **kw)
    assert torch.isnan(got[0][1]) and torch.isnan(got[1]).any()
    for a, b in zip(flat_results(got), flat_results(want)):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert_results_close(got, want)


def test_more_than_eight_peers_is_a_clear_error(rng):
    z, labels, weights = _inputs(9, 2, 5, 1, rng, torch.float32)
    with pytest.raises(ValueError, match=r"at most 8 peers.*METAMIXER_BACKEND=reference"):
        mf.mixed_kd_loss(list(z.unbind(0)), labels, weights.float())


def test_values_are_checked_in_the_kernel(rng):
    """The op body leaves the checks of values to the Triton kernel (kernels/_flag.py): a bad
    label, weight or row sum is flagged there, the call raises naming the argument (reading no
    logit out of bounds), and the next call is unaffected."""
    if not _backend.triton_interpreted():
        pytest.skip("the kernel on CPU tensors (on a GPU a bad value stops the process's CUDA "
                    "work: test_cuda.py::test_a_bad_value_on_cuda_fails_the_call_with_its_message "
                    "checks that in a fresh process)")
    assert tk.mixed_kd_loss_forward.checks_values
    z = torch.randn(3, 4, 10, generator=rng)
    labels = torch.tensor([[1, 2], [2, 3], [9, 0], [0, 5]])
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75], [0.5, 0.5]])
    bad = {"'labels'": (labels.clone().index_put_((torch.tensor(2), torch.tensor(0)),
                                                  torch.tensor(10)), weights),
           "'weights' must be finite": (labels, weights.clone().index_fill_(0, torch.tensor([3]),
                                                                          -0.5)),
           "must sum to 1": (labels, weights * 1.01)}
    for message, (lab, wt) in bad.items():
        with pytest.raises(ValueError, match=message):
            tk.mixed_kd_loss_forward([z], lab, wt, 2.0, 0.0, "pairwise", None, True)
        with pytest.raises(ValueError, match=message):
            mf.mixed_kd_loss(z, lab, wt, temperature=2.0)
    ce, kd = mf.mixed_kd_loss(z, labels, weights, temperature=2.0)
    ce_ref, kd_ref = reference.mixed_kd_loss(z.double(), labels, weights.double(), 2.0, 0.0,
                                             "pairwise")
    assert_fp32_close(ce, ce_ref)
    assert_fp32_close(kd, kd_ref)


# ---------------------------------------------------------------- per-peer offsets of the logits
# (the offset tests of every backend are in test_loss_offsets.py)

def test_kd_at_offsets_covers_the_chunked_online_path():
    """The online rescaling of the offset-free sums (their shift when a running max moves) runs
    only when a row spans chunks: the shapes of test_loss_offsets.py do, for both K."""
    for k in (2, 3):
        for ensemble in (False, True):
            _, block_c, rows, _ = tk.launch_config(k, 4099, ensemble, False)
            assert block_c < 4099 and rows == 1
            _, block_c, _, _ = tk.launch_config(3, 1271, ensemble, False)
            assert block_c < 1271


# ------------------------------------------------------- a common offset of the logits (row stats)

def _exact_ensemble(k):
    """A peer matrix whose targets E_k are one peer each (E exact in fp32 at any offset), or
    None for the default mean of the others where that is exact too (K = 2). With the default
    matrix of K = 3 the fp32 sum 0.5 z_1 + 0.5 z_2 itself rounds by ulp(offset), in the float32
    reference as much as here, so it cannot be judged by the fp32 rule at these offsets."""
    if k == 2:
        return None
    return torch.roll(torch.eye(k, dtype=torch.float64), 1, dims=1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("k,c", [(2, 8), (3, 8), (2, 1271), (3, 1271)])
@pytest.mark.parametrize("offset,t", [(1000.0, 1.0), (1e4, 0.5)])
def test_gradient_at_a_large_common_offset(mode, detach, k, c, offset, t, rng):
    """Logits ~ offset: the backward rebuilds s, p, q from the float64 row stats around fp32
    anchors near the logits, so nothing of size z / T ~ offset / T is subtracted in fp32 (an fp32
    lse ~ 1000 alone carries ulp(1000) = 6e-5 into every softmax: ~2e-5 relative at 1000, ~1e-3
    at 2e4). The float32 reference meets the same fp32 rule here."""
    z, labels, weights = _inputs(k, 2, c, 2, rng)
    z = (z + offset).float()
    gce, gkd = grad_outputs(k, rng)
    pm = _exact_ensemble(k) if mode == "ensemble" else None
    # (no label smoothing: the forward's eps term sums the raw logits, ~C * offset, in fp32)
    kw = dict(temperature=t, mode=mode, detach_targets=detach)
    got = ours_with_grads(z, labels, weights.float(), gce.float(), gkd.float(),
                peer_matrix=None if pm is None else pm.float(), **kw)
    want = reference_with_grads(z, labels, weights, gce, gkd, peer_matrix=pm, **kw)
    fp32_ref = reference_with_grads(z, labels, weights, gce, gkd, peer_matrix=pm, dtype=torch.float32, **kw)
    assert_results_close(fp32_ref, want)
    assert_results_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_row_stats_are_float64(dtype, mode, rng):
    """row_stats (the op's third output) is float64 for every logits dtype, and as precise as the
    forward has it: lse ~ 1000 to ~1e-6, not to the ulp(1000) = 6e-5 of an fp32 value (the
    ensemble targets of ``_exact_ensemble``, exact in fp32, so that lseE is judged alone)."""
    k, c, t = 3, 40, 0.5
    z, labels, weights = _inputs(k, 4, c, 2, rng)
    z = (z + 1000.0).to(dtype)
    pm = _exact_ensemble(k).float() if mode == "ensemble" else None
    _, _, stats = torch.ops.metamixer.mixed_kd_loss(list(z.unbind(0)), labels, weights.float(),
                                                    t, 0.0, mode, pm, True)
    assert stats.dtype == torch.float64 and stats.shape == (k, 4, 3)
    want = reference.row_stats(z.double(), t, mode, None if pm is None else pm.double())
    torch.testing.assert_close(stats, want, rtol=0, atol=2e-6)
