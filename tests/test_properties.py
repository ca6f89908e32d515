"""Property-based tests of the ops on every backend present, against the float64 reference.

Hypothesis draws shapes, modes, hyper-parameters, dtypes, masks, layouts and a seed for the
tensor values. The bounded profile (``ci``, the default) runs in CI; ``HYPOTHESIS_PROFILE=long
pytest tests/test_properties.py`` runs many more examples.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metamixer_fast as mf
from metamixer_fast import reference

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FP_TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12)}


def _logits(seed: int, k: int, b: int, c: int, dtype: torch.dtype, layout: str, masked: bool):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(k, b, c, generator=g, dtype=torch.float64) * 3
    if masked and c > 1:
        z[:, :, torch.randint(0, c, (1,), generator=g)] = float("-inf")
    z = z.to(dtype)
    if layout == "transposed":  # strided peers: [K, C, B] storage viewed as [K, B, C]
        z = z.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "list":
        return [p.clone() for p in z.unbind(0)], z
    return [z], z


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 5), b=st.integers(1, 6),
       c=st.integers(1, 40), m=st.integers(1, 3), mode=st.sampled_from(["pairwise", "ensemble"]),
       temperature=st.floats(0.5, 5.0), eps=st.sampled_from([0.0, 0.1]),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(["stacked", "list", "transposed"]), masked=st.booleans(),
       detach=st.booleans(), custom_peers=st.booleans())
def test_mixed_kd_loss_matches_reference(loss_backend, seed, k, b, c, m, mode, temperature, eps,
                                         dtype, layout, masked, detach, custom_peers):
    g = torch.Generator().manual_seed(seed + 1)
    peers, z = _logits(seed, k, b, c, dtype, layout, masked)
    labels = torch.randint(0, c, (b, m), generator=g)
    weights = torch.rand(b, m, generator=g, dtype=torch.float64) + 0.05
    weights = weights / weights.sum(1, keepdim=True)
    peer_matrix = None
    if mode == "ensemble" and custom_peers:
        peer_matrix = torch.rand(k, k, generator=g, dtype=torch.float64).to(dtype)
    if masked and eps > 0:
        eps = 0.0  # smoothing over a masked class is +inf by definition: nothing to compare
    grad_ce, grad_kd = torch.randn(2, k, generator=g, dtype=torch.float64)

    leaves = [p.detach().requires_grad_(True) for p in peers]
    ce, kd = mf.mixed_kd_loss(leaves if len(leaves) > 1 else leaves[0], labels, weights.to(dtype),
                              temperature=temperature, label_smoothing=eps, mode=mode,
                              peer_matrix=peer_matrix, detach_targets=detach)
    grads = torch.autograd.grad((ce, kd), leaves, (grad_ce.to(ce.dtype), grad_kd.to(kd.dtype)))
    dz = torch.stack(grads) if len(grads) > 1 else grads[0]

    z64 = z.detach().double().requires_grad_(True)
    want_ce, want_kd = reference.mixed_kd_loss(
        z64, labels, weights, temperature, eps, mode,
        None if peer_matrix is None else peer_matrix.double(), detach)
    (want_dz,) = torch.autograd.grad((want_ce, want_kd), z64, (grad_ce, grad_kd))
    rtol, atol = FP_TOL[dtype]
    kd_scale, dz_scale = _rounding_scales(z64.detach(), temperature, float(grad_kd.abs().max()), want_dz)
    torch.testing.assert_close(ce.double(), want_ce, rtol=rtol, atol=atol)
    torch.testing.assert_close(kd.double(), want_kd, rtol=rtol, atol=atol + rtol * kd_scale)
    torch.testing.assert_close(dz.double(), want_dz, rtol=rtol, atol=atol + rtol * dz_scale)


def _rounding_scales(z: torch.Tensor, temperature: float, grad_kd: float,
                     want_dz: torch.Tensor) -> tuple[float, float]:
    """The scales whose rounding the KD value and the logit gradient carry, for DESIGN's rtol.

    KD is T^2 times a difference of cross-entropies, built from log-probabilities and logit
    differences over T; where the peers nearly agree (or C = 1) it cancels to far below those
    terms, so its float32 rounding is of T^2 max(|z| / T, |log q|), not of its own size (the
    reference itself, run in float32, is off by 4e-5 relative there). A gradient entry is a
    difference of O(max) terms, and the targets' part q (log q - log p) / T, times T^2 grad_kd,
    carries the rounding of the log-probabilities, |z| / T, times T |grad_kd|.
    """
    finite = z[z.isfinite()]
    if finite.numel() == 0:
        return 0.0, 0.0
    logit_scale = float(finite.abs().max()) / temperature
    log_q = torch.log_softmax(z / temperature, -1)
    kd_scale = temperature**2 * max(logit_scale, float(log_q[log_q.isfinite()].abs().max()))
    dz_scale = max(float(want_dz.abs().max()), temperature * grad_kd * logit_scale)
    return kd_scale, dz_scale


@st.composite
def mix_case(draw):
    n = draw(st.integers(1, 5))
    features = draw(st.booleans())
    shape = (n, draw(st.integers(1, 9))) if features else \
        (n, draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    src = draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=n))  # repeats allowed
    w = draw(st.lists(st.sampled_from([0.0, 1.0, 0.25]) | st.floats(0, 1), min_size=n, max_size=n))
    box = None
    if not features and draw(st.booleans()):
        h, wd = shape[-2:]
        box = []
        for _ in range(n):
            y0, y1 = sorted(draw(st.lists(st.integers(0, h), min_size=2, max_size=2)))
            x0, x1 = sorted(draw(st.lists(st.integers(0, wd), min_size=2, max_size=2)))
            box.append([y0, y1, x0, x1])
    dtype = draw(st.sampled_from([torch.uint8, torch.float32, torch.float64, torch.bfloat16]))
    channels_last = not features and draw(st.booleans())
    return shape, src, w, box, dtype, channels_last, draw(st.integers(0, 2**31 - 1))


@given(case=mix_case())
def test_mix_matches_reference(mix_backend, case):
    shape, src, w, box, dtype, channels_last, seed = case
    g = torch.Generator().manual_seed(seed)
    x64 = torch.rand(shape, generator=g, dtype=torch.float64) * (255 if dtype == torch.uint8 else 4)
    x = x64.round().to(dtype) if dtype == torch.uint8 else x64.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    src_t, w_t = torch.tensor(src), torch.tensor(w, dtype=torch.float32)
    box_t = None if box is None else torch.tensor(box)
    before = x.clone()
    out = mf.mix(x, src_t, w_t, box_t)
    assert torch.equal(x, before)  # never mutated
    assert out.dtype == x.dtype and out.shape == x.shape
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    same_dtype = reference.mix(x, src_t, w_t, box_t)  # the reference, computed as DESIGN defines
    if dtype in (torch.uint8, torch.bfloat16):
        # blends computed in float32 then rounded once: equal to the reference up to one rounding
        # step where the float32 results differ in their last bit
        step = 1.0 if dtype == torch.uint8 else 2 ** -7 * max(1.0, float(same_dtype.double().abs().max()))
        assert (out.double() - same_dtype.double()).abs().max() <= step
    else:
        exact = reference.mix(x.double(), src_t, w_t.double(), box_t)
        rtol, atol = FP_TOL[dtype]
        torch.testing.assert_close(out.double(), exact, rtol=rtol, atol=atol)
    copies = (w_t == 0) | (w_t == 1)
    assert torch.equal(out[copies], same_dtype[copies])  # copies are exact in every dtype

    if dtype in (torch.float32, torch.float64):
        xr = x.detach().requires_grad_(True)
        wr = w_t.to(dtype).requires_grad_(True)
        grad = torch.randn(shape, generator=g, dtype=torch.float64)
        dx, dw = torch.autograd.grad(mf.mix(xr, src_t, wr, box_t), (xr, wr), grad.to(dtype))
        x64r = x.detach().double().requires_grad_(True)
        w64 = w_t.double().requires_grad_(True)
        want_dx, want_dw = torch.autograd.grad(reference.mix(x64r, src_t, w64, box_t), (x64r, w64), grad)
        rtol, atol = FP_TOL[dtype]
        torch.testing.assert_close(dx.double(), want_dx, rtol=rtol, atol=atol * 10)
        torch.testing.assert_close(dw.double(), want_dw, rtol=rtol, atol=atol * 100 * max(1, x[0].numel()))


pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
