"""metamixer::mix kernels (C++, Triton under the interpreter, reference) against the reference.

Every test runs once per backend usable on CPU (the ``mix_backend`` fixture). Copies and uint8
results must equal the reference bit for bit; float blends follow DESIGN.md section 4: fp32
within 1e-5 relative of the float64 reference, fp16/bf16 within 2x the error of the reference
run in that same dtype plus a small absolute floor.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import metamixer_fast as mf
from metamixer_fast import _backend, reference

DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT_DTYPES = DTYPES[1:]
LAYOUTS = ("nchw", "channels_last", "features", "non_contiguous")
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_x(g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> Tensor:
    """Random x in the requested memory layout (values exactly as drawn, whatever the layout)."""
    if layout == "features":
        shape = (shape[0], shape[1] * shape[2] * shape[3])
    if layout == "non_contiguous":  # every other column of a wider tensor
        shape = (*shape[:-1], 2 * shape[-1])
    if dtype == torch.uint8:
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        x = x[..., ::2]
    return x


def make_plan(g: torch.Generator, n: int, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """src with repeats and self-pairs; w with exact 0 and 1; boxes random, empty and full."""
    src = torch.randint(0, n, (n,), generator=g)
    src[0] = 0  # self-pair
    if n > 2:
        src[1] = src[2]  # a repeated partner
    wt = torch.rand(n, generator=g, dtype=torch.float64)
    wt[:: 3] = 0.0
    if n > 1:
        wt[1] = 1.0
    ys = torch.randint(0, h + 1, (n, 2), generator=g).sort(1).values
    xs = torch.randint(0, w + 1, (n, 2), generator=g).sort(1).values
    box = torch.cat([ys, xs], 1)
    box[-1] = torch.tensor([0, h, 0, w])  # full box
    if n > 1:
        box[-2] = torch.tensor([h // 2, h // 2, 0, w])  # empty box
    return src, wt, box


def assert_blend_close(got: Tensor, make_ref, dtype: torch.dtype) -> None:
    """DESIGN.md rules: uint8 exact; fp32/fp64 vs the float64 reference; fp16/bf16 within 2x the
    error of the reference run in that dtype plus a floor. ``make_ref(dtype)`` runs the reference."""
    if dtype == torch.uint8:
        assert torch.equal(got, make_ref(dtype))
        return
    want = make_ref(torch.float64)
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-6 if dtype == torch.float32 else 1e-12)
        return
    ref_err = (make_ref(dtype).double() - want).abs().max()
    err = (got.double() - want).abs().max()
    assert err <= 2 * ref_err + FLOOR[dtype], (err, ref_err)


def _as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mix_forward_matches_reference(mix_backend, dtype, layout, rng):
    x = make_x(rng, (6, 3, 7, 13), dtype, layout)
    src, wt, box = make_plan(rng, 6, 7, 13)
    box = None if layout == "features" else box
    before = x.clone()
    out = mf.mix(x, src, wt, box)
    assert torch.equal(x, before), "x was mutated"
    assert out.shape == x.shape and out.dtype == x.dtype
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_blend_close(out, lambda dt: reference.mix(_as_dtype(x, dt), src, wt, box), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cutmix_and_outside_are_exact_copies(mix_backend, dtype, layout, rng):
    """w = 0 pastes x[src] exactly inside the box; everything outside is x exactly."""
    x = make_x(rng, (5, 2, 9, 8), dtype, layout)
    src, _, box = make_plan(rng, 5, 9, 8)
    wt = torch.zeros(5)
    box = None if layout == "features" else box
    out = mf.mix(x, src, wt, box)
    mask = reference._box_mask(x, box)
    want = x[src] if mask is None else torch.where(mask, x[src], x)
    assert torch.equal(out, want)
    assert torch.equal(mf.mix(x, src, torch.ones(5), box), x)


@pytest.mark.parametrize("shape", [(1, 3, 7, 13), (4, 1, 1, 1), (3, 2, 1, 9), (3, 5, 11, 1),
                                   (2, 1, 7, 13)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_odd_shapes(mix_backend, shape, dtype, layout, rng):
    n, _, h, w = shape
    x = make_x(rng, shape, dtype, layout)
    src, wt, box = make_plan(rng, n, h, w)
    out = mf.mix(x, src, wt, box)
    assert_blend_close(out, lambda dt: reference.mix(_as_dtype(x, dt), src, wt, box), dtype)
    out = mf.mix(x, src, wt.float(), None)
    assert_blend_close(out, lambda dt: reference.mix(_as_dtype(x, dt), src, wt.float(), None), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_matches_reference(mix_backend, dtype, layout, rng):
    x = make_x(rng, (6, 3, 7, 13), dtype, layout)
    src, wt, box = make_plan(rng, 6, 7, 13)
    box = None if layout == "features" else box
    wt = wt.to(torch.float64 if dtype == torch.float64 else torch.float32)
    grad = make_x(rng, (6, 3, 7, 13), dtype, layout)
    dx, dw = torch.ops.metamixer.mix_backward(grad, x, src, wt, box)
    assert dx.dtype == x.dtype and dw.dtype == wt.dtype
    assert_blend_close(dx, lambda dt: reference.mix_backward(
        _as_dtype(grad, dt), _as_dtype(x, dt), src, wt, box)[0], dtype)
    # dw sums up to S products: compare with a tolerance scaled by sum |g| |x - x_src|
    want = reference.mix_backward(grad.double(), x.double(), src, wt.double(), box)[1]
    scale = (grad.double().abs() * (x.double() - x.double()[src]).abs()).flatten(1).sum(1)
    rel = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    assert ((dw.double() - want).abs() <= rel * scale + 1e-6).all(), (dw, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_without_dw(mix_backend, dtype, layout, rng, monkeypatch):
    """need_dw=False: the same dx, bit for bit, and zeros for dw; autograd asks for it exactly
    when w needs no gradient (and then leaves w.grad alone)."""
    x = make_x(rng, (6, 3, 7, 13), dtype, layout)
    src, wt, box = make_plan(rng, 6, 7, 13)
    box = None if layout == "features" else box
    grad = make_x(rng, (6, 3, 7, 13), dtype, layout)
    dx, _ = torch.ops.metamixer.mix_backward(grad, x, src, wt, box)
    dx_only, dw = torch.ops.metamixer.mix_backward(grad, x, src, wt, box, False)
    assert torch.equal(dx_only, dx) and torch.equal(dw, torch.zeros_like(wt))
    if mix_backend != "reference":  # its vjp cannot run under opcheck's schema-checking mode
        torch.library.opcheck(torch.ops.metamixer.mix_backward.default,
                              (grad, x, src, wt, box, False))

    calls = []
    real = _backend.kernel("mix_backward", x.device)

    def spy(*args):  # records need_dw of each backward kernel call made by autograd
        calls.append(args[5])
        return real(*args)

    leaf = x.detach().requires_grad_(True)
    w_leaf = wt.clone().requires_grad_(True)
    monkeypatch.setitem(_backend._kernels, ("mix_backward", mix_backend), spy)
    mf.mix(leaf, src, wt, box).backward(grad)
    mf.mix(leaf, src, w_leaf, box).backward(grad)
    assert calls == [False, True]
    assert w_leaf.grad is not None and torch.equal(leaf.grad, dx + dx)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "features"])
def test_gradcheck(mix_backend, layout, rng):
    # small: gradcheck runs the op twice per element of x and its backward once per output
    # element, and an interpreted Triton kernel takes ~0.05 s a call
    x = make_x(rng, (4, 2, 3, 4), torch.float64, layout).requires_grad_(True)
    src, wt, box = make_plan(rng, 4, 3, 4)
    box = None if layout == "features" else box
    wt = (wt * 0.8 + 0.1).requires_grad_(True)  # away from the [0, 1] edges for finite differences
    assert torch.autograd.gradcheck(lambda xx, ww: mf.mix(xx, src, ww, box), (x, wt))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "features"])
def test_opcheck(mix_backend, dtype, layout, rng):
    x = make_x(rng, (4, 3, 5, 6), dtype, layout)
    src, wt, box = make_plan(rng, 4, 5, 6)
    box = None if layout == "features" else box
    wt = wt.float()
    if dtype.is_floating_point:
        x.requires_grad_(True)
        wt.requires_grad_(True)
    torch.library.opcheck(torch.ops.metamixer.mix.default, (x, src, wt, box))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_fullgraph_equals_eager(mix_backend, layout, rng):
    """Local then global mixing (two calls, as MetaMixer does), forward and backward."""
    x = make_x(rng, (6, 3, 7, 13), torch.float32, layout)
    src, _, box = make_plan(rng, 6, 7, 13)
    perm = torch.randperm(6, generator=rng)
    mu = torch.rand(6, generator=rng)

    def step(xx, ww):
        u = mf.mix(xx, src, torch.zeros_like(ww), box)
        return (mf.mix(u, perm, ww, None) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        xx, ww = x.clone().requires_grad_(True), mu.clone().requires_grad_(True)
        loss = fn(xx, ww)
        loss.backward()
        results.append((loss.detach(), xx.grad, ww.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_bad_values_are_refused_by_every_backend(mix_backend):
    x = torch.randn(3, 2, 4, 4)
    src, wt, box = torch.tensor([1, 2, 0]), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([[0, 2, 0, 2]] * 3)
    with pytest.raises(ValueError, match="'src'"):
        mf.mix(x, torch.tensor([0, 1, 3]), wt, box)
    with pytest.raises(ValueError, match="'w'"):
        mf.mix(x, src, torch.tensor([0.0, float("nan"), 0.5]), box)
    with pytest.raises(ValueError, match="'w'"):
        mf.mix(x, src, torch.tensor([0.0, 1.0 + 1e-12, 0.5], dtype=torch.float64), box)
    with pytest.raises(ValueError, match="'box'"):
        mf.mix(x, src, wt, torch.tensor([[0, 2, 3, 5]] * 3))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_batch_splits_across_threads(mix_backend, layout, rng):
    """Big enough that the C++ kernels split the work across threads (units of >= 32 KiB): the
    forward, the gathered backward (repeated partners) and mix2 still equal the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        x = make_x(rng, (24, 3, 64, 96), torch.float32, layout)
        src, wt, box = make_plan(rng, 24, 64, 96)
        src2, w2 = torch.randint(0, 24, (24,), generator=rng), torch.rand(24, generator=rng)
        wt = wt.float()
        assert torch.equal(mf.mix(x, src, wt, box), reference.mix(x, src, wt, box))
        assert torch.equal(mf.mix2(x, src, wt, box, src2, w2), reference.mix2(x, src, wt, box, src2, w2))
        grad = make_x(rng, (24, 3, 64, 96), torch.float32, layout)
        dx, dw = torch.ops.metamixer.mix_backward(grad, x, src, wt, box)
        want_dx, want_dw = reference.mix_backward(grad.double(), x.double(), src, wt.double(), box)
        torch.testing.assert_close(dx.double(), want_dx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dw.double(), want_dw, rtol=1e-4, atol=1e-3)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", ["channels_last", "features"])
def test_rows_longer_than_a_window(mix_backend, layout, rng):
    """Rows of more than 4096 elements (the C++ kernels' window) with boxes across windows."""
    x = make_x(rng, (5, 3, 4, 1501), torch.float64, layout)
    src, wt, box = make_plan(rng, 5, 4, 1501)
    box = None if layout == "features" else box
    src2, w2 = torch.randint(0, 5, (5,), generator=rng), torch.rand(5, generator=rng, dtype=torch.float64)
    assert torch.equal(mf.mix(x, src, wt, box), reference.mix(x, src, wt, box))
    assert torch.equal(mf.mix2(x, src, wt, box, src2, w2), reference.mix2(x, src, wt, box, src2, w2))
    grad = make_x(rng, (5, 3, 4, 1501), torch.float64, layout)
    dx, dw = torch.ops.metamixer.mix_backward(grad, x, src, wt, box)
    want_dx, want_dw = reference.mix_backward(grad, x, src, wt, box)
    torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, want_dw, rtol=1e-10, atol=1e-10)


def test_strided_partner_and_weight_tensors(mix_backend, rng):
    """src, w and box given as strided views work like their contiguous copies."""
    x = make_x(rng, (6, 3, 7, 13), torch.float32, "nchw")
    src, wt, box = make_plan(rng, 6, 7, 13)
    src_s = torch.stack([src, src], 1)[:, 0]
    w_s = torch.stack([wt, wt], 1)[:, 1]
    box_s = torch.cat([box, box], 1)[:, :4]
    assert not (src_s.is_contiguous() or w_s.is_contiguous() or box_s.is_contiguous())
    assert torch.equal(mf.mix(x, src_s, w_s, box_s), reference.mix(x, src, wt, box))
    assert torch.equal(mf.mix2(x, src_s, w_s, box_s, src_s, w_s), reference.mix2(x, src, wt, box, src, wt))


# Views that no kernel reads as they are: each output has one layout on every backend, the one
# the fake implementations promise to torch.compile (metamixer_fast/_layout.py).
def _odd_layout(g: torch.Generator, kind: str) -> Tensor:
    x = torch.randn(5, 3, 6, 7, generator=g)
    if kind == "channels_last_crop":  # a random crop of a channels_last batch
        return x.contiguous(memory_format=torch.channels_last)[:, :, 1:5, 2:6]
    if kind == "channels_last_1x1":
        return x.contiguous(memory_format=torch.channels_last)[:, :, 2:3, 4:5]
    if kind == "batch_transposed":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "ncwh":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return torch.randn(9, 5, generator=g).t()  # transposed features [5, 9]


ODD_LAYOUTS = ("channels_last_crop", "channels_last_1x1", "batch_transposed", "ncwh", "features_t")


@pytest.mark.parametrize("kind", ODD_LAYOUTS)
def test_every_op_returns_the_layout_its_fake_promises(mix_backend, kind, rng):
    from metamixer_fast._layout import mix_output

    x = _odd_layout(rng, kind)
    n = x.shape[0]
    src, wt, box = make_plan(rng, n, *(x.shape[2:] if x.dim() == 4 else (1, 1)))
    box = box if x.dim() == 4 else None
    src2, w2 = torch.randperm(n, generator=rng), torch.rand(n, generator=rng)
    want = mix_output(x).stride()
    out = mf.mix(x, src, wt.float(), box)
    assert out.stride() == want
    torch.testing.assert_close(out, reference.mix(x, src, wt.float(), box))
    assert mf.mix2(x, src, wt.float(), box, src2, w2).stride() == want
    dx, _ = torch.ops.metamixer.mix_backward(torch.randn_like(x), x, src, wt.float(), box)
    assert dx.stride() == want
    if kind == "channels_last_crop":  # a crop of a channels_last batch stays channels_last
        assert out.is_contiguous(memory_format=torch.channels_last)
    xg, wg = x.detach().requires_grad_(True), wt.float().requires_grad_(True)
    torch.library.opcheck(torch.ops.metamixer.mix.default, (xg, src, wg, box))
    torch.library.opcheck(torch.ops.metamixer.mix2.default, (xg, src, wg, box, src2, w2))


def test_compile_fullgraph_on_a_crop_of_a_channels_last_batch(mix_backend, rng):
    x = _odd_layout(rng, "channels_last_crop")
    src, wt, box = make_plan(rng, 5, 4, 4)

    def step(xx: Tensor) -> Tensor:
        return mf.mix(xx, src, wt.float(), box) * 2

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x))


def test_triton_kernels_check_values_in_the_kernel(mix_backend, rng):
    """The Triton mix and mix2 flag bad values inside the kernel (the op body skips its Python
    checks for them); a flagged call raises naming the argument, reads nothing out of bounds,
    and the next call is unaffected."""
    if mix_backend != "triton" or not _backend.triton_interpreted():
        pytest.skip("Triton kernels on CPU tensors (on a GPU a bad value stops the process's "
                    "CUDA work: test_cuda.py::test_a_bad_value_on_cuda_fails_the_call_with_its_message "
                    "checks that in a fresh process)")
    from metamixer_fast.kernels import mix as triton_mix

    assert triton_mix.mix.checks_values and triton_mix.mix2.checks_values
    x = torch.randn(4, 2, 5, 6, generator=rng)
    src, w = torch.tensor([1, 2, 3, 0]), torch.full((4,), 0.5)
    box = torch.tensor([[0, 5, 0, 6], [1, 3, 2, 4], [0, 0, 0, 0], [2, 5, 0, 6]])
    src2, w2 = torch.tensor([3, 2, 1, 0]), torch.rand(4, generator=rng)
    bad = {"'src'": (x, torch.tensor([1, 2, 4, 0]), w, box), "'w'": (x, src, w.clone().fill_(1.5), box),
           "'box'": (x, src, w, box.clone().index_fill_(1, torch.tensor([3]), 7))}
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            triton_mix.mix(*args)
        with pytest.raises(ValueError, match=message):
            triton_mix.mix2(*args, src2, w2)
    for message, (s2, ww2) in {"'src2'": (torch.tensor([3, 2, -1, 0]), w2),
                               "'w2'": (src2, w2.clone().fill_(float("nan")))}.items():
        with pytest.raises(ValueError, match=message):
            triton_mix.mix2(x, src, w, box, s2, ww2)
    assert torch.equal(triton_mix.mix2(x, src, w, box, src2, w2), reference.mix2(x, src, w, box, src2, w2))


def test_triton_backward_inverts_any_partner_list(rng):
    """The Triton backward's partner inversion (a sort and a binary search, no host sync):
    row k lists every j with src_j = k in increasing order; indices outside [0, N), which only
    a direct call of the backward op can pass, land in no row."""
    pytest.importorskip("triton")
    from metamixer_fast.kernels.mix import _invert_partners

    for src in (torch.randint(0, 7, (7,), generator=rng), torch.tensor([3, 3, 3, 0, 3]),
                torch.tensor([2, -1, 5, 0, 2]), torch.arange(6).flip(0), torch.zeros(0, dtype=torch.long)):
        offsets, order = _invert_partners(src)
        n = src.shape[0]
        assert offsets.shape == (n + 1,) and offsets.dtype == torch.int64
        for k in range(n):
            expected = [j for j in range(n) if src[j] == k]
            assert order[offsets[k]:offsets[k + 1]].tolist() == expected, (src, k)
