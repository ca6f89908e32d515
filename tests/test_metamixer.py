"""MetaMixer / MixPlan / hooks / baselines: the plan applied by ``mix`` + hooks equals a direct
float64 construction of the four-image mixture, and the sampler obeys its rules."""

from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from metamixer_fast import (
    CutMix,
    CutMixOrMixup,
    MetaMixer,
    MixedKDLoss,
    MixedTarget,
    MixPlan,
    Mixup,
)
from metamixer_fast.plan import cutmix_boxes


def seeded(rng: torch.Generator) -> torch.Generator:
    """A fresh generator for a sampler, seeded from the test's random generator."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))


def labels_with_groups(rng: torch.Generator, n: int, classes: int) -> torch.Tensor:
    """Labels in which every class present has at least two samples, shuffled."""
    base = torch.arange(n) % classes
    base[-1] = base[-2] if n % classes == 1 else base[-1]
    return base[torch.randperm(n, generator=rng)]


def local_mixture(x: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """u built sample by sample from the plan's boxes and weights (no ``mix``)."""
    u = x.clone()
    for i in range(x.shape[0]):
        s, w = int(plan.local_src[i]), float(plan.local_w[i])
        if plan.box is None:
            u[i] = w * x[i] + (1 - w) * x[s]
        else:
            y0, y1, x0, x1 = (int(v) for v in plan.box[i])
            u[i, :, y0:y1, x0:x1] = w * x[i, :, y0:y1, x0:x1] + (1 - w) * x[s, :, y0:y1, x0:x1]
    return u


def global_mixture(h: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    out = h.clone()
    for i in range(h.shape[0]):
        mu, p = float(plan.mu[i]), int(plan.global_src[i])
        out[i] = mu * h[i] + (1 - mu) * h[p]
    return out


def image_weights(plan: MixPlan, weights: torch.Tensor) -> torch.Tensor:
    """[N, N] float64: how much of image j sample i is made of, given the plan's [N, 4] weights
    over the images (i, sigma(i), pi(i), sigma(pi(i)))."""
    n = plan.num_samples
    s, p = plan.local_src, plan.global_src
    images = torch.stack([torch.arange(n), s, p, s[p]], 1)
    return torch.zeros(n, n, dtype=torch.float64).scatter_add_(1, images, weights.double())


def weights64(plan: MixPlan) -> torch.Tensor:
    """The four-image weights of DESIGN.md section 1 in float64, from the plan's lam and mu."""
    lam, mu, p = plan.lam.double(), plan.mu.double(), plan.global_src
    return torch.stack([mu * lam, mu * (1 - lam), (1 - mu) * lam[p], (1 - mu) * (1 - lam[p])], 1)


def seq(*names: str, sizes: tuple[int, ...] = (5, 6, 6, 4)) -> nn.Sequential:
    """A small chain of named linear layers on [N, D] features."""
    layers = [nn.Linear(sizes[k], sizes[k + 1]).double() for k in range(len(names))]
    return nn.Sequential(OrderedDict(zip(names, layers)))


def no_hooks_left(*models: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks
               for model in models for m in model.modules())


# ----------------------------------------------------------- the mixture equals its construction

@pytest.mark.parametrize("stage", ["input", "0", "1"])
def test_output_is_weighted_sum_of_image_outputs(stage, rng, mix_backend):
    """One-hot images (image j is channel j) through a linear net: sample i's output is exactly
    f(sum_j c_ij e_j) where c_ij is the plan's target weight on image j."""
    n, hw = 12, (7, 9)
    y = labels_with_groups(rng, n, 3)
    x = torch.eye(n, dtype=torch.float64)[:, :, None, None].expand(n, n, *hw).contiguous()
    net = nn.Sequential(nn.Conv2d(n, n, 1, bias=False), nn.Conv2d(n, 5, 1, bias=False),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    plan = MetaMixer(1.0, 1.0, stages=(stage,), generator=seeded(rng)).sample(y)
    with torch.no_grad(), plan.global_mixing([net]):
        out = net(plan.apply_local(x))
    w1 = net[0].weight[:, :, 0, 0]
    w2 = net[1].weight[:, :, 0, 0]
    f = (w2 @ w1).T.detach()
    torch.testing.assert_close(out, image_weights(plan, weights64(plan)) @ f, rtol=1e-10, atol=1e-12)
    # plan.target (float32) describes the same mixture to float32 rounding.
    from_target = image_weights(plan, plan.target.weights) @ f
    torch.testing.assert_close(out, from_target, rtol=1e-5, atol=1e-6 * float(out.abs().max()))


@pytest.mark.parametrize("apply", ["apply_local", "apply"])
@pytest.mark.parametrize("stage", ["input", "mid", "head"])
def test_plan_equals_direct_float64_construction(stage, apply, rng, mix_backend):
    n, h, w = 10, 6, 5
    y = labels_with_groups(rng, n, 4)
    x = torch.randn(n, 3, h, w, dtype=torch.float64, generator=rng)
    net = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3, padding=1), mid=nn.Conv2d(4, 4, 1),
                                    flat=nn.Flatten(), head=nn.Linear(4 * h * w, 6))).double()
    plan = MetaMixer(0.7, 2.0, stages=(stage,), generator=seeded(rng)).sample(y)
    with torch.no_grad():
        with plan.global_mixing(net):
            out = net(getattr(plan, apply)(x))
        u = local_mixture(x, plan)
        if stage == "input":
            expected = net(global_mixture(u, plan))
        else:
            act = u
            for name, module in net.named_children():
                act = module(act)
                if name == stage:
                    act = global_mixture(act, plan)
            expected = act
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_target_rows(rng):
    n = 32
    y = torch.randint(0, 5, (n,), generator=rng)
    plan = MetaMixer(0.5, 0.5, generator=seeded(rng)).sample(y, size=(16, 16))
    t = plan.target
    assert isinstance(t, MixedTarget) and t.labels.shape == (n, 4) and t.weights.shape == (n, 4)
    assert t.labels.dtype == torch.int64 and t.weights.dtype == torch.float32
    s, p = plan.local_src, plan.global_src
    torch.testing.assert_close(t.labels, torch.stack([y, y[s], y[p], y[s][p]], 1))
    assert bool((t.weights >= 0).all())
    torch.testing.assert_close(t.weights.sum(1), torch.ones(n), rtol=0, atol=1e-6)
    torch.testing.assert_close(t.weights.double(), weights64(plan), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size", [(32, 32), (7, 13), (1, 1), (2, 50)])
def test_lam_is_the_exact_unpasted_area(size, rng):
    h, w = size
    n = 256
    plan = MetaMixer(1.0, 1.0, generator=seeded(rng)).sample(torch.randint(0, 8, (n,), generator=rng))
    x = torch.rand(n, 2, h, w, generator=rng)
    u = plan.apply_local(x)
    box = plan.box
    assert bool((box[:, 0] >= 0).all() and (box[:, 0] <= box[:, 1]).all() and (box[:, 1] <= h).all())
    assert bool((box[:, 2] >= 0).all() and (box[:, 2] <= box[:, 3]).all() and (box[:, 3] <= w).all())
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    torch.testing.assert_close(plan.lam.double(), 1 - area.double() / (h * w), rtol=0, atol=1e-7)
    # The pasted pixels are exactly the box (where the partner's pixels differ from one's own).
    changed = (u != x).any(1).sum((1, 2))
    differs = plan.local_src != torch.arange(n)
    assert bool((changed[differs] == area[differs]).all())


def test_box_rule(rng):
    """Cut of floor(H sqrt(1 - lam)) by floor(W sqrt(1 - lam)) around the centre, clipped."""
    n, h, w = 4000, 24, 40
    lam = torch.rand(n, dtype=torch.float64, generator=rng)
    center = torch.rand(n, 2, dtype=torch.float64, generator=rng)
    box, lam_c = cutmix_boxes(lam, center, h, w)
    cut_h = (h * (1 - lam).sqrt()).floor().long()
    cut_w = (w * (1 - lam).sqrt()).floor().long()
    cy, cx = (center[:, 0] * h).long(), (center[:, 1] * w).long()
    torch.testing.assert_close(box[:, 0], (cy - cut_h // 2).clamp(0, h))
    torch.testing.assert_close(box[:, 1], (cy - cut_h // 2 + cut_h).clamp(0, h))
    torch.testing.assert_close(box[:, 2], (cx - cut_w // 2).clamp(0, w))
    torch.testing.assert_close(box[:, 3], (cx - cut_w // 2 + cut_w).clamp(0, w))
    inside = (box[:, 1] - box[:, 0] == cut_h) & (box[:, 3] - box[:, 2] == cut_w)
    assert 0.05 < inside.double().mean() < 1.0  # some boxes are clipped, many are not
    assert bool((lam_c >= lam - 1e-12).all())  # clipping only ever shrinks the pasted area


def test_plan_on_another_device_fixes_boxes_and_target_from_host_copies(rng):
    """A plan sampled onto an accelerator resolves its boxes and builds its target without copying
    anything back to the host (which would wait for the device). A "meta" plan stands in for
    one: its tensors have no data, so any device-to-host copy raises."""
    y = labels_with_groups(rng, 32, 4)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    here = MetaMixer(generator=torch.Generator().manual_seed(seed)).sample(y, size=(24, 40))
    there = MetaMixer(generator=torch.Generator().manual_seed(seed)).sample(y, device="meta")
    there.resolve((24, 40))
    assert there.box.device.type == "meta" and there.lam.device.type == "meta"
    assert there.box.shape == here.box.shape and there.lam.dtype == here.lam.dtype
    target = there.target
    assert target.labels.device.type == "meta" and target.weights.device.type == "meta"
    assert target.weights.shape == here.target.weights.shape
    # the host copies are the same draws the CPU plan came from, and give the same results
    host = there._host
    assert host is not None and torch.equal(host.lam_draw, here.lam_draw)
    assert torch.equal(host.center, here.center) and torch.equal(there._host_lam, here.lam)


# ------------------------------------------------------------------------------------- pairing

@pytest.mark.parametrize("n, classes", [(2, 1), (8, 4), (64, 10), (33, 16), (50, 2)])
def test_pairing_rules_hold_when_the_batch_allows(n, classes, rng):
    y = labels_with_groups(rng, n, classes) if classes > 1 else torch.zeros(n, dtype=torch.int64)
    mixer = MetaMixer(generator=seeded(rng))
    for _ in range(5):
        plan = mixer.sample(y)
        sigma, pi = plan.local_src, plan.global_src
        ar = torch.arange(n)
        assert bool((y[sigma] == y).all() and (sigma != ar).all())
        assert torch.equal(sigma.sort().values, ar)  # a permutation inside every class
        if classes > 1:
            assert bool((y[pi] != y).all())
            assert torch.equal(pi.sort().values, ar)  # largest class <= N/2: a permutation
    stats = mixer.stats
    assert stats["local_fallback"] == 0 and stats["local_found_rate"] == 1.0
    assert stats["global_fallback"] == (0 if classes > 1 else 5 * n)
    assert stats["local_samples"] == stats["global_samples"] == 5 * n


def test_other_class_with_a_majority_class(rng):
    n = 20
    y = torch.zeros(n, dtype=torch.int64)
    y[torch.randperm(n, generator=rng)[:3]] = torch.tensor([1, 2, 2])
    mixer = MetaMixer(generator=seeded(rng))
    plan = mixer.sample(y)
    assert bool((y[plan.global_src] != y).all())
    assert mixer.stats["global_fallback"] == 0
    assert mixer.stats["local_fallback"] == 1  # the lone sample of class 1


def test_fallbacks_are_random_and_counted(rng):
    y = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])  # classes 1 and 3 are alone
    y = y[torch.randperm(8, generator=rng)]
    mixer = MetaMixer(generator=seeded(rng))
    plan = mixer.sample(y)
    alone = (y == 1) | (y == 3)
    assert bool((plan.local_src[alone] != torch.arange(8)[alone]).all())
    assert bool((y[plan.local_src][~alone] == y[~alone]).all())
    assert mixer.stats["local_fallback"] == 2
    assert mixer.stats["local_found_rate"] == pytest.approx(1 - 2 / 8)
    one = mixer.sample(torch.tensor([3]))  # a batch of one: mixed with itself
    assert int(one.local_src) == 0 and int(one.global_src) == 0
    assert mixer.stats["local_fallback"] == 3 and mixer.stats["global_fallback"] == 1


@pytest.mark.parametrize("offset", [-3, 70_000, -(2**40)])
def test_pairing_does_not_depend_on_the_label_values(offset, rng):
    """Labels in [0, 65536) are grouped by a bincount, others by a sort: shifting every label
    (same classes, same order) must give the same partners from the same generator state."""
    y = labels_with_groups(rng, 96, 7)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    plans = [MetaMixer(generator=torch.Generator().manual_seed(seed)).sample(labels)
             for labels in (y, y + offset)]
    assert torch.equal(plans[0].local_src, plans[1].local_src)
    assert torch.equal(plans[0].global_src, plans[1].global_src)
    assert bool((y[plans[1].global_src] != y).all())


def test_random_pairing_is_a_derangement(rng):
    n = 17
    y = torch.zeros(n, dtype=torch.int64)
    mixer = MetaMixer(local_pairing="random", global_pairing="random", generator=seeded(rng))
    plan = mixer.sample(y)
    for src in (plan.local_src, plan.global_src):
        assert torch.equal(src.sort().values, torch.arange(n)) and bool((src != torch.arange(n)).all())
    assert mixer.stats["local_fallback"] == mixer.stats["global_fallback"] == 0


# --------------------------------------------------------------------------------------- hooks

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


# ----------------------------------------------------------------- identity, seeds, resume

def test_prob_zero_is_the_identity_plan(rng):
    n = 7
    y = torch.randint(0, 3, (n,), generator=rng)
    x = torch.randn(n, 3, 4, 4, generator=rng)
    net = nn.Sequential(OrderedDict(a=nn.Conv2d(3, 2, 1), f=nn.Flatten()))
    mixer = MetaMixer(prob=0.0, stages=("input", "a"), generator=seeded(rng))
    plan = mixer.sample(y)
    assert not plan.mixed and plan.apply_local(x) is x
    with plan.global_mixing(net):
        assert no_hooks_left(net)
        out = net(x)
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    torch.testing.assert_close(plan.target.labels, y[:, None].expand(n, 4))
    torch.testing.assert_close(plan.target.weights, torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4))
    assert mixer.stats["steps"] == 1 and mixer.stats["mixed_steps"] == 0


def test_prob_is_the_mixed_fraction(rng):
    mixer = CutMix(prob=0.3, generator=seeded(rng))
    y = torch.zeros(2, dtype=torch.int64)
    mixed = sum(mixer.sample(y).mixed for _ in range(2000))
    assert abs(mixed / 2000 - 0.3) < 0.05
    assert mixer.stats["mixed_steps"] == mixed and mixer.stats["steps"] == 2000


def plan_tensors(plan: MixPlan) -> list[torch.Tensor]:
    return [plan.local_src, plan.lam, plan.box, plan.global_src, plan.mu, *plan.target]


def test_same_seed_same_plans_and_state_dict_resumes(rng):
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    y = torch.randint(0, 6, (24,), generator=rng)
    kwargs = dict(local_alpha=0.4, global_alpha=0.6, prob=0.7, stages=("input", "a", "b"))
    m1 = MetaMixer(**kwargs, generator=torch.Generator().manual_seed(seed))
    m2 = MetaMixer(**kwargs, generator=torch.Generator().manual_seed(seed))
    for _ in range(6):
        p1, p2 = m1.sample(y, size=(8, 8)), m2.sample(y, size=(8, 8))
        assert p1.mixed == p2.mixed and p1.stage == p2.stage
        if p1.mixed:
            for a, b in zip(plan_tensors(p1), plan_tensors(p2)):
                assert torch.equal(a, b)
    state, stats_then = m1.state_dict(), m1.stats
    ahead = [m1.sample(y, size=(8, 8)) for _ in range(6)]
    m3 = MetaMixer(**kwargs, generator=torch.Generator().manual_seed(seed + 1))
    m3.load_state_dict(state)
    assert m3.stats == stats_then
    for p1 in ahead:
        p3 = m3.sample(y, size=(8, 8))
        assert p1.mixed == p3.mixed and p1.stage == p3.stage
        if p1.mixed:
            for a, b in zip(plan_tensors(p1), plan_tensors(p3)):
                assert torch.equal(a, b)
    assert m3.stats == m1.stats


def test_plan_moves_to_the_requested_device_and_target_needs_the_size(rng):
    y = torch.randint(0, 3, (6,), generator=rng)
    plan = MetaMixer(generator=seeded(rng)).sample(y, device="cpu")
    with pytest.raises(RuntimeError, match="resolve"):
        plan.target  # noqa: B018
    plan.resolve((8, 8))
    assert plan.target.weights.shape == (6, 4)
    with pytest.raises(ValueError, match="size"):
        plan.apply_local(torch.randn(6, 3, 9, 9))


# ------------------------------------------------------------------------------------ baselines

@pytest.mark.parametrize("cls, alpha", [(CutMix, 1.0), (CutMix, 0.3), (Mixup, 0.8), (Mixup, 2.0)])
def test_baseline_lam_follows_beta(cls, alpha, rng):
    n = 20000
    plan = cls(alpha, mode="elem", generator=seeded(rng)).sample(torch.zeros(n, dtype=torch.int64))
    lam = plan.lam_draw
    assert abs(float(lam.mean()) - 0.5) < 0.02
    assert abs(float(lam.var()) - 1 / (4 * (2 * alpha + 1))) < 0.02
    assert float(lam.min()) >= 0 and float(lam.max()) <= 1


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_pastes_the_partner_box(mode, rng, mix_backend):
    n, h, w = 16, 11, 14
    y = torch.randint(0, 4, (n,), generator=rng)
    x = torch.randn(n, 3, h, w, dtype=torch.float64, generator=rng)
    plan = CutMix(1.0, mode=mode, generator=seeded(rng)).sample(y)
    u = plan.apply_local(x)
    torch.testing.assert_close(u, local_mixture(x, plan), rtol=0, atol=0)
    assert bool((plan.local_w == 0).all())
    box = plan.box
    if mode == "batch":
        assert bool((box == box[0]).all()) and bool((plan.lam_draw == plan.lam_draw[0]).all())
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    lam = 1 - area.double() / (h * w)
    sig = plan.local_src
    assert torch.equal(sig.sort().values, torch.arange(n)) and bool((sig != torch.arange(n)).all())
    t = plan.target
    torch.testing.assert_close(t.labels, torch.stack([y, y[sig], y, y[sig]], 1))
    expected = torch.stack([lam, 1 - lam, torch.zeros(n, dtype=torch.float64),
                            torch.zeros(n, dtype=torch.float64)], 1).float()
    torch.testing.assert_close(t.weights, expected)


@pytest.mark.parametrize("features", [False, True])
def test_mixup_blends_whole_samples(features, rng, mix_backend):
    n = 12
    y = torch.randint(0, 4, (n,), generator=rng)
    shape = (n, 7) if features else (n, 3, 5, 6)
    x = torch.randn(*shape, dtype=torch.float64, generator=rng)
    plan = Mixup(0.8, generator=seeded(rng)).sample(y)
    assert plan.box is None and plan.cut is None
    lam = plan.lam
    sig = plan.local_src
    expected = lam.view(-1, *[1] * (x.dim() - 1)) * x + (1 - lam.view(-1, *[1] * (x.dim() - 1))) * x[sig]
    torch.testing.assert_close(plan.apply_local(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plan.target.weights[:, 0].double(), lam, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(plan.target.weights.sum(1), torch.ones(n), rtol=0, atol=1e-6)


def test_cutmix_or_mixup_switches(rng):
    n, h, w = 4000, 8, 8
    y = torch.randint(0, 10, (n,), generator=rng)
    plan = CutMixOrMixup(1.0, 0.8, switch_prob=0.3, mode="elem", generator=seeded(rng)).sample(y)
    x = torch.rand(n, 1, h, w, dtype=torch.float64, generator=rng)
    u = plan.apply_local(x)
    cut = plan.cut
    assert abs(float(cut.double().mean()) - 0.3) < 0.04
    box = plan.box
    full = torch.tensor([0, h, 0, w])
    assert bool((box[~cut] == full).all()) and bool((plan.local_w[cut] == 0).all())
    torch.testing.assert_close(plan.local_w[~cut].double(), plan.lam[~cut], rtol=0, atol=0)
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    torch.testing.assert_close(plan.lam[cut], 1 - area[cut].double() / (h * w))
    torch.testing.assert_close(u, local_mixture(x, plan), rtol=1e-12, atol=1e-12)
    batch = CutMixOrMixup(switch_prob=0.5, generator=seeded(rng))
    kinds = set()
    for _ in range(40):
        p = batch.sample(y[:8])
        kinds.add(p.cut is not None)
        assert p.cut is None or bool(p.cut.all())
    assert kinds == {True, False}


@pytest.mark.parametrize("switch_prob", [0.0, 0.5, 1.0])
def test_elem_mode_applies_prob_per_sample(switch_prob, rng):
    """As timm's elem mode: each sample is mixed with probability prob, and one left unmixed
    has an empty box and its own label (lam = 1). The plan's statistics, with no kernel: how a
    kernel copies the kept rows is the next test's."""
    n = 3000
    y = torch.randint(0, 10, (n,), generator=rng)
    mixer = CutMixOrMixup(1.0, 0.8, switch_prob=switch_prob, prob=0.3, mode="elem",
                          generator=seeded(rng))
    plan = mixer.sample(y).resolve((6, 7))
    assert plan.mixed and mixer.stats["mixed_steps"] == 1
    unmixed = plan.lam_draw == 1  # (a drawn lam < 1 may still give an empty box on a 6x7 image)
    assert abs(float(unmixed.double().mean()) - 0.7) < 0.04
    assert torch.equal(plan.keep, unmixed)
    assert mixer.stats["local_samples"] == n - int(unmixed.sum())
    box = plan.box
    assert bool((box[unmixed, 1] == box[unmixed, 0]).all())  # empty boxes
    t = plan.target
    assert torch.equal(t.weights[unmixed], torch.tensor([1.0, 0, 0, 0]).expand(int(unmixed.sum()), 4))
    if 0 < switch_prob < 1:
        assert abs(float(plan.cut[~unmixed].double().mean()) - switch_prob) < 0.05
    none = CutMixOrMixup(prob=0.0, mode="elem", generator=seeded(rng))
    assert not none.sample(y[:4]).mixed and none.stats["mixed_steps"] == 0
    batch = CutMixOrMixup(prob=0.5, generator=seeded(rng))
    plans = [batch.sample(y[:8]) for _ in range(60)]
    assert {p.mixed for p in plans} == {True, False}  # batch mode: prob is per step
    assert all(bool((p.lam_draw < 1).all()) for p in plans if p.mixed)


@pytest.mark.parametrize("switch_prob", [0.0, 0.5, 1.0])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: 0 * inf
def test_elem_mode_copies_unmixed_samples_bit_for_bit(switch_prob, rng, mix_backend):
    """A sample elem mode leaves unmixed keeps its pixels bit for bit, even where its partner
    holds inf; the mixed ones are the local mixture."""
    n = 40
    y = torch.randint(0, 10, (n,), generator=rng)
    mixer = CutMixOrMixup(1.0, 0.8, switch_prob=switch_prob, prob=0.5, mode="elem",
                          generator=seeded(rng))
    plan = mixer.sample(y)
    unmixed = plan.keep
    while unmixed is None or not 0 < int(unmixed.sum()) < n:  # both kinds of row, whatever the seed
        plan = mixer.sample(y)
        unmixed = plan.keep
    x = torch.randn(n, 2, 6, 7, generator=rng)
    x[plan.local_src[unmixed]] = float("inf")  # the partners of the kept samples
    u = plan.apply_local(x)
    assert torch.equal(u[unmixed], x[unmixed])
    torch.testing.assert_close(u[~unmixed], local_mixture(x, plan)[~unmixed], rtol=0, atol=1e-6,
                               equal_nan=True)


@pytest.mark.parametrize("shape", ["features", "transposed features", "images"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: 0 * inf
def test_mixup_elem_mode_with_unmixed_samples_stays_mixup_only(shape, rng, mix_backend):
    """Mixup(mode="elem", prob < 1) encoded its unmixed samples as empty CutMix boxes, so its
    plan needed an image size for its target and refused [N, D] features. A kept sample is no
    CutMix row: the plan is Mixup-only, and a kept sample is still copied bit for bit (even
    where its partner holds inf, as timm skips it) with its own label as target."""
    n, d = 40, 9
    y = torch.randint(0, 5, (n,), generator=rng)
    mixer = Mixup(0.8, prob=0.6, mode="elem", generator=seeded(rng))
    plan = mixer.sample(y)
    keep = plan.keep
    assert plan.mixed and plan.cut is None and keep is not None and bool(keep.any())
    assert mixer.stats["local_samples"] == n - int(keep.sum())
    t = plan.target  # before any image size is known
    lam = plan.lam
    assert bool((lam[keep] == 1).all())
    torch.testing.assert_close(t.labels, torch.stack([y, y[plan.local_src], y, y[plan.local_src]], 1))
    zeros = torch.zeros(n, dtype=torch.float64)
    torch.testing.assert_close(t.weights, torch.stack([lam, 1 - lam, zeros, zeros], 1).float())
    if shape == "images":
        x = torch.randn(n, 3, 5, 6, generator=rng)
    elif shape == "features":
        x = torch.randn(n, d, generator=rng)
    else:
        x = torch.randn(d, n, generator=rng).t()
    x[plan.local_src[keep]] = float("inf")  # the kept samples' partners
    u = plan.apply_local(x)
    assert u.shape == x.shape
    assert torch.equal(u[keep], x[keep])
    lam_x = lam.view(-1, *[1] * (x.dim() - 1))
    expected = lam_x * x.double() + (1 - lam_x) * x.double()[plan.local_src]
    blended = ~keep & expected.flatten(1).isfinite().all(1)  # (not the rows with an inf partner)
    torch.testing.assert_close(u[blended].double(), expected[blended], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, features_ok", [
    (lambda g: Mixup(prob=0.5, mode="batch", generator=g), True),
    (lambda g: Mixup(prob=0.5, mode="elem", generator=g), True),
    (lambda g: CutMixOrMixup(switch_prob=0.0, prob=0.5, mode="elem", generator=g), True),
    (lambda g: CutMix(prob=0.5, mode="batch", generator=g), False),
    (lambda g: CutMix(prob=0.5, mode="elem", generator=g), False),
    (lambda g: CutMixOrMixup(switch_prob=0.5, prob=0.5, mode="elem", generator=g), False),
], ids=["Mixup-batch", "Mixup-elem", "CutMixOrMixup-elem-switch0", "CutMix-batch", "CutMix-elem",
        "CutMixOrMixup-elem"])
def test_which_baseline_plans_mix_features(make, features_ok, rng):
    """The rule for [N, D] features: a plan without CutMix rows mixes them and has its target
    before any image size; one with CutMix rows needs [N, C, H, W] images, and says so."""
    n = 64
    mixer = make(seeded(rng))
    plan = mixer.sample(torch.randint(0, 4, (n,), generator=rng))
    while not plan.mixed:  # (batch mode: an unmixed step mixes anything)
        plan = mixer.sample(torch.randint(0, 4, (n,), generator=rng))
    x = torch.randn(n, 7, generator=rng)
    if features_ok:
        assert plan.cut is None
        assert plan.target.weights.shape == (n, 4)
        assert plan.apply_local(x).shape == x.shape
    else:
        with pytest.raises(RuntimeError, match="resolve"):
            plan.target  # noqa: B018
        with pytest.raises(ValueError, match=r"CutMix boxes need \[N, C, H, W\] images"):
            plan.apply_local(x)


# ----------------------------------------------------------------------------------- bad input

Y = torch.tensor([0, 1, 1, 0])


@pytest.mark.parametrize("make, match", [
    (lambda: MetaMixer(local_alpha=0.0), "local_alpha"),
    (lambda: MetaMixer(global_alpha=-1.0), "global_alpha"),
    (lambda: MetaMixer(local_alpha=float("nan")), "local_alpha"),
    (lambda: MetaMixer(prob=1.5), "prob"),
    (lambda: MetaMixer(prob=-0.1), "prob"),
    (lambda: MetaMixer(stages=()), "stages"),
    (lambda: MetaMixer(stages=("input", "input")), "stages"),
    (lambda: MetaMixer(local_pairing="other_class"), "local_pairing"),
    (lambda: MetaMixer(global_pairing="same_class"), "global_pairing"),
    (lambda: MetaMixer(generator=123), "generator"),
    (lambda: CutMix(0.0), "alpha"),
    (lambda: Mixup(-2.0), "alpha"),
    (lambda: CutMixOrMixup(switch_prob=2.0), "switch_prob"),
    (lambda: CutMixOrMixup(mode="pair"), "mode"),
    (lambda: MetaMixer(local_alpha=np.True_), "local_alpha"),
    (lambda: MetaMixer(global_alpha=np.float32("inf")), "global_alpha"),
    (lambda: CutMix(prob=np.float64(1.5)), "prob"),
    (lambda: Mixup(prob=np.bool_(True)), "prob"),
    (lambda: CutMixOrMixup(switch_prob=np.float32("nan")), "switch_prob"),
    (lambda: Mixup("0.8"), "alpha"),
    (lambda: MetaMixer().sample(Y.float()), "int64"),
    (lambda: MetaMixer().sample(Y[None]), "1-D"),
    (lambda: MetaMixer().sample(Y[:0]), "N >= 1"),
    (lambda: MetaMixer().sample(Y).apply_local(torch.randn(3, 3, 4, 4)), "N=4"),
    (lambda: MetaMixer().sample(Y).apply_local(torch.randn(4, 6)), r"\[N, C, H, W\]"),
    (lambda: MetaMixer(stages=None), "stages"),
    (lambda: MetaMixer().sample(Y, size=(3, 8, 8)), "'size' must be the images' \\(H, W\\)"),
    (lambda: MetaMixer().sample(Y, size=8), "'size'"),
    (lambda: MetaMixer().sample(Y, size=(8.5, 8)), "'size'"),
    (lambda: MetaMixer().sample(Y, size=(0, 8)), "'size'"),
    (lambda: MetaMixer().sample(Y).resolve((3, 8, 8)), "MixPlan.resolve: 'size'"),
    (lambda: MetaMixer().load_state_dict({"generator": torch.Generator().get_state(),
                                          "stats": None}), "'stats'"),
    (lambda: MetaMixer().load_state_dict({"generator": torch.zeros(3), "stats": {}}),
     "'generator' must be a torch.Generator state"),
    (lambda: MetaMixer().load_state_dict({"generator": None, "stats": {}}), "'generator'"),
    (lambda: MetaMixer().load_state_dict({"generator": torch.zeros(3, dtype=torch.uint8),
                                          "stats": {}}), "'generator' is not a state"),
])
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize("make, attrs", [
    (lambda: MetaMixer(local_alpha=np.float32(0.5), global_alpha=np.int64(2),
                       prob=np.float64(0.25)),
     {"local_alpha": 0.5, "global_alpha": 2.0, "prob": 0.25}),
    (lambda: CutMix(np.float32(0.5), prob=Fraction(1, 2)), {"cutmix_alpha": 0.5, "prob": 0.5}),
    (lambda: Mixup(np.float64(0.2), prob=np.float32(1)), {"mixup_alpha": 0.2, "prob": 1.0}),
    (lambda: CutMixOrMixup(np.int32(1), np.float16(0.5), switch_prob=np.float32(0.25)),
     {"cutmix_alpha": 1.0, "mixup_alpha": 0.5, "switch_prob": 0.25}),
], ids=["MetaMixer", "CutMix", "Mixup", "CutMixOrMixup"])
def test_hyperparameters_may_be_any_real_number(make, attrs):
    """numpy scalars (read from an array, a config) and Fractions are numbers: they were refused
    as "must be a finite number > 0 ... got np.float32(0.5)". Kept as Python floats."""
    mixer = make()
    for name, value in attrs.items():
        got = getattr(mixer, name)
        assert type(got) is float and got == value, name


def test_a_refused_sample_draws_and_counts_nothing():
    mixer = MetaMixer(generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="'size'"):
        mixer.sample(Y, size=(4, 4, 4))
    assert mixer.stats["steps"] == 0
    fresh = MetaMixer(generator=torch.Generator().manual_seed(5))
    assert torch.equal(mixer.sample(Y).global_src, fresh.sample(Y).global_src)


def test_bad_stage_modules_raise_clear_errors():
    net = nn.Sequential(OrderedDict(stem=nn.Linear(5, 5), layer2=nn.Linear(5, 5)))
    plan = MetaMixer(stages=("input", "layer3")).sample(Y)
    with pytest.raises(ValueError, match=r"no submodule 'layer3'.*'stem', 'layer2'"), \
            plan.global_mixing(net):
        pass
    plan = MetaMixer(stages=("mid",)).sample(Y)
    with pytest.raises(ValueError, match="no entry for stage 'mid'"), \
            plan.global_mixing([net], stage_modules=[{"late": "layer2"}]):
        pass
    with pytest.raises(ValueError, match="one dict per peer"), \
            plan.global_mixing([net], stage_modules=[{"mid": "stem"}, {"mid": "stem"}]):
        pass
    with pytest.raises(ValueError, match="twice"), plan.global_mixing([net, net]):
        pass
    with pytest.raises(ValueError, match="empty"), plan.global_mixing([]):
        pass
    assert no_hooks_left(net)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plan_on_cuda_equals_the_cpu_plan(rng):
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    y = torch.randint(0, 4, (16,), generator=rng)
    x = torch.randn(16, 3, 8, 8, generator=rng)
    cpu = MetaMixer(generator=torch.Generator().manual_seed(seed)).sample(y)
    for labels, device in ((y, "cuda"), (y.cuda(), None)):
        gpu = MetaMixer(generator=torch.Generator().manual_seed(seed)).sample(labels, device=device)
        assert gpu.local_src.is_cuda and gpu.mu.is_cuda and gpu.labels.is_cuda
        torch.testing.assert_close(gpu.apply_local(x.cuda()).cpu(), cpu.apply_local(x))
        torch.testing.assert_close(gpu.blend(x.cuda()).cpu(), cpu.blend(x))
        for a, b in zip(gpu.target, cpu.target):
            torch.testing.assert_close(a.cpu(), b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(64, 7), (64, 3, 5, 6)], ids=["features", "images"])
def test_mixup_plan_with_kept_samples_on_cuda_equals_the_cpu_plan(shape, rng):
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    y = torch.randint(0, 4, (64,), generator=rng)
    x = torch.randn(*shape, generator=rng)
    cpu = Mixup(prob=0.5, mode="elem", generator=torch.Generator().manual_seed(seed)).sample(y)
    gpu = Mixup(prob=0.5, mode="elem", generator=torch.Generator().manual_seed(seed)).sample(
        y, device="cuda")
    assert cpu.keep is not None and gpu.keep.is_cuda and gpu.cut is None
    torch.testing.assert_close(gpu.apply_local(x.cuda()).cpu(), cpu.apply_local(x), rtol=0, atol=0)
    for a, b in zip(gpu.target, cpu.target):
        torch.testing.assert_close(a.cpu(), b)
