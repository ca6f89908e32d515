"""Transforms that must see the ops: ``torch.jit.trace`` records them, forward-mode AD is refused.

The eager fast paths (the C++ entries of ``metamixer_fast._C`` and the direct routes of ops.py)
skip the custom op. A jit trace records only what passes the dispatcher's Tracer key: a traced
call that took a C++ entry held an ``aten::empty`` and no op, and replayed uninitialised memory;
now a trace records ``metamixer::*``. The ops have no forward-mode formula: torch.func.jvp,
jacfwd and torch.autograd.forward_ad returned zero (or no) tangents through them, and now raise
"<op>: forward-mode AD is not supported ...; use reverse mode ..." on every backend and route,
while calls whose inputs carry no tangent (a batch captured from outside the transform) still
work.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwad
from conftest import cpu_backends  # tests/ is on sys.path (rootdir conftest)
from torch import Tensor, nn

import metamixer_fast as mf
from metamixer_fast import MetaMixer, _backend

pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

K, B, C = 2, 6, 5
N, CH, H, W = 4, 3, 5, 6


def refusal(op: str) -> str:
    """What a forward-AD refusal of ``op`` says: the op's name, then the fix (the C++ loss entry's
    message, "mixed_kd_loss: forward-mode AD is not supported; use reverse mode (backward)",
    matches too)."""
    return rf"^{op}: forward-mode AD is not supported.*use reverse mode"


def loss_inputs(rng: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randn(K, B, C, generator=rng), torch.randint(0, C, (B,), generator=rng)


def mix_inputs(rng: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x, src, w, box, src2, w2) for [N, C, H, W] images, a CutMix box per sample."""
    x = torch.randn(N, CH, H, W, generator=rng)
    box = torch.tensor([[1, H - 1, 2, W - 1]]).expand(N, 4).contiguous()
    return (x, torch.randperm(N, generator=rng), torch.rand(N, generator=rng), box,
            torch.randperm(N, generator=rng), torch.rand(N, generator=rng))


def traced_ops(fn: torch.jit.ScriptFunction | torch.jit.ScriptModule) -> set[str]:
    graph = fn.inlined_graph if isinstance(fn, torch.jit.ScriptModule) else fn.graph
    return {node.kind() for node in graph.nodes() if node.kind().startswith("metamixer::")}


# ------------------------------------------------------------------------------ torch.jit.trace

def test_jit_trace_of_mixed_kd_loss_matches_eager(loss_backend, rng):
    z, y = loss_inputs(rng)
    traced = torch.jit.trace(lambda z, y: mf.mixed_kd_loss(z, y, temperature=2.0), (z, y),
                             check_trace=False)
    assert traced_ops(traced) == {"metamixer::mixed_kd_loss"}
    z2, y2 = loss_inputs(rng)  # other values: the trace must compute, not replay
    z_eager, z_traced = z2.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    ce, kd = mf.mixed_kd_loss(z_eager, y2, temperature=2.0)
    ce_t, kd_t = traced(z_traced, y2)
    assert torch.equal(ce_t, ce) and torch.equal(kd_t, kd)
    (ce.sum() + kd.sum()).backward()
    (ce_t.sum() + kd_t.sum()).backward()
    # the eager C++ node reuses its forward's exponentials, the op recomputes them: rounding
    torch.testing.assert_close(z_traced.grad, z_eager.grad, rtol=1e-6, atol=1e-7)


def test_jit_trace_of_mix_matches_eager(mix_backend, rng):
    x, src, w, box, _, _ = mix_inputs(rng)
    traced = torch.jit.trace(lambda x, src, w, box: mf.mix(x, src, w, box), (x, src, w, box),
                             check_trace=False)
    assert traced_ops(traced) == {"metamixer::mix"}
    x2, src2, w2, box2, _, _ = mix_inputs(rng)
    assert torch.equal(traced(x2, src2, w2, box2), mf.mix(x2, src2, w2, box2))
    xg = x2.clone().requires_grad_(True)
    traced(xg, src2, w2, box2).sum().backward()
    xe = x2.clone().requires_grad_(True)
    mf.mix(xe, src2, w2, box2).sum().backward()
    assert torch.equal(xg.grad, xe.grad)


def test_jit_trace_of_mix2_matches_eager(mix_backend, rng):
    args = mix_inputs(rng)
    traced = torch.jit.trace(lambda *a: mf.mix2(*a), args, check_trace=False)
    assert traced_ops(traced) == {"metamixer::mix2"}
    other = mix_inputs(rng)
    assert torch.equal(traced(*other), mf.mix2(*other))


class Caller(nn.Module):
    """A model that calls ``peer`` (through ``__call__``, so that the peer's hooks run)."""

    def __init__(self, peer: nn.Module) -> None:
        super().__init__()
        self.peer = peer

    def forward(self, x: Tensor) -> Tensor:
        return self.peer(x)


@pytest.mark.parametrize("stage", ["input", "trunk"])
def test_jit_trace_of_a_peer_under_global_mixing_matches_eager(stage, rng):
    """The hooks of ``MixPlan.global_mixing`` call ``mix`` inside the peer: a trace of a model
    that calls the peer records it as an op. (A trace of the peer module itself would call its
    ``forward``, skipping the module's own hooks, the "input" stage's pre-hook among them.)"""
    peer = nn.Sequential(OrderedDict(trunk=nn.Linear(5, 6), head=nn.Linear(6, 3)))
    x = torch.randn(8, 5, generator=rng)
    plan = MetaMixer(stages=(stage,), generator=torch.Generator().manual_seed(1)).sample(
        torch.randint(0, 3, (8,), generator=rng))
    x2 = torch.randn(8, 5, generator=rng)
    with torch.no_grad():
        unblended = peer(x2)
        with plan.global_mixing(peer):
            peer(x)  # an eager call first: the "input" stage's cached blend of x must not be
            # what the trace reads (it would enter the graph as a constant)
            traced = torch.jit.trace(Caller(peer), (x,), check_trace=False)
            assert traced_ops(traced) == {"metamixer::mix"}
            got = traced(x2)
            expected = peer(x2)
    assert torch.equal(got, expected)
    assert not torch.equal(expected, unblended)  # the blend did happen


# -------------------------------------------------------------------------- forward-mode AD

def _mixed_kd_loss_op(z: Tensor, y: Tensor) -> Tensor:
    return torch.ops.metamixer.mixed_kd_loss([z], y[:, None], torch.ones(B, 1), 1.0, 0.0,
                                             "pairwise", None, True)[1]


# route -> (the op its refusal names, a function of the tensor that gets the tangent, that tensor)
def _routes(rng: torch.Generator) -> dict[str, tuple[str, Callable[[Tensor], Tensor], Tensor]]:
    z, y = loss_inputs(rng)
    x, src, w, box, src2, w2 = mix_inputs(rng)
    return {
        "mixed_kd_loss": ("mixed_kd_loss", lambda z: mf.mixed_kd_loss(z, y)[1], z),
        "mix": ("mix", lambda x: mf.mix(x, src, w, box), x),
        "mix2": ("mix2", lambda x: mf.mix2(x, src, w, box, src2, w2), x),
        "op mixed_kd_loss": ("mixed_kd_loss", lambda z: _mixed_kd_loss_op(z, y), z),
        "op mix": ("mix", lambda x: torch.ops.metamixer.mix(x, src, w, box), x),
        "op mix2": ("mix2", lambda x: torch.ops.metamixer.mix2(x, src, w, box, src2, w2), x),
    }


ROUTES = ["mixed_kd_loss", "mix", "mix2", "op mixed_kd_loss", "op mix", "op mix2"]
# every route on every CPU backend of its op (METAMIXER_BACKEND)
ROUTES_BY_BACKEND = [pytest.param(route, backend, id=f"{route}-{backend}") for route in ROUTES
                     for backend in cpu_backends(route.removeprefix("op "))]


@pytest.mark.parametrize(("route", "backend"), ROUTES_BY_BACKEND)
def test_jvp_is_refused(route, backend, monkeypatch, rng):
    monkeypatch.setenv(_backend.ENV_VAR, backend)
    op, fn, primal = _routes(rng)[route]
    with pytest.raises(RuntimeError, match=refusal(op)):
        torch.func.jvp(fn, (primal,), (torch.ones_like(primal),))


@pytest.mark.parametrize(("route", "backend"), ROUTES_BY_BACKEND)
def test_jacfwd_is_refused(route, backend, monkeypatch, rng):
    monkeypatch.setenv(_backend.ENV_VAR, backend)
    op, fn, primal = _routes(rng)[route]
    with pytest.raises(RuntimeError, match=refusal(op)):
        torch.func.jacfwd(fn)(primal)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize(("route", "backend"), ROUTES_BY_BACKEND)
def test_forward_ad_is_refused(route, backend, requires_grad, monkeypatch, rng):
    """Also a dual tensor that requires grad: the op's autograd.Function runs its forward with
    forward grad mode off, which must not hide the tangent (torch's own error would say only
    "You must implement the jvp function")."""
    monkeypatch.setenv(_backend.ENV_VAR, backend)
    op, fn, primal = _routes(rng)[route]
    with fwad.dual_level():
        dual = fwad.make_dual(primal.clone().requires_grad_(requires_grad),
                              torch.ones_like(primal))
        with pytest.raises(RuntimeError, match=refusal(op)):
            fn(dual)


def test_a_tangent_on_any_floating_input_is_refused(rng):
    """Not the data only: blend weights, loss weights and the peer matrix have no forward-mode
    formula either; logits given as a list are looked at one by one."""
    x, src, w, box, src2, w2 = mix_inputs(rng)
    z, y = loss_inputs(rng)
    with fwad.dual_level():
        def dual(t: Tensor) -> Tensor:
            return fwad.make_dual(t, torch.ones_like(t))

        calls = {
            "mix": lambda: mf.mix(x, src, dual(w), box),
            "mix2": lambda: mf.mix2(x, src, w, box, src2, dual(w2)),
            "mixed_kd_loss": lambda: mf.mixed_kd_loss([z[0], dual(z[1])], y),
        }
        for op, call in calls.items():
            with pytest.raises(RuntimeError, match=refusal(op)):
                call()
        with pytest.raises(RuntimeError, match=refusal("mixed_kd_loss")):
            mf.mixed_kd_loss(z, y[:, None], dual(torch.ones(B, 1)))
        with pytest.raises(RuntimeError, match=refusal("mixed_kd_loss")):
            mf.mixed_kd_loss(z, y, mode="ensemble", peer_matrix=dual(torch.full((K, K), 0.5)))


def test_forward_over_reverse_is_refused(rng):
    """A tangent on the upstream gradient of a backward op: no formula there either."""
    x, src, w, box, _, _ = mix_inputs(rng)
    with fwad.dual_level():
        grad = fwad.make_dual(torch.ones_like(x), torch.ones_like(x))
        with pytest.raises(RuntimeError, match=refusal("mix_backward")):
            torch.ops.metamixer.mix_backward(grad, x, src, w, box)


def test_calls_without_a_tangent_still_work_under_forward_ad(rng):
    """Refused is a tangent that reaches an op, not forward AD around it: a batch captured from
    outside the transform, or created inside it, or any call inside an open dual level whose
    inputs carry none, gives the eager values (and the correct tangent of the rest)."""
    x, src, w, box, src2, w2 = mix_inputs(rng)
    z, y = loss_inputs(rng)
    blended = mf.mix(x, src, w, box)
    primal = torch.randn(N, CH, H, W, generator=rng)
    out, tangent = torch.func.jvp(lambda p: p * mf.mix(x, src, w, box), (primal,),
                                  (torch.ones_like(primal),))
    assert torch.equal(out, primal * blended) and torch.equal(tangent, blended)
    _, tangent = torch.func.jvp(lambda p: p + mf.mix(torch.ones_like(x), src, w, box), (primal,),
                                (torch.ones_like(primal),))
    assert torch.equal(tangent, torch.ones_like(primal))
    with fwad.dual_level():
        assert torch.equal(mf.mix(x, src, w, box), blended)
        assert torch.equal(mf.mix2(x, src, w, box, src2, w2), mf.mix(blended, src2, w2))
        zg = z.clone().requires_grad_(True)
        ce, kd = mf.mixed_kd_loss(zg, y)
        (ce.sum() + kd.sum()).backward()
    ce_e, kd_e = mf.mixed_kd_loss(z, y)
    assert torch.equal(ce, ce_e) and torch.equal(kd, kd_e)
    z_e = z.clone().requires_grad_(True)
    sum(t.sum() for t in mf.mixed_kd_loss(z_e, y)).backward()
    torch.testing.assert_close(zg.grad, z_e.grad, rtol=1e-6, atol=1e-7)
