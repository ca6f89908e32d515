"""The public API on CUDA tensors: the ops pick the Triton kernels, match the CPU, differentiate,
compile and train. Skipped without a GPU; run the whole GPU check with ``make gpu-check``.

The kernels' numerics on every layout and dtype are the CPU test matrix, run on the GPU with
``METAMIXER_TEST_DEVICE=cuda`` (tests/conftest.py); this file checks what only real CUDA
tensors show: device dispatch, allocation on the device, streams, autocast, torch.compile's
CUDA graphs and the training loop.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_mix_kernels import assert_blend_close, make_plan, make_x
from test_mixed_kd_loss_kernels import assert_fp32_close

import metamixer_fast as mf
from metamixer_fast import _backend, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("triton")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def automatic_backend(monkeypatch) -> None:
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def test_cuda_tensors_run_the_triton_kernels():
    for op in ("mix", "mix_backward", "mix2", "mixed_kd_loss", "mixed_kd_loss_backward"):
        assert _backend.backend_for(op, CUDA) == "triton", op


def _as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "features", "non_contiguous"])
def test_mix_and_mix2_on_cuda_match_the_reference(dtype, layout, rng):
    x = make_x(rng, (9, 3, 13, 17), dtype, layout)
    src, w, box = make_plan(rng, 9, 13, 17)
    src2, w2 = torch.randperm(9, generator=rng), torch.rand(9, generator=rng)
    w = w.float()
    box = None if layout == "features" else box
    on = [t if t is None else t.to(CUDA) for t in (x, src, w, box, src2, w2)]
    out = mf.mix(*on[:4])
    out2 = mf.mix2(*on)
    assert out.is_cuda and out.dtype == dtype and out2.is_cuda and out2.dtype == dtype
    layout_on_cpu = mf.mix(x, src, w, box).stride()  # one rule on every backend (_layout.py)
    assert out.stride() == out2.stride() == layout_on_cpu
    assert_blend_close(out.cpu(), lambda dt: reference.mix(_as_dtype(x, dt), src, w, box), dtype)
    assert_blend_close(out2.cpu(), lambda dt: reference.mix2(_as_dtype(x, dt), src, w, box, src2, w2),
                       dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mix_gradients_on_cuda_match_the_cpu(dtype, rng):
    x = make_x(rng, (12, 4, 9, 10), torch.float32, "channels_last")
    src, w, box = make_plan(rng, 12, 9, 10)
    grad = torch.randn(x.shape, generator=rng)
    results = []
    for device in ("cpu", "cuda"):
        leaf = x.detach().to(device=device, dtype=dtype).requires_grad_(True)
        wl = w.to(device=device, dtype=torch.float32).requires_grad_(True)
        mf.mix(leaf, src.to(device), wl, box.to(device)).backward(grad.to(device, dtype))
        results.append((leaf.grad.float().cpu(), wl.grad.cpu()))
    (dx_cpu, dw_cpu), (dx_gpu, dw_gpu) = results
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx_gpu, dx_cpu, **tol)
    torch.testing.assert_close(dw_gpu, dw_cpu, rtol=1e-4 if dtype == torch.float32 else 5e-2,
                               atol=1e-3 if dtype == torch.float32 else 0.5)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
@pytest.mark.parametrize("c", [10, 1000, 50257])
def test_mixed_kd_loss_on_cuda_matches_the_float64_reference(mode, c, rng):
    k, b = 3, 37
    z = torch.randn(k, b, c, generator=rng, dtype=torch.float64) * 2
    labels = torch.randint(0, c, (b, 2), generator=rng)
    weights = torch.rand(b, 2, generator=rng, dtype=torch.float64) + 0.1
    weights /= weights.sum(1, keepdim=True)
    gce, gkd = torch.randn(2, k, generator=rng, dtype=torch.float64)
    kw = dict(temperature=2.5, label_smoothing=0.1, mode=mode, detach_targets=mode == "pairwise")

    def run(zz, lab, wt):
        leaf = zz.detach().clone().requires_grad_(True)
        ce, kd = mf.mixed_kd_loss(leaf, lab, wt, **kw)
        torch.autograd.backward((ce, kd), (gce.to(ce), gkd.to(kd)))
        return ce, kd, leaf.grad

    got = run(z.float().to(CUDA), labels.to(CUDA), weights.float().to(CUDA))
    assert all(t.is_cuda for t in got)
    want = run(z, labels, weights)
    for a, b_ in zip(got, want):
        assert_fp32_close(a.cpu(), b_.detach())


def test_separate_peers_on_cuda_get_gradients_in_their_own_layouts(rng):
    b, c = 16, 33
    peers = [torch.randn(b, c, generator=rng).to(CUDA),
             torch.randn(c, b, generator=rng).to(CUDA).t()]
    leaves = [p.requires_grad_(True) for p in peers]
    labels = torch.randint(0, c, (b,), generator=rng).to(CUDA)
    ce, kd = mf.mixed_kd_loss(leaves, labels, temperature=2.0, detach_targets=False)
    (ce.sum() + kd.sum()).backward()
    ref_leaves = [p.detach().cpu().double().requires_grad_(True) for p in peers]
    ce_r, kd_r = mf.mixed_kd_loss(ref_leaves, labels.cpu(), temperature=2.0, detach_targets=False)
    (ce_r.sum() + kd_r.sum()).backward()
    for leaf, ref in zip(leaves, ref_leaves):
        assert leaf.grad.stride() == leaf.stride()
        assert_fp32_close(leaf.grad.cpu(), ref.grad)


def test_kernels_run_on_the_current_stream(rng):
    """Work queued on a side stream is ordered with the kernels launched there."""
    x = torch.randn(64, 3, 32, 32, generator=rng).to(CUDA)
    src, w = torch.randperm(64, generator=rng).to(CUDA), torch.rand(64, generator=rng).to(CUDA)
    expected = mf.mix(x, src, w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = x * 1.0  # produced on the side stream, consumed by the kernel there
        out = mf.mix(y, src, w)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected)


def _tiny_peers() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
        for _ in range(2)).to(CUDA)


def _step(peers, mixer, loss_fn, x, y):
    plan = mixer.sample(y)
    xm = plan.apply(x)
    logits = torch.stack([p(xm) for p in peers])
    out = loss_fn(logits, plan.target)
    return out.loss


def test_autocast_bf16_step_on_cuda(rng):
    peers = _tiny_peers()
    mixer = mf.MetaMixer(stages=["input"], generator=torch.Generator().manual_seed(1))
    loss_fn = mf.MixedKDLoss(temperature=3.0)
    x, y = torch.randn(32, 3, 16, 16, generator=rng).to(CUDA), torch.randint(0, 10, (32,)).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = _step(peers, mixer, loss_fn, x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in peers.parameters())


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_on_cuda_equals_eager(mode, rng, monkeypatch):
    """torch.compile of mix2 + peers + loss, forward and backward, equals eager. With
    mode="reduce-overhead" Inductor runs both as CUDA graphs (no cudagraph skip: the ops never
    sync, build no device tensor from host data, and launch on the capturing stream): four
    steps warm up, record and replay them, and a fifth, profiled, launches graphs. The ops' first
    call on the device is the compiled warm-up's, where its allocations go to the graph pool
    (the value-check flag must not: kernels/_flag.py)."""
    from metamixer_fast.kernels import _flag
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(_flag, "_FLAGS", {})
    peers = _tiny_peers()
    y = torch.randint(0, 10, (32,)).to(CUDA)
    src, w = torch.randperm(32).to(CUDA), torch.rand(32).to(CUDA)
    box = torch.tensor([[2, 10, 3, 12]] * 32).to(CUDA)

    def step(xx):
        xm = mf.mix2(xx, src, torch.zeros_like(w), box, src.flip(0), w)
        logits = torch.stack([p(xm) for p in peers])
        ce, kd = mf.mixed_kd_loss(logits, y, temperature=3.0)
        return ce.sum() + kd.sum()

    def loss_and_grads(fn, xx):
        peers.zero_grad(set_to_none=True)
        loss = fn(xx)
        loss.backward()
        return [loss.detach().clone()] + [p.grad.clone() for p in peers.parameters()]

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    graphs = mode == "reduce-overhead"
    for _ in range(4 if graphs else 1):
        x = torch.randn(32, 3, 16, 16, generator=rng).to(CUDA)
        got, want = loss_and_grads(compiled, x), loss_and_grads(step, x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if graphs:
        inductor = dict(counters["inductor"])
        assert not inductor.get("cudagraph_skips"), f"Inductor left CUDA graphs out: {inductor}"
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            loss_and_grads(compiled, x)
            torch.cuda.synchronize()
        names = {e.name for e in prof.events()}
        assert any("GraphLaunch" in name for name in names), sorted(names)[:60]


def test_training_runs_on_cuda(tmp_path):
    from metamixer_fast.config import from_mapping
    from metamixer_fast.train import fit

    cfg = from_mapping({"dataset": "synthetic", "synthetic_size": 256, "arch": "tiny",
                        "batch_size": 32, "eval_batch_size": 128, "epochs": 1,
                        "limit_train_batches": 4, "progress": False, "device": "cuda",
                        "method": "metamixer", "stages": "input,stage1,stage2",
                        "amp": "bf16", "out": str(tmp_path / "run")}).validate()
    final = fit(cfg)
    assert all(torch.isfinite(torch.tensor(final["train_ce"] + final["train_kd"])))


def test_a_captured_step_replays_like_eager(rng):
    """One training step's forward and backward (mix2 at the input, a feature-stage blend, the
    ensemble loss on a label mixture) captured in a CUDA graph after a warm-up, then replayed
    on new batches and plans copied into its inputs: each replay equals the eager step on the
    same values, loss and every gradient. A call that synchronised, built a device tensor from
    host data or launched off the capturing stream would fail the capture or go stale."""
    n = 16
    body = torch.nn.Linear(3 * 8 * 8, 32).to(CUDA)
    heads = torch.nn.ModuleList(torch.nn.Linear(32, 10) for _ in range(3)).to(CUDA)
    params = [*body.parameters(), *heads.parameters()]

    def new_inputs() -> list[torch.Tensor]:
        src, w, box = make_plan(rng, n, 8, 8)
        lam = torch.rand(n, 1, generator=rng)
        return [t.to(CUDA) for t in (
            torch.randn(n, 3, 8, 8, generator=rng), src, w.float(), box,
            torch.randperm(n, generator=rng), torch.rand(n, generator=rng),  # global partners
            torch.randperm(n, generator=rng), torch.rand(n, generator=rng),  # feature blend
            torch.randint(0, 10, (n, 2), generator=rng), torch.cat([lam, 1 - lam], 1))]

    def step(x, src, w, box, src2, w2, pi, mu, y, weights):
        for p in params:
            p.grad = None
        h = mf.mix(body(mf.mix2(x, src, w, box, src2, w2).flatten(1)), pi, mu)
        ce, kd = mf.mixed_kd_loss(torch.stack([head(h) for head in heads]), y, weights,
                                  temperature=3.0, mode="ensemble", detach_targets=False)
        loss = ce.sum() + kd.sum()
        loss.backward()
        return loss.detach(), [p.grad for p in params]

    static = new_inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up torch.cuda.graph asks for
        for _ in range(3):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_loss, graph_grads = step(*static)
    for _ in range(3):
        fresh = new_inputs()
        for buf, value in zip(static, fresh):
            buf.copy_(value)
        graph.replay()
        loss, grads = step(*fresh)
        torch.testing.assert_close(graph_loss, loss, rtol=1e-5, atol=1e-6)
        for got, want in zip(graph_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mix_beyond_two_to_the_31_elements():
    """Offsets past 2**31 elements (a 2.2 GB uint8 batch): the last sample is mixed with the
    first, so a 32-bit offset anywhere would read or write the wrong place."""
    n, shape = 44_000, (3, 128, 128)
    x = torch.empty(n, *shape, dtype=torch.uint8, device=CUDA)
    x[:-1].fill_(7)
    x[-1].copy_(torch.arange(x[0].numel(), device=CUDA).view(shape) % 251)
    x[0].copy_(torch.arange(x[0].numel(), device=CUDA).view(shape) % 241)
    src = torch.arange(n, device=CUDA)
    src[-1] = 0
    w = torch.full((n,), 0.25, device=CUDA)
    box = torch.tensor([[0, 128, 0, 128]], device=CUDA).expand(n, 4)
    out = mf.mix(x, src, w, box)
    last = reference.mix(torch.stack([x[-1], x[0]]).cpu(), torch.tensor([1, 0]),
                         torch.full((2,), 0.25), box[:2].cpu())[0]
    assert torch.equal(out[-1].cpu(), last)
    assert torch.equal(out[-2], x[-2])


_BAD_CALLS = {  # each a fresh process: a device-side assertion ends the process's CUDA work
    "mix src": ("mf.mix(x, torch.tensor([1, 2, 4, 0], device=d), w, box)", "mix: a partner index"),
    "mix2 w2": ("mf.mix2(x, src, w, box, src, torch.tensor([0.5, 0.5, 1.5, 0.5], device=d))",
                "mix2: a partner index"),
    "loss label": ("mf.mixed_kd_loss(torch.randn(2, 4, 10, device=d), "
                   "torch.tensor([1, 2, 10, 0], device=d))", "mixed_kd_loss: a label is outside"),
}


@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_a_bad_value_on_cuda_fails_the_call_with_its_message(case):
    """On CUDA the Triton kernels check values in the kernel and the launcher asserts the flag
    asynchronously (kernels/_flag.py): a bad index or weight must end the process's CUDA work
    with the op's message at the next synchronisation, never pass or read out of bounds
    silently. A good call first shows the process is otherwise sound."""
    call, message = _BAD_CALLS[case]
    code = f"""if True:
        import torch, metamixer_fast as mf
        d = torch.device("cuda")
        x = torch.randn(4, 3, 8, 8, device=d)
        src, w = torch.tensor([1, 2, 3, 0], device=d), torch.full((4,), 0.5, device=d)
        box = torch.tensor([[0, 4, 0, 4]] * 4, device=d)
        mf.mix2(x, src, w, box, src, w); torch.cuda.synchronize(); print("good call ok")
        out = {call}
        torch.cuda.synchronize()
        print("bad call passed")
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "good call ok" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode != 0 and "bad call passed" not in proc.stdout, proc.stdout
    assert message in proc.stderr, proc.stderr[-2000:]


def test_no_call_waits_for_the_gpu(rng):
    """mix, mix2 and mixed_kd_loss (both modes, a label mixture, a peer matrix), forward and
    backward, never synchronise the host with the GPU (a read-back such as torch.bincount's
    sizing on CUDA would stall the training loop's host until the GPU caught up): torch's sync
    debug mode turns any such wait into an error. (Run on a GPU at 889dd03 without the ensemble
    call, which was added after.)"""
    h = torch.randn(8, 4, 6, 6, device=CUDA, requires_grad=True)
    src, w, box = (t.to(CUDA) for t in make_plan(rng, 8, 6, 6))
    w = w.float().requires_grad_()
    src2, w2 = torch.randperm(8, generator=rng).to(CUDA), torch.rand(8, generator=rng).to(CUDA)
    z = torch.randn(3, 8, 10, device=CUDA, requires_grad=True)
    y = torch.randint(0, 10, (8,), generator=rng).to(CUDA)
    mixture = torch.stack([y, y.roll(1)], 1)  # a label mixture [B, 2], as MetaMixer's target
    weights = torch.tensor([[0.7, 0.3]], device=CUDA).expand(8, 2)
    peers = torch.full((3, 3), 0.5, device=CUDA).fill_diagonal_(0)

    def step() -> None:
        out = mf.mix(h, src, w, box) + mf.mix2(h, src, w, box, src2, w2)
        ce, kd = mf.mixed_kd_loss(z, y, temperature=2.0)
        ce2, kd2 = mf.mixed_kd_loss(list(z.unbind(0)), mixture, weights, mode="ensemble",
                                    peer_matrix=peers, detach_targets=False, label_smoothing=0.1)
        (out.sum() + ce.sum() + kd.sum() + ce2.sum() + kd2.sum()).backward()

    step()  # compiles the kernels and allocates the flags
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
