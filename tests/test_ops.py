"""The registered ops: autograd, opcheck, torch.compile, layouts, on every CPU backend."""

from __future__ import annotations

import pytest
import torch

import metamixer_fast as mf
from metamixer_fast import reference


def _inputs(k, batch, classes, m, g, dtype=torch.float64):
    z = torch.randn(k, batch, classes, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, classes, (batch, m), generator=g)
    weights = torch.rand(batch, m, generator=g, dtype=torch.float64) + 0.1
    return z, labels, weights / weights.sum(1, keepdim=True)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
@pytest.mark.parametrize("as_list", [False, True])
def test_mixed_kd_loss_gradcheck(loss_backend, mode, as_list, rng):
    # Finite differences see the targets move, so only detach_targets=False is the true
    # derivative; the detached gradient is checked against autograd below. Small, as gradcheck
    # runs the op twice per logit and the interpreted Triton kernels take ~0.1 s a call.
    z, labels, weights = _inputs(3, 3, 4, 2, rng)
    if as_list:
        peers = [p.clone().requires_grad_(True) for p in z.unbind(0)]
    else:
        peers = [z.clone().requires_grad_(True)]

    def f(*logits):
        return mf.mixed_kd_loss(list(logits), labels, weights, temperature=2.0,
                                label_smoothing=0.1, mode=mode, detach_targets=False)

    assert torch.autograd.gradcheck(f, peers)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
@pytest.mark.parametrize("detach", [True, False])
def test_mixed_kd_loss_grad_equals_autograd_of_reference(loss_backend, mode, detach, rng):
    z, labels, weights = _inputs(4, 6, 9, 3, rng)
    grad_ce, grad_kd = torch.randn(2, 4, generator=rng, dtype=torch.float64)
    z1 = z.clone().requires_grad_(True)
    ce, kd = mf.mixed_kd_loss(z1, labels, weights, temperature=3.0, mode=mode, detach_targets=detach)
    torch.autograd.backward((ce, kd), (grad_ce, grad_kd))
    z2 = z.clone().requires_grad_(True)
    want_ce, want_kd = reference.mixed_kd_loss(z2, labels, weights, 3.0, 0.0, mode, None, detach)
    torch.autograd.backward((want_ce, want_kd), (grad_ce, grad_kd))
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(kd, want_kd)
    torch.testing.assert_close(z1.grad, z2.grad)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_mixed_kd_loss_opcheck(loss_backend, mode, rng):
    z, labels, weights = _inputs(3, 4, 6, 2, rng, torch.float32)
    peer_matrix = torch.rand(3, 3, generator=rng) if mode == "ensemble" else None
    for logits in ([z.requires_grad_(True)], [p.detach().requires_grad_(True) for p in z.unbind(0)]):
        args = (logits, labels, weights.float(), 2.0, 0.1, mode, peer_matrix, True)
        torch.library.opcheck(torch.ops.metamixer.mixed_kd_loss.default, args)


def test_mixed_kd_loss_compile_equals_eager(loss_backend, rng):
    z, labels, weights = _inputs(3, 8, 10, 2, rng, torch.float32)

    def step(logits):
        ce, kd = mf.mixed_kd_loss(logits, labels, weights, temperature=2.0)
        return ce.sum() + 0.5 * kd.sum()

    compiled = torch.compile(step, fullgraph=True)
    outs = []
    for fn in (step, compiled):
        zz = z.clone().requires_grad_(True)
        loss = fn(zz)
        loss.backward()
        outs.append((loss.detach(), zz.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_kd_loss_low_precision_returns_fp32(loss_backend, dtype, rng):
    z, labels, weights = _inputs(2, 4, 7, 1, rng, torch.float32)
    zz = z.to(dtype).requires_grad_(True)
    ce, kd = mf.mixed_kd_loss(zz, labels, weights, temperature=2.0)
    assert ce.dtype == kd.dtype == torch.float32
    (ce.sum() + kd.sum()).backward()
    assert zz.grad.dtype == dtype


def _mix_inputs(g):
    """Five 3x6x7 fp32 images; src with repeats (a scatter-add in backward); boxes full,
    partial and empty. (The gradcheck of mix is tests/test_mix_kernels.py::test_gradcheck.)"""
    x = torch.randn(5, 3, 6, 7, generator=g)
    src = torch.tensor([1, 1, 0, 4, 2])
    w = torch.rand(5, generator=g)
    box = torch.tensor([[0, 6, 0, 7], [1, 4, 2, 5], [2, 2, 0, 7], [0, 3, 3, 7], [5, 6, 6, 7]])
    return x, src, w, box


def test_mix_opcheck(mix_backend, rng):
    x, src, w, box = _mix_inputs(rng)
    for args in ((x.requires_grad_(True), src, w.requires_grad_(True), box),
                 (x.detach().to(torch.uint8), src, w.detach(), box),
                 (x.detach()[:, :, 0, :].reshape(5, -1), src, w.detach(), None)):
        torch.library.opcheck(torch.ops.metamixer.mix.default, args)


def test_mix_channels_last_and_no_mutation(mix_backend, rng):
    x, src, w, box = _mix_inputs(rng)
    xc = x.contiguous(memory_format=torch.channels_last)
    before = xc.clone()
    out = mf.mix(xc, src, w, box)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xc, before)
    torch.testing.assert_close(out, reference.mix(x, src, w, box))


def test_mix_compile_equals_eager(mix_backend, rng):
    x, src, w, box = _mix_inputs(rng)

    def step(xx, ww):
        return (mf.mix(xx, src, ww, box) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(xx, ww)
        loss.backward()
        results.append((loss.detach(), xx.grad, ww.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# ------------------------------------------------- eager calls that skip the custom op's dispatch

def _grads_through(route, tensors, grads_out):
    """Outputs and input gradients of ``route()`` for upstream gradients ``grads_out``."""
    for t in tensors:
        t.grad = None
    outs = route()
    torch.autograd.backward(outs, grads_out)
    return [o.detach() for o in outs] + [t.grad for t in tensors]


def test_mixed_kd_loss_direct_route_equals_the_op(loss_backend, monkeypatch, rng):
    """A plain eager call that needs a gradient runs the op's body and backward rule through an
    autograd.Function (the C++ eager entry, which would take it on CPU, is set aside): the same
    kernels as the custom op, so the same bits, forward and backward."""
    monkeypatch.delitem(mf._backend.eager_entries, "mixed_kd_loss", raising=False)
    z, labels, weights = _inputs(3, 5, 7, 2, rng, torch.float32)
    peers = [p.clone().requires_grad_(True) for p in z.unbind(0)]
    grads_out = tuple(torch.randn(2, 3, generator=rng))
    kwargs = dict(temperature=2.0, label_smoothing=0.1, detach_targets=False)
    direct = _grads_through(lambda: mf.mixed_kd_loss(peers, labels, weights, **kwargs), peers,
                            grads_out)
    assert mf.mixed_kd_loss(peers, labels, weights)[0].grad_fn.name() == "_MixedKDLossBackward"
    via_op = _grads_through(lambda: torch.ops.metamixer.mixed_kd_loss(
        peers, labels, weights, 2.0, 0.1, "pairwise", None, False)[:2], peers, grads_out)
    for got, want in zip(direct, via_op, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("fused", [False, True], ids=["mix", "mix2"])
def test_mix_direct_route_equals_the_op(mix_backend, fused, rng):
    x = torch.randn(4, 3, 5, 6, generator=rng).requires_grad_(True)
    w = torch.rand(4, generator=rng).requires_grad_(True)
    w2 = torch.rand(4, generator=rng).requires_grad_(True)
    src, src2 = torch.randperm(4, generator=rng), torch.randint(0, 4, (4,), generator=rng)
    box = torch.tensor([[0, 3, 1, 4], [1, 5, 0, 6], [2, 2, 0, 3], [0, 5, 2, 3]])
    args = (x, src, w, box, src2, w2) if fused else (x, src, w, box)
    leaves = [x, w, w2] if fused else [x, w]
    public, op = (mf.mix2, torch.ops.metamixer.mix2) if fused else (mf.mix, torch.ops.metamixer.mix)
    upstream = (torch.randn(x.shape, generator=rng),)
    direct = _grads_through(lambda: (public(*args),), leaves, upstream)
    assert public(*args).grad_fn.name() == ("_Mix2Backward" if fused else "_MixBackward")
    via_op = _grads_through(lambda: (op(*args),), leaves, upstream)
    for got, want in zip(direct, via_op, strict=True):
        assert torch.equal(got, want)


def test_calls_inside_a_torch_func_transform_on_captured_tensors_take_the_op(rng):
    """Inside torch.func.grad a tensor captured from outside is not wrapped, so a call on such
    tensors alone looks plain; the C++ eager entries took it and crashed ("Cannot access data
    pointer of Tensor that doesn't have storage"), since the transform's layer wraps what their
    ATen calls make. Such calls take the custom op: the input-stage blend of a model whose
    parameters torch.func.grad differentiates, for one."""
    x = torch.randn(4, 3, 5, 6, generator=rng)
    src, src2 = torch.randperm(4, generator=rng), torch.randperm(4, generator=rng)
    w, w2 = torch.rand(4, generator=rng), torch.rand(4, generator=rng)
    box = torch.tensor([[0, 3, 1, 4], [1, 5, 0, 6], [2, 2, 0, 3], [0, 5, 2, 3]])
    z = torch.randn(2, 4, 5, generator=rng)
    labels = torch.randint(0, 5, (4,), generator=rng)
    scale = torch.tensor(1.5)

    def f(s):
        ce, kd = mf.mixed_kd_loss(z, labels, temperature=2.0)
        return (s * (mf.mix(x, src, w, box).sum() + mf.mix2(x, src, w, box, src2, w2).sum()
                     + ce.sum() + kd.sum()))

    want = f(torch.tensor(1.0))
    torch.testing.assert_close(torch.func.grad(f)(scale), want)


def test_direct_route_refuses_double_backward_as_the_op_does(rng):
    """With create_graph=True the backward rule calls the backward op through the dispatcher,
    so a second backward fails as it does for the op (no formula registered) instead of
    silently treating the first gradient as a constant."""
    x = torch.randn(3, 4, generator=rng, dtype=torch.float64).requires_grad_(True)
    out = mf.mix(x, torch.tensor([1, 2, 0]), torch.rand(3, generator=rng, dtype=torch.float64))
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()
