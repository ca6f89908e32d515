"""metamixer::mix2 (local + global mixing in one pass) equals two metamixer::mix calls.

Bit for bit against the reference composition ``mix(mix(x, src, w, box), src2, w2)`` in every
dtype (the kernels round the intermediate exactly as a first call would store it), plus
gradcheck, opcheck and torch.compile, on every backend.
"""

from __future__ import annotations

import pytest
import torch
from test_mix_kernels import DTYPES, LAYOUTS, assert_blend_close, make_plan, make_x
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

import metamixer_fast as mf
from metamixer_fast import _backend, reference


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mix2_equals_two_calls(mix_backend, dtype, layout, rng):
    x = make_x(rng, (6, 3, 7, 13), dtype, layout)
    src, wt, box = make_plan(rng, 6, 7, 13)
    box = None if layout == "features" else box
    src2 = torch.randint(0, 6, (6,), generator=rng)
    w2 = torch.rand(6, generator=rng)
    before = x.clone()
    out = mf.mix2(x, src, wt, box, src2, w2)
    assert torch.equal(x, before), "x was mutated"
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    # the same roundings as two reference calls in x's dtype, hence exact in every dtype ...
    assert torch.equal(out, reference.mix2(x, src, wt, box, src2, w2))
    # ... and so within the DESIGN.md tolerance of the float64 reference
    assert_blend_close(out, lambda dt: reference.mix2(x.to(dt), src, wt, box, src2, w2), dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape", [(1, 3, 7, 13), (3, 2, 1, 9), (3, 5, 11, 1), (2, 1, 3, 5000),
                                   (7, 3, 32, 32), (4, 2, 9, 33)])
def test_mix2_odd_shapes(mix_backend, shape, dtype, rng):
    n, _, h, w = shape
    x = make_x(rng, shape, dtype, "nchw")
    src, wt, box = make_plan(rng, n, h, w)
    src2, w2 = torch.randint(0, n, (n,), generator=rng), torch.rand(n, generator=rng)
    assert torch.equal(mf.mix2(x, src, wt, box, src2, w2), reference.mix2(x, src, wt, box, src2, w2))


@pytest.mark.parametrize("stores", ["on", "off", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("layout, shape", [("nchw", (5, 3, 9, 32)), ("nchw", (3, 2, 5, 528)),
                                           ("channels_last", (5, 3, 7, 16)),
                                           ("features", (5, 2, 4, 8))])
def test_mix2_streamed_output_equals_two_calls(monkeypatch, stores, dtype, layout, shape, rng):
    """METAMIXER_STREAM_STORES=on writes mix2's output past the cache wherever rows are whole
    16-element steps (rows of 32, 528 = 33 steps, 48 channels_last, 64 features): the same bits
    as two reference calls."""
    monkeypatch.setenv("METAMIXER_STREAM_STORES", stores)
    n, _, h, w = shape
    x = make_x(rng, shape, dtype, layout)
    src, wt, box = make_plan(rng, n, h, w)
    box = None if layout == "features" else box
    src2, w2 = torch.randint(0, n, (n,), generator=rng), torch.rand(n, generator=rng)
    assert torch.equal(mf.mix2(x, src, wt, box, src2, w2), reference.mix2(x, src, wt, box, src2, w2))


def test_mix2_unknown_stream_stores_setting_is_refused(monkeypatch, rng):
    monkeypatch.setenv("METAMIXER_STREAM_STORES", "maybe")
    x = make_x(rng, (2, 1, 4, 16), torch.float32, "nchw")
    src, wt, box = make_plan(rng, 2, 4, 16)
    with pytest.raises(ValueError, match="METAMIXER_STREAM_STORES='maybe' is not one of auto, on, off"):
        mf.mix2(x, src, wt, box, src, torch.rand(2, generator=rng))


def test_mix2_gradcheck_opcheck_compile(mix_backend, rng):
    # small: gradcheck runs the op twice per element of x and its backward once per output
    # element, and the interpreted Triton kernels take ~0.1 s a call
    x = make_x(rng, (4, 2, 3, 4), torch.float64, "channels_last").requires_grad_(True)
    src, wt, box = make_plan(rng, 4, 3, 4)
    wt = (wt * 0.8 + 0.1).requires_grad_(True)
    src2 = torch.randint(0, 4, (4,), generator=rng)
    w2 = (torch.rand(4, generator=rng, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: mf.mix2(a, src, b, box, src2, c), (x, wt, w2))
    torch.library.opcheck(torch.ops.metamixer.mix2.default, (x.float(), src, wt.float(), box, src2,
                                                             w2.float()))

    def step(a, b, c):
        return (mf.mix2(a, src, b, box, src2, c) ** 2).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        a, b, c = (t.detach().float().clone().requires_grad_(True) for t in (x, wt, w2))
        fn(a, b, c).backward()
        results.append((a.grad, b.grad, c.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    # only x requiring grad (the backward then skips dw, dw2 and the recomputed local mix): the
    # same x.grad, bit for bit
    a = x.detach().float().clone().requires_grad_(True)
    step(a, wt.detach().float(), w2.detach().float()).backward()
    assert torch.equal(a.grad, results[0][0])


def test_mix2_bad_input_names_the_argument(mix_backend):
    x = torch.randn(3, 2, 4, 4)
    src, wt, box = torch.tensor([1, 2, 0]), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([[0, 2, 0, 2]] * 3)
    with pytest.raises(ValueError, match="'src2'"):
        mf.mix2(x, src, wt, box, torch.tensor([0, 1, 3]), wt)
    with pytest.raises(ValueError, match="'w2'"):
        mf.mix2(x, src, wt, box, src, torch.tensor([0.0, 2.0, 0.5]))
    with pytest.raises(ValueError, match="'src2'"):
        mf.mix2(x, src, wt, box, src.int(), wt)


class _Wrapped(torch.Tensor):
    """A tensor subclass: calls on it must go through the op, whatever it wraps."""


class _SeenOps(TorchFunctionMode):
    """Records the custom ops a call goes through (a function mode sees torch.ops calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_plain_calls_run_the_op_body_and_the_rest_see_the_op(mix_backend, rng):
    """mix and mix2 skip the custom op's Python dispatch for plain eager calls: the body alone
    when no gradient is needed, else the body and backward rule linked by an autograd.Function;
    modes, fake tensors and torch.func still go through the op."""
    x = make_x(rng, (4, 3, 5, 6), torch.float32, "nchw")
    src, wt, box = make_plan(rng, 4, 5, 6)
    src2, w2 = torch.randint(0, 4, (4,), generator=rng), torch.rand(4, generator=rng)
    assert _backend.runs_without_dispatcher(x, src, wt, box, src2, w2)
    assert torch.equal(mf.mix2(x, src, wt, box, src2, w2),
                       torch.ops.metamixer.mix2(x, src, wt, box, src2, w2))
    assert torch.equal(mf.mix(x, src, wt, box), torch.ops.metamixer.mix(x, src, wt, box))

    xg = x.clone().requires_grad_(True)
    assert not _backend.runs_without_dispatcher(x, src, wt.requires_grad_(True), box)
    assert not _backend.runs_without_dispatcher(xg, src, wt, box)
    with torch.no_grad():
        assert _backend.runs_without_dispatcher(xg, src, wt, box)
    assert _backend.runs_direct(xg, src, wt, box) and not _backend.runs_direct(None, x.as_subclass(_Wrapped))
    out = mf.mix2(xg, src, wt.detach(), box, src2, w2)
    assert out.grad_fn.name() == "_Mix2Backward"
    assert mf.mix(xg, src, wt.detach(), box).grad_fn.name() == "_MixBackward"
    with _SeenOps() as seen:
        mf.mix2(x, src, wt.detach(), box, src2, w2)
        mf.mix(xg, src, wt.detach(), box)
    assert seen.ops.count("metamixer.mix2") == 1 and seen.ops.count("metamixer.mix") == 1
    with FakeTensorMode() as mode:
        assert not _backend.runs_without_dispatcher(mode.from_tensor(x))
    assert not torch.vmap(lambda t: torch.tensor(_backend.runs_without_dispatcher(t)))(x).any()


def test_cpp_eager_entries_take_plain_no_grad_calls_only(monkeypatch, rng):
    """metamixer_fast._C.mix / mix2 run the C++ kernels for plain eager CPU calls that need no
    gradient and return None for everything the custom op must see; they check every argument
    themselves (a bad one raises, never reaches the kernel)."""
    mix_entry, mix2_entry = (_backend.eager_entries.get(op) for op in ("mix", "mix2"))
    if mix_entry is None or mix2_entry is None:
        pytest.skip("the C++ extension is not built")
    x = make_x(rng, (4, 3, 5, 6), torch.float32, "nchw")
    src, wt, box = make_plan(rng, 4, 5, 6)
    wt = wt.float()
    src2, w2 = torch.randint(0, 4, (4,), generator=rng), torch.rand(4, generator=rng)
    assert torch.equal(mix2_entry(x, src, wt, box, src2, w2), reference.mix2(x, src, wt, box, src2, w2))
    assert torch.equal(mix_entry(x, src, wt, None), reference.mix(x, src, wt, None))

    xg = x.clone().requires_grad_(True)
    assert mix_entry(xg, src, wt, box) is None
    assert mix2_entry(x, src, wt, box, src2, w2.clone().requires_grad_()) is None
    with torch.no_grad():
        assert torch.equal(mix_entry(xg, src, wt, box), reference.mix(x, src, wt, box))
    with TorchFunctionMode():
        assert mix_entry(x, src, wt, box) is None
    with FakeTensorMode() as mode:
        assert mix_entry(mode.from_tensor(x), src, wt, box) is None
    declined = []
    torch.vmap(lambda t: declined.append(mix_entry(t[None], src[:1], wt[:1], None) is None) or t)(x)
    assert declined == [True]
    monkeypatch.setenv("METAMIXER_BACKEND", "reference")
    assert mix_entry(x, src, wt, box) is None
    monkeypatch.setenv("METAMIXER_BACKEND", "cpp")

    bad = {"'box'": (x, src, wt, box[:, :3]), "features": (x.flatten(1), src, wt, box),
           "'src'": (x, src + 4, wt, box), "'w'": (x, src, wt * 3, box)}
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            mix_entry(*args)
    with pytest.raises(RuntimeError):
        mix_entry(x.int(), src, wt, box)
    with pytest.raises(TypeError, match="uint8/float16/bfloat16/float32/float64"):
        mf.mix(x.int(), src, wt, box)  # the Python checks name the fix
