"""mixed_kd_loss under autograd, ours and the reference's, for the tests that compare them on
any backend: (ce, kd, [the gradient of each peer tensor]) for given output gradients."""

from __future__ import annotations

import torch
from test_mixed_kd_loss_kernels import assert_fp32_close

import metamixer_fast as mf
from metamixer_fast import reference


def run_with_grads(fn, peers, labels, weights, gce, gkd, **kw):
    """(ce, kd, [grad of each peer tensor]) of fn (the op or the reference) under autograd."""
    leaves = [p.detach().clone().requires_grad_(True) for p in peers] if isinstance(peers, list) \
        else [peers.detach().clone().requires_grad_(True)]
    logits = leaves if isinstance(peers, list) else leaves[0]
    ce, kd = fn(logits, labels, weights, **kw)
    torch.autograd.backward((ce, kd), (gce.to(ce.dtype), gkd.to(kd.dtype)))
    return ce, kd, [leaf.grad for leaf in leaves]


def ours_with_grads(peers, labels, weights, gce, gkd, *, temperature=1.0, label_smoothing=0.0,
                    mode="pairwise", peer_matrix=None, detach_targets=True):
    """The public ``mixed_kd_loss`` on the backend the test selected."""
    return run_with_grads(mf.mixed_kd_loss, peers, labels, weights, gce, gkd,
                          temperature=temperature, label_smoothing=label_smoothing, mode=mode,
                          peer_matrix=peer_matrix, detach_targets=detach_targets)


def reference_with_grads(peers, labels, weights, gce, gkd, *, temperature=1.0,
                         label_smoothing=0.0, mode="pairwise", peer_matrix=None,
                         detach_targets=True, dtype=torch.float64):
    """The reference with its arithmetic in ``dtype`` (float64: the oracle)."""
    cast = [p.to(dtype) for p in peers] if isinstance(peers, list) else peers.to(dtype)
    pm = None if peer_matrix is None else peer_matrix.to(dtype)
    return run_with_grads(lambda z, lab, w, **kw: reference.mixed_kd_loss(z, lab, w, **kw), cast,
                          labels, weights.to(dtype), gce, gkd, temperature=temperature,
                          label_smoothing=label_smoothing, mode=mode, peer_matrix=pm,
                          detach_targets=detach_targets)


def flat_results(result):
    """[ce, kd, grad of each peer tensor]."""
    ce, kd, grads = result
    return [ce, kd, *grads]


def assert_results_close(got, want):
    """(ce, kd, grads) in fp32 against the float64 reference, by the one fp32 rule."""
    for a, b in zip(flat_results(got), flat_results(want)):
        assert_fp32_close(a, b.detach())


def grad_outputs(k, g):
    """Random float64 gradients for ce[K] and kd[K]."""
    gce, gkd = torch.randn(2, k, generator=g, dtype=torch.float64)
    return gce, gkd
