"""The global blend's hooks: a plan blends at exactly the named stage of each peer (the input or
a named submodule), once per forward, and leaves no hook behind."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from plans import global_mixture, no_hooks_left, seeded, seq
from torch import nn

from metamixer_fast import MetaMixer, MixedKDLoss, MixPlan


class Recorder:
    """Records the input of every named child (forward pre-hooks run before the module)."""

    def __init__(self, net: nn.Module) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name))
                        for name, m in net.named_children()]

    def _hook(self, name: str):
        def hook(_m, args):
            self.inputs.setdefault(name, []).append(args[0].detach().clone())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def test_hook_mixes_only_at_the_named_module_once_per_forward(rng):
    n = 9
    net = seq("a", "b", "c")
    x = torch.randn(n, 5, dtype=torch.float64, generator=rng)
    plan = MetaMixer(stages=("b",), generator=seeded(rng)).sample(torch.randint(0, 3, (n,), generator=rng))
    rec = Recorder(net)
    with torch.no_grad(), plan.global_mixing([net]):
        out1 = net(x)
        out2 = net(x)  # a second forward in the block is mixed once too
    rec.remove()
    with torch.no_grad():
        a = net.a(x)
        b = net.b(a)
        expected = net.c(global_mixture(b, plan))
    for k in range(2):
        torch.testing.assert_close(rec.inputs["a"][k], x, rtol=0, atol=0)
        torch.testing.assert_close(rec.inputs["b"][k], a, rtol=0, atol=0)  # unmixed before
        torch.testing.assert_close(rec.inputs["c"][k], global_mixture(b, plan), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out1, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out2, expected, rtol=1e-12, atol=1e-12)
    assert no_hooks_left(net)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.c(b))  # unmixed after the block


def test_input_stage_blends_each_peer_input_and_is_removed_after_an_exception(rng):
    n = 6
    peers = [seq("a", "b"), seq("a", "b")]
    x = torch.randn(n, 5, dtype=torch.float64, generator=rng)
    y = torch.randint(0, 2, (n,), generator=rng)
    plan = MetaMixer(stages=("input",), generator=seeded(rng)).sample(y)
    recs = [Recorder(p) for p in peers]
    with pytest.raises(KeyError, match="boom"), torch.no_grad(), plan.global_mixing(peers):
        outs = [p(x) for p in peers]
        raise KeyError("boom")
    for r in recs:
        r.remove()
        torch.testing.assert_close(r.inputs["a"][0], global_mixture(x, plan), rtol=1e-12, atol=1e-12)
    assert no_hooks_left(*peers)
    with torch.no_grad():
        for p, o in zip(peers, outs):
            torch.testing.assert_close(o, p(global_mixture(x, plan)), rtol=1e-12, atol=1e-12)


def test_input_blend_is_shared_by_peers_until_the_input_changes(rng):
    n = 6
    peers = nn.ModuleList([seq("a", "b"), seq("a", "b"), seq("a", "b")])
    x = torch.randn(n, 5, dtype=torch.float64, generator=rng)
    y = torch.randint(0, 2, (n,), generator=rng)
    plan = MetaMixer(stages=("input",), generator=seeded(rng)).sample(y)
    blends = []
    blend = plan.blend
    plan.blend = lambda h: blends.append(h) or blend(h)
    recs = [Recorder(p) for p in peers]
    with torch.no_grad(), plan.global_mixing(peers):
        peers[0](x)
        peers[1](x)
        x.mul_(2.0)  # an in-place change must not reuse the blend of the old values
        peers[2](x)
    for r in recs:
        r.remove()
    assert len(blends) == 2  # peers 0 and 1 share one blend; peer 2 sees the changed input
    torch.testing.assert_close(recs[1].inputs["a"][0], recs[0].inputs["a"][0], rtol=0, atol=0)
    torch.testing.assert_close(recs[0].inputs["a"][0], global_mixture(x / 2, plan), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(recs[2].inputs["a"][0], global_mixture(x, plan), rtol=1e-12, atol=1e-12)
    assert no_hooks_left(*peers)


def counting_blends(plan: MixPlan) -> list[torch.Tensor]:
    """The inputs of every ``plan.blend`` call from now on."""
    blends: list[torch.Tensor] = []
    blend = plan.blend
    plan.blend = lambda h: blends.append(h) or blend(h)
    return blends


@pytest.mark.parametrize("no_graph", [torch.no_grad, torch.inference_mode])
def test_a_peer_run_without_grad_leaves_the_others_their_input_gradient(no_graph, rng):
    """A teacher peer run under no_grad/inference_mode first blends the shared input without a
    graph; the blend cache gave that blend to the peers after it, so x's gradient from them was
    silently lost (inference_mode: autograd refused the inference tensor). A blend with a graph
    may serve a peer run without one (the same values, nothing recorded): shared."""
    n = 6
    peers = nn.ModuleList([seq("a", "b") for _ in range(3)])
    y = torch.randint(0, 3, (n,), generator=rng)
    plan = MetaMixer(stages=("input",), generator=seeded(rng)).sample(y)
    x = torch.randn(n, 5, dtype=torch.float64, generator=rng, requires_grad=True)
    with plan.global_mixing(peers[1:]):
        alone = [p(x) for p in peers[1:]]  # the students without a teacher
    (want,) = torch.autograd.grad(sum(o.sum() for o in alone), x)
    blends = counting_blends(plan)
    with plan.global_mixing(peers):
        with no_graph():
            first = peers[0](x)
        students = [p(x) for p in peers[1:]]
        with no_graph():
            last = peers[0](x)
    assert len(blends) == 2  # the teacher's own, then one with a graph shared by the rest
    assert students[0].requires_grad and not first.requires_grad and not last.requires_grad
    (grad,) = torch.autograd.grad(sum(o.sum() for o in students), x)
    torch.testing.assert_close(grad, want, rtol=0, atol=0)
    with torch.no_grad():
        teacher = peers[0](global_mixture(x, plan))
        for out, ref in zip(alone, students):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for out in (first, last):
        torch.testing.assert_close(out, teacher, rtol=1e-12, atol=1e-12)
    assert no_hooks_left(*peers)


def test_the_input_blend_of_an_inference_tensor(rng):
    """In inference_mode the batch is an inference tensor, which has no version counter: the
    blend cache's ``_version`` test raised. Each peer blends its own input instead."""
    n = 6
    peers = nn.ModuleList([seq("a", "b"), seq("a", "b")])
    y = torch.randint(0, 3, (n,), generator=rng)
    plan = MetaMixer(stages=("input",), generator=seeded(rng)).sample(y)
    with torch.inference_mode():
        x = torch.randn(n, 5, dtype=torch.float64, generator=rng)
        with plan.global_mixing(peers):
            outs = [p(x) for p in peers]
        for p, out in zip(peers, outs):
            torch.testing.assert_close(out, p(global_mixture(x, plan)), rtol=1e-12, atol=1e-12)
    assert no_hooks_left(*peers)


def test_a_peer_that_changes_its_input_in_place_does_not_change_the_next_peers(rng):
    """The peers share one blend of their input; one that changes it in place (an inplace ReLU
    first) changed it for the peers after it too. The blend is made again for them."""
    n = 6
    changer = nn.Sequential(OrderedDict(relu=nn.ReLU(inplace=True), a=nn.Linear(5, 6).double()))
    peers = nn.ModuleList([changer, seq("a", "b")])
    x = torch.randn(n, 5, dtype=torch.float64, generator=rng)
    y = torch.randint(0, 3, (n,), generator=rng)
    plan = MetaMixer(stages=("input",), generator=seeded(rng)).sample(y)
    rec = Recorder(peers[1])
    with torch.no_grad(), plan.global_mixing(peers):
        peers[0](x)
        peers[1](x)
    rec.remove()
    torch.testing.assert_close(rec.inputs["a"][0], global_mixture(x, plan), rtol=1e-12, atol=1e-12)
    assert no_hooks_left(*peers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_apply_fuses_the_input_blend_and_the_hook_does_not_repeat_it(dtype, rng, mix_backend):
    n = 9
    peers = [nn.Identity(), nn.Identity()]
    x = (torch.rand(n, 3, 8, 7, generator=rng) * 255).to(dtype)
    y = torch.randint(0, 3, (n,), generator=rng)
    plan = MetaMixer(stages=("input",), generator=seeded(rng)).sample(y)
    with plan.global_mixing(peers):
        two_calls = [p(plan.apply_local(x)) for p in peers]
    blends = []
    blend = plan.blend
    plan.blend = lambda h: blends.append(h) or blend(h)
    fused = plan.apply(x)
    with plan.global_mixing(peers):
        outs = [p(fused) for p in peers]
        fused.mul_(1)  # changed in place, cast, moved, or the plan copied: still blended once
        peers[0](fused)
        peers[1](fused.double() / 255)
    with plan.to("cpu").global_mixing(peers):
        peers[0](fused)
    assert not blends  # the fused output is never blended again
    for out, ref in zip(outs, two_calls):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # bit for bit the two mix calls
    assert no_hooks_left(*peers)


def test_apply_local_after_apply_blends_at_the_input_again(rng):
    """``apply`` marks the plan's input as blended; a later ``apply_local`` hands the hook a batch
    that still needs the blend, so the later call decides."""
    peers = [nn.Identity(), nn.Identity()]
    x = torch.rand(6, 3, 8, 8, generator=rng)
    y = torch.randint(0, 3, (6,), generator=rng)
    plan = MetaMixer(stages=("input",), generator=seeded(rng)).sample(y)
    plan.apply(x)
    u = plan.apply_local(x)
    with plan.global_mixing(peers):
        outs = [p(u) for p in peers]
    fused = plan.apply(x)
    assert not torch.equal(u, fused)  # the blend changes the batch, so the test can tell
    for out in outs:
        torch.testing.assert_close(out, fused, rtol=0, atol=0)


def test_a_compiled_forward_traces_the_input_blend_without_a_break_or_recompiling(rng):
    """torch.compile(fullgraph=True) of a function that runs the peers inside a global_mixing
    block traces the input hook: its blend cache (an identity and ``_version`` test, and a tuple
    kept on the plan) was a graph break, so fullgraph=True failed, and without it every new plan
    recompiled. Under tracing each peer blends its own input: one graph for every plan."""
    from torch._dynamo.testing import CompileCounter

    peers = nn.ModuleList([seq("a", "b"), seq("a", "b")])
    counter = CompileCounter()

    def forward(u: torch.Tensor) -> list[torch.Tensor]:
        return [p(u) for p in peers]

    compiled = torch.compile(forward, backend=counter, fullgraph=True)
    mixer = MetaMixer(stages=("input",), generator=seeded(rng))
    for _ in range(3):
        x = torch.randn(6, 5, dtype=torch.float64, generator=rng)
        plan = mixer.sample(torch.randint(0, 3, (6,), generator=rng))
        with plan.global_mixing(peers):
            got = compiled(x)
        with torch.no_grad():
            want = [p(global_mixture(x, plan)) for p in peers]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1
    assert no_hooks_left(*peers)


@pytest.mark.parametrize("outer, inner", [("input", "trunk"), ("trunk", "input")])
def test_nested_blocks_of_two_plans_over_the_same_peers_are_refused(outer, inner, rng):
    """Two plans at different stages would each blend the same forward: refused, whichever
    opens first, and the outer block's hooks stay intact and are removed after."""
    peers = [nn.Sequential(OrderedDict(trunk=nn.Linear(5, 6), head=nn.Linear(6, 3))) for _ in range(2)]
    y = torch.randint(0, 3, (8,), generator=rng)
    plans = {s: MetaMixer(stages=(s,), generator=seeded(rng)).sample(y) for s in (outer, inner)}
    x = torch.randn(8, 5, generator=rng)
    with torch.no_grad(), plans[outer].global_mixing(peers):
        before = peers[0](x)
        with pytest.raises(RuntimeError, match="nested blocks would blend twice"), \
                plans[inner].global_mixing(peers):
            pass
        torch.testing.assert_close(peers[0](x), before, rtol=0, atol=0)
    assert no_hooks_left(*peers)


@pytest.mark.parametrize("stage", ["input", "trunk"])
def test_a_module_is_blended_once_per_forward(stage, rng):
    """A stage module shared by two peers (a common trunk) is blended once per peer forward, and
    a block nested over the same modules is refused rather than blending twice."""
    trunk = nn.Linear(5, 6).double()
    peers = [nn.Sequential(OrderedDict(trunk=trunk, head=nn.Linear(6, 3).double()))
             for _ in range(2)]
    x = torch.randn(8, 5, dtype=torch.float64, generator=rng)
    plan = MetaMixer(stages=(stage,), generator=seeded(rng)).sample(
        torch.randint(0, 3, (8,), generator=rng))
    with torch.no_grad():
        before = x if stage == "input" else trunk(x)
        expected = [p.head(global_mixture(before, plan) if stage == "trunk"
                           else p.trunk(global_mixture(x, plan))) for p in peers]
        with plan.global_mixing(peers):
            outs = [p(x) for p in peers]
            with pytest.raises(RuntimeError, match="nested blocks would blend twice"), \
                    plan.global_mixing(peers):
                pass
            outs_again = [p(x) for p in peers]  # the outer block's hooks are intact
    for out, again, ref in zip(outs, outs_again, expected):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(again, ref, rtol=1e-12, atol=1e-12)
    assert no_hooks_left(*peers)
    with plan.global_mixing(peers):  # usable again once the block is closed
        pass


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = seq("a", "b", "c")
        self.mid = self.body.b  # the same module under a second name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_stage_names_may_be_aliases(rng):
    net = Aliased()
    plan = MetaMixer(stages=("mid",), generator=seeded(rng)).sample(
        torch.randint(0, 2, (4,), generator=rng))
    x = torch.randn(4, 5, dtype=torch.float64, generator=rng)
    with torch.no_grad(), plan.global_mixing(net):
        out = net(x)
    with torch.no_grad():
        body = net.body
        torch.testing.assert_close(out, body.c(global_mixture(body.b(body.a(x)), plan)))


@pytest.mark.parametrize("peers, stage_modules, error, match", [
    (None, None, TypeError, "'peers' must be a module or a sequence"),
    ([nn.Linear(2, 2), "x"], None, TypeError, r"peers\[1\] must be an nn.Module"),
    ([seq("a")], [None], ValueError, "'stage_modules' must be a sequence of one dict per peer"),
    ([seq("a")], {"s": "a"}, ValueError, "'stage_modules' must be a sequence of one dict per peer"),
])
def test_global_mixing_rejects_bad_arguments(peers, stage_modules, error, match, rng):
    plan = MetaMixer(stages=("a",), generator=seeded(rng)).sample(torch.tensor([0, 1, 0, 1]))
    with pytest.raises(error, match=match), plan.global_mixing(peers, stage_modules):
        pass


def test_apply_at_an_inner_stage_is_apply_local(rng):
    x = torch.randn(6, 3, 4, 5, generator=rng)
    plan = MetaMixer(stages=("a",), generator=seeded(rng)).sample(
        torch.randint(0, 2, (6,), generator=rng))
    torch.testing.assert_close(plan.apply(x), plan.apply_local(x), rtol=0, atol=0)


class Twice(nn.Module):
    """Runs ``a`` twice per forward and never runs ``unused``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.unused = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.a(x))


@pytest.mark.parametrize("stage, match", [("a", "ran twice"), ("unused", "did not run")])
def test_stage_module_run_twice_or_not_at_all_raises(stage, match, rng):
    plan = MetaMixer(stages=(stage,), generator=seeded(rng)).sample(torch.tensor([0, 0, 1, 1]))
    net = Twice()
    with pytest.raises(RuntimeError, match=match), plan.global_mixing(net):
        net(torch.randn(4, 5, generator=rng))
    assert no_hooks_left(net)


def test_heterogeneous_peers(rng):
    n = 8
    resnet_like = seq("stem", "layer2", "fc")
    other = nn.Sequential(OrderedDict(conv=nn.Linear(5, 7), stage2=nn.Linear(7, 6),
                                      head=nn.Linear(6, 4))).double()
    peers = [resnet_like, other]
    names = [{"mid": "layer2", "late": "fc"}, {"mid": "stage2", "late": "head"}]
    x = torch.randn(n, 5, dtype=torch.float64, generator=rng)
    y = torch.randint(0, 3, (n,), generator=rng)
    mixer = MetaMixer(stages=("mid", "late", "input"), generator=seeded(rng))
    seen = set()
    while seen != {"mid", "late", "input"}:  # each draw picks one of 3 stages uniformly
        assert mixer.stats["steps"] < 200, seen
        plan = mixer.sample(y)
        seen.add(plan.stage)
        with torch.no_grad(), plan.global_mixing(peers, stage_modules=names):
            outs = [p(x) for p in peers]
        with torch.no_grad():
            for peer, mapping, out in zip(peers, names, outs):
                act = global_mixture(x, plan) if plan.stage == "input" else x
                for name, module in peer.named_children():
                    act = module(act)
                    if plan.stage != "input" and name == mapping[plan.stage]:
                        act = global_mixture(act, plan)
                torch.testing.assert_close(out, act, rtol=1e-12, atol=1e-12)
        assert no_hooks_left(*peers)
    assert seen == {"mid", "late", "input"}


def test_blend_of_token_activations(rng):
    n = 5
    plan = MetaMixer(generator=seeded(rng)).sample(torch.randint(0, 2, (n,), generator=rng))
    h = torch.randn(n, 3, 4, dtype=torch.float64, generator=rng)
    torch.testing.assert_close(plan.blend(h), global_mixture(h, plan), rtol=1e-12, atol=1e-12)


def test_gradients_flow_through_the_hooks_into_the_loss(rng):
    n = 8
    peers = [nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(64, 3)) for _ in range(2)]
    x = torch.randn(n, 3, 4, 4, generator=rng, requires_grad=True)
    y = torch.randint(0, 3, (n,), generator=rng)
    plan = MetaMixer(stages=("0",), generator=seeded(rng)).sample(y)
    with plan.global_mixing(peers):
        logits = [p(plan.apply_local(x)) for p in peers]
    out = MixedKDLoss()(logits, plan.target)
    out.loss.backward()
    assert x.grad is not None and bool(x.grad.isfinite().all()) and float(x.grad.abs().sum()) > 0
    assert all(p[0].weight.grad is not None for p in peers)
