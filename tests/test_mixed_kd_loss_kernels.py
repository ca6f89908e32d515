"""The mixed_kd_loss kernels on every CPU backend against the float64 reference (DESIGN.md 2.1, 4).

fp32 results must match the float64 reference within rtol 1e-5; bf16/fp16 within twice the error
of the reference run in that same dtype, plus a small absolute floor. Gradients are checked for
random, separate upstream gradients on ce and kd. Inputs are fresh random each run (``rng``).
"""

from __future__ import annotations

import pytest
import torch

import metamixer_fast as mf
from metamixer_fast import reference

INF = float("inf")


def _plan(batch, classes, m, g):
    labels = torch.randint(0, classes, (batch, m), generator=g)
    weights = torch.rand(batch, m, generator=g, dtype=torch.float64) + 0.1
    return labels, weights / weights.sum(1, keepdim=True)


def _logits(k, batch, classes, g, scale=2.0):
    return torch.randn(k, batch, classes, generator=g, dtype=torch.float64) * scale


def _ours(z, labels, weights, grads, as_list=False, **kw):
    """(ce, kd, dz) of metamixer_fast.mixed_kd_loss for logits z (any dtype), grads = (gce, gkd)."""
    if as_list:
        leaves = [p.detach().clone().requires_grad_(True) for p in z.unbind(0)]
    else:
        leaves = [z.detach().clone().requires_grad_(True)]
    ce, kd = mf.mixed_kd_loss(leaves if as_list else leaves[0], labels, weights, **kw)
    torch.autograd.backward((ce, kd), grads)
    dz = torch.stack([p.grad for p in leaves]) if as_list else leaves[0].grad
    for p in leaves:
        assert p.grad.dtype == z.dtype and p.grad.shape == p.shape
    return ce.detach(), kd.detach(), dz


def _reference(z, labels, weights, grads, temperature=1.0, label_smoothing=0.0, mode="pairwise",
               peer_matrix=None, detach_targets=True):
    zz = z.detach().clone().requires_grad_(True)
    ce, kd = reference.mixed_kd_loss(zz, labels, weights, temperature, label_smoothing, mode,
                                     peer_matrix, detach_targets)
    torch.autograd.backward((ce, kd), (grads[0].to(ce.dtype), grads[1].to(kd.dtype)))
    return ce.detach(), kd.detach(), zz.grad


def assert_fp32_close(got, want, rtol=1e-5, floor=1e-6):
    """The fp32 rule of DESIGN.md: within rtol relative, where an entry near zero is judged
    against its tensor's scale (a gradient entry is a difference of O(max) terms, p - q and
    log q - log p, so it carries rounding of that scale, not of its own size)."""
    finite = want.double().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    scale = finite.max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=floor + rtol * scale,
                               equal_nan=True)  # NaN only where the reference has it


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("as_list", [False, True])
def test_fp32_matches_float64_reference(loss_backend, mode, detach, as_list, rng):
    k, batch, classes, m = 3, 9, 613, 3
    z = _logits(k, batch, classes, rng).float()
    labels, weights = _plan(batch, classes, m, rng)
    grads = tuple(torch.randn(2, k, generator=rng, dtype=torch.float64))
    peer = torch.rand(k, k, generator=rng, dtype=torch.float64) if mode == "ensemble" else None
    kw = dict(temperature=3.0, label_smoothing=0.1, mode=mode, peer_matrix=peer, detach_targets=detach)
    ce, kd, dz = _ours(z, labels, weights, grads, as_list, **kw)
    want = _reference(z.double(), labels, weights, grads, **kw)
    for got, ref in zip((ce, kd, dz), want):
        assert_fp32_close(got, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_low_precision_within_twice_reference_error(loss_backend, dtype, mode, rng):
    k, batch, classes = 4, 6, 300
    z = _logits(k, batch, classes, rng).to(dtype)
    labels, weights = _plan(batch, classes, 2, rng)
    grads = tuple(torch.randn(2, k, generator=rng, dtype=torch.float64))
    kw = dict(temperature=2.5, label_smoothing=0.05, mode=mode, detach_targets=False)
    ours = _ours(z, labels, weights, grads, **kw)
    exact = _reference(z.double(), labels, weights, grads, **kw)
    same_dtype = _reference(z, labels, weights.to(dtype), grads, **kw)
    for name, got, want, ref_lp in zip(("ce", "kd", "dz"), ours, exact, same_dtype):
        floor = 1e-3 * want.abs().max().item() + 1e-6
        assert _err(got, want) <= 2 * _err(ref_lp, want) + floor, name


@pytest.mark.parametrize("k, batch, classes", [
    (2, 1, 1), (3, 2, 7), (2, 3, 1271), (2, 2, 32768), (8, 2, 33), (5, 1, 100), (7, 3, 9)])
@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_odd_shapes(loss_backend, k, batch, classes, mode, rng):
    z = _logits(k, batch, classes, rng).float()
    labels, weights = _plan(batch, classes, 1, rng)
    grads = tuple(torch.randn(2, k, generator=rng, dtype=torch.float64))
    kw = dict(temperature=4.0, mode=mode, detach_targets=mode == "pairwise")
    for got, want in zip(_ours(z, labels, weights, grads, **kw),
                         _reference(z.double(), labels, weights, grads, **kw)):
        assert_fp32_close(got, want)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.7])
def test_gradcheck_float64_ensemble_with_peer_matrix(loss_backend, temperature, rng):
    # float64 runs the kernels in double (no test-only path); T = 2 takes exp(z) as a power of
    # exp(z/T) and T = 1.7 takes two exps, so both forms are checked against finite differences.
    z = _logits(3, 2, 5, rng)
    labels, weights = _plan(2, 5, 2, rng)
    peer = torch.rand(3, 3, generator=rng, dtype=torch.float64)  # weights >= 0 (an ensemble)
    leaves = [p.clone().requires_grad_(True) for p in z.unbind(0)]

    def f(*logits):
        return mf.mixed_kd_loss(list(logits), labels, weights, temperature=temperature,
                                label_smoothing=0.2, mode="ensemble", peer_matrix=peer,
                                detach_targets=False)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_opcheck_low_precision_and_undetached(loss_backend, mode, rng):
    z = _logits(3, 4, 6, rng).to(torch.bfloat16).requires_grad_(True)
    labels, weights = _plan(4, 6, 2, rng)
    args = ([z], labels, weights.float(), 3.0, 0.0, mode, None, False)
    torch.library.opcheck(torch.ops.metamixer.mixed_kd_loss.default, args)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_compile_fullgraph_equals_eager(loss_backend, mode, rng):
    z = _logits(3, 8, 10, rng).float()
    labels, weights = _plan(8, 10, 2, rng)
    gce, gkd = torch.randn(2, 3, generator=rng)

    def step(*logits):
        ce, kd = mf.mixed_kd_loss(list(logits), labels, weights, temperature=3.0, mode=mode,
                                  label_smoothing=0.1, detach_targets=False)
        return (ce * gce).sum() + (kd * gkd).sum()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [p.clone().requires_grad_(True) for p in z.unbind(0)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), *[p.grad for p in leaves]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_eager_path_equals_custom_op(loss_backend, rng):
    """metamixer_fast.mixed_kd_loss (eager fast path where the backend has one) and
    torch.ops.metamixer.mixed_kd_loss give the same values and gradients."""
    z = _logits(4, 5, 50, rng).float()
    labels, weights = _plan(5, 50, 2, rng)
    grads = tuple(torch.randn(2, 4, generator=rng))
    ce, kd, dz = _ours(z, labels, weights, grads, temperature=2.0, mode="ensemble")
    zz = z.clone().requires_grad_(True)
    ce2, kd2, _ = torch.ops.metamixer.mixed_kd_loss([zz], labels, weights, 2.0, 0.0, "ensemble",
                                                    None, True)
    torch.autograd.backward((ce2, kd2), grads)
    torch.testing.assert_close(ce, ce2.detach())
    torch.testing.assert_close(kd, kd2.detach())
    torch.testing.assert_close(dz, zz.grad)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_second_backward_through_retained_graph(loss_backend, mode, rng):
    """The eager C++ path serves the first backward of an fp32 call from the exponentials its
    forward stored in the gradient buffer (overwritten in place); a second backward through a
    retained graph recomputes them. Both meet the fp32 rule, and agree to a few fp32 ulps."""
    z = _logits(3, 7, 1100, rng).float()  # three class chunks, the last one ragged
    labels, weights = _plan(7, 1100, 2, rng)
    grads = tuple(torch.randn(2, 3, generator=rng, dtype=torch.float64))
    kw = dict(temperature=3.0, mode=mode)
    zz = z.clone().requires_grad_(True)
    ce, kd = mf.mixed_kd_loss(zz, labels, weights, **kw)
    torch.autograd.backward((ce, kd), (grads[0].float(), grads[1].float()), retain_graph=True)
    first = zz.grad.clone()
    zz.grad = None
    torch.autograd.backward((ce, kd), (grads[0].float(), grads[1].float()))
    want = _reference(z.double(), labels, weights, grads, **kw)[2]
    assert_fp32_close(first, want)
    assert_fp32_close(zz.grad, want)
    assert_fp32_close(first, zz.grad, rtol=1e-6)


def zero_kd_tolerances(temperature: float, grad_scale: float = 1.0) -> tuple[float, float]:
    """(KD, gradient) tolerances for "identical peers give zero KD": zero up to rounding, a few
    fp32 ulps of each log-ratio times T^2 for KD, and times T |grad_output| for the gradient."""
    eps = torch.finfo(torch.float32).eps
    return 16 * eps * temperature**2, 4 * eps * temperature * grad_scale


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_identical_peers_have_zero_kd_and_kd_gradient(loss_backend, mode, rng):
    row = _logits(1, 6, 37, rng).float()
    z = row.expand(4, -1, -1).contiguous()
    labels, weights = _plan(6, 37, 1, rng)
    _, kd, dz = _ours(z, labels, weights, (torch.zeros(4), torch.ones(4)), temperature=3.0,
                       mode=mode, detach_targets=False)
    kd_tol, grad_tol = zero_kd_tolerances(3.0)
    assert kd.abs().max() <= kd_tol
    assert dz.abs().max() <= grad_tol


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
@pytest.mark.parametrize("detach", [True, False])
def test_masked_classes(loss_backend, mode, detach, rng):
    z = _logits(3, 4, 11, rng).float()
    z[:, :, [2, 7]] = -INF  # masked in every peer
    labels = torch.tensor([[0], [1], [3], [10]])
    weights = torch.ones(4, 1, dtype=torch.float64)
    grads = tuple(torch.randn(2, 3, generator=rng, dtype=torch.float64))
    kw = dict(temperature=2.0, mode=mode, detach_targets=detach)
    ce, kd, dz = _ours(z, labels, weights, grads, **kw)
    want = _reference(z.double(), labels, weights, grads, **kw)
    assert torch.isfinite(ce).all() and torch.isfinite(kd).all() and torch.isfinite(dz).all()
    for got, ref in zip((ce, kd, dz), want):
        assert_fp32_close(got, ref)
    assert (dz[:, :, [2, 7]] == 0).all()
    # eps > 0 spreads mass onto the masked classes: infinite CE, as in the reference
    ce_eps, _, _ = _ours(z, labels, weights, grads, label_smoothing=0.1, **kw)
    assert torch.isinf(ce_eps).all()


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_a_zero_weight_label_on_a_masked_class_adds_nothing(loss_backend, mode, rng):
    """0 log 0 = 0 for labels as for classes: a mixed target's column of weight 0 may name a
    class the logits mask (-inf). It adds 0 to ce, as it would naming any other class, not
    0 * inf = NaN."""
    z = _logits(3, 4, 11, rng).float()
    z[:, :, 7] = -INF
    labels = torch.tensor([[0, 7], [1, 7], [7, 3], [10, 2]])
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.4]], dtype=torch.float64)
    grads = tuple(torch.randn(2, 3, generator=rng, dtype=torch.float64))
    kw = dict(temperature=2.0, mode=mode)
    got = _ours(z, labels, weights, grads, **kw)
    unmasked = labels.where(weights != 0, 0)  # the zero-weight columns name class 0 instead
    want = _reference(z.double(), unmasked, weights, grads, **kw)
    for mine, ref in zip(got, want):
        assert torch.isfinite(mine).all()
        assert_fp32_close(mine, ref)


def test_nan_propagates(loss_backend, rng):
    z = _logits(3, 4, 20, rng).float()
    z[0, 1, 5] = float("nan")
    labels, weights = _plan(4, 20, 1, rng)
    ce, kd, dz = _ours(z, labels, weights, (torch.ones(3), torch.ones(3)), temperature=2.0)
    assert torch.isnan(ce[0]) and torch.isnan(kd).all()  # every peer distills from peer 0
    assert torch.isnan(dz[0, 1]).all()  # the NaN peer's row; the others' may be NaN too
    assert torch.isfinite(dz[:, [0, 2, 3]]).all()  # other rows are untouched


@pytest.mark.parametrize("layout", ["permuted", "class_stride", "mixed_list"])
def test_non_contiguous_logits(loss_backend, layout, rng):
    k, batch, classes = 3, 5, 40
    base = _logits(k, batch, classes, rng).float()
    labels, weights = _plan(batch, classes, 2, rng)
    grads = tuple(torch.randn(2, k, generator=rng))
    if layout == "permuted":  # a [B, K, C] buffer seen as [K, B, C]
        logits = base.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "class_stride":  # every other class of a wider buffer
        wide = torch.zeros(k, batch, 2 * classes)
        wide[..., ::2] = base
        logits = wide[..., ::2]
    else:  # K tensors with different layouts
        logits = [base[0].clone(), base[1].t().contiguous().t(), base[2].clone()[:, :]]
    assert not (logits.is_contiguous() if isinstance(logits, torch.Tensor) else
                all(p.is_contiguous() for p in logits))
    leaves = ([p.detach().requires_grad_(True) for p in logits] if isinstance(logits, list)
              else [logits.detach().requires_grad_(True)])
    ce, kd = mf.mixed_kd_loss(leaves if isinstance(logits, list) else leaves[0], labels, weights,
                              temperature=3.0, mode="pairwise")
    torch.autograd.backward((ce, kd), grads)
    dz = torch.stack([p.grad for p in leaves]) if isinstance(logits, list) else leaves[0].grad
    want = _reference(base.double(), labels, weights, grads, temperature=3.0)
    for got, ref in zip((ce, kd, dz), want):
        assert_fp32_close(got, ref)


def test_cpp_custom_op_checks_values(monkeypatch):
    """On the cpp backend the C++ kernel does the value checks of the custom op, same messages."""
    if ("mixed_kd_loss", "cpp") not in mf._backend._kernels:
        pytest.skip("the C++ extension is not built")
    monkeypatch.setenv("METAMIXER_BACKEND", "cpp")
    z = torch.randn(2, 4, 5)
    op = torch.ops.metamixer.mixed_kd_loss
    ones = torch.ones(4, 1)
    with pytest.raises(ValueError, match=r"'labels' must hold class indices in \[0, 5\)"):
        op([z], torch.tensor([[0], [1], [5], [2]]), ones, 1.0, 0.0, "pairwise", None, True)
    with pytest.raises(ValueError, match="'weights' must be finite"):
        op([z], torch.zeros(4, 1, dtype=torch.long), ones * float("nan"), 1.0, 0.0, "pairwise",
           None, True)
    with pytest.raises(ValueError, match="sum to 1"):
        op([z], torch.zeros(4, 1, dtype=torch.long), ones * 2, 1.0, 0.0, "pairwise", None, True)
    with pytest.raises(ValueError, match="'peer_matrix' has NaN"):
        op([z], torch.zeros(4, 1, dtype=torch.long), ones, 1.0, 0.0, "ensemble",
           torch.full((2, 2), float("inf")), True)


def test_eager_path_keeps_autograd_contracts(rng):
    """The eager C++ path's autograd node behaves like any autograd node: saved-tensor hooks see
    the logits, an in-place change of them is caught, a second backward without retain_graph is
    refused, and under compiled autograd (which cannot trace it) the error names the way out,
    which then works."""
    if mf._backend.eager_entries.get("mixed_kd_loss") is None:
        pytest.skip("the C++ extension is not built")
    from torch._dynamo import compiled_autograd

    z = _logits(3, 6, 10, rng).float().requires_grad_(True)
    labels = torch.randint(0, 10, (6,), generator=rng)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t.clone(),
                                                  lambda t: t):
        ce, kd = mf.mixed_kd_loss(z, labels, temperature=3.0)
    assert ce.grad_fn.name() == "MixedKDLossBackward" and [p.shape for p in packed] == [z.shape]
    loss = ce.sum() + kd.sum()
    loss.backward()
    want = z.grad.clone()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()

    y = z * 1.0
    ce, kd = mf.mixed_kd_loss(y, labels, temperature=3.0)
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (ce.sum() + kd.sum()).backward()

    z.grad = None
    ce, kd = mf.mixed_kd_loss(z, labels, temperature=3.0)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        with pytest.raises(NotImplementedError, match=r"call it inside the torch\.compile'd function"):
            (ce.sum() + kd.sum()).backward()

    @torch.compile(backend="eager", fullgraph=True)
    def compiled_loss(logits):
        ce, kd = mf.mixed_kd_loss(logits, labels, temperature=3.0)
        return ce.sum() + kd.sum()

    z.grad = None
    loss = compiled_loss(z)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        loss.backward()
    assert_fp32_close(z.grad, want.double(), rtol=1e-6)


def test_eager_entry_declines_what_the_custom_op_must_see(monkeypatch, rng):
    """metamixer_fast._C.mixed_kd_loss takes plain eager calls only: under a torch-function or
    dispatch mode, for tensor subclasses, inside torch.func transforms and with another backend
    forced it returns None, and mixed_kd_loss then runs the custom op."""
    entry = mf._backend.eager_entries.get("mixed_kd_loss")
    if entry is None:
        pytest.skip("the C++ extension is not built")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode

    z = _logits(2, 5, 7, rng).float()
    labels = torch.randint(0, 7, (5,), generator=rng)
    args = (labels, None, 3.0, 0.0, "pairwise", None, True)
    assert entry(z, *args) is not None and entry(list(z.unbind(0)), *args) is not None
    with TorchFunctionMode():
        assert entry(z, *args) is None
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(z)
        assert entry(fake, *args) is None
        ce, kd = mf.mixed_kd_loss(fake, mode.from_tensor(labels), temperature=3.0)
        assert ce.shape == kd.shape == (2,)
    assert entry(torch.nn.Parameter(z), *args) is not None  # a Parameter is a plain tensor here

    declined = []

    def wrapped(t):
        declined.append(entry(t, *args) is None)  # t is functorch-wrapped here
        return t.sum()

    torch.func.grad(wrapped)(z)
    torch.vmap(wrapped)(z)
    assert declined == [True, True]

    monkeypatch.setenv("METAMIXER_BACKEND", "reference")
    assert entry(z, *args) is None
    monkeypatch.setenv("METAMIXER_BACKEND", "cpp")
    assert entry(z, *args) is not None


def test_double_backward_is_refused_not_wrong(loss_backend, rng):
    """No backend computes a second derivative: create_graph=True must raise, not hand back a
    gradient without a graph (which would silently drop this loss's Hessian term)."""
    z = _logits(2, 4, 6, rng).float().requires_grad_(True)
    ce, kd = mf.mixed_kd_loss(z, torch.randint(0, 6, (4,), generator=rng), temperature=2.0)
    with pytest.raises(RuntimeError, match=r"double backward|autograd formula|not supported"):
        (dz,) = torch.autograd.grad(ce.sum() + kd.sum(), z, create_graph=True)
        (dz ** 2).sum().backward()


@pytest.mark.parametrize("name", ["weights", "peer_matrix"])
def test_a_weight_that_needs_a_gradient_is_refused(loss_backend, name, rng):
    """The ops differentiate the logits only: a learnable gate would silently get no gradient."""
    z = _logits(3, 4, 6, rng).float().requires_grad_(True)
    labels, weights = _plan(4, 6, 2, rng)
    matrix = torch.full((3, 3), 0.5).fill_diagonal_(0.0)
    kw = {"weights": weights.float(), "peer_matrix": matrix}
    kw[name] = kw[name].requires_grad_(True)
    with pytest.raises(ValueError, match=f"'{name}' requires grad.*{name}.detach"):
        mf.mixed_kd_loss(z, labels, kw["weights"], temperature=2.0, mode="ensemble",
                         peer_matrix=kw["peer_matrix"])
    with torch.no_grad():  # no graph is built: nothing is lost
        mf.mixed_kd_loss(z, labels, kw["weights"], temperature=2.0, mode="ensemble",
                         peer_matrix=kw["peer_matrix"])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_row_masked_everywhere_has_nan_loss_and_nan_gradient(loss_backend, temperature, rng):
    """Every class of a row at -inf: the loss is NaN, and so is that row's gradient (a finite
    gradient would let a NaN-skipping scaler take a step on it)."""
    z = _logits(2, 3, 9, rng).float()
    z[0, 1] = -INF
    z.requires_grad_(True)
    ce, kd = mf.mixed_kd_loss(z, torch.randint(0, 9, (3,), generator=rng), temperature=temperature)
    (ce.sum() + kd.sum()).backward()
    assert torch.isnan(ce[0]) and torch.isnan(z.grad[0, 1]).all()
