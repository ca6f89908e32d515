"""MetaMixer / MixPlan: the plan applied by ``mix`` + hooks equals a direct float64 construction
of the four-image mixture, and the sampler obeys its rules. (The hooks on their own:
test_stage_hooks.py; the CutMix and Mixup baselines: test_baselines.py.)"""

from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction

import numpy as np
import pytest
import torch
from plans import (
    global_mixture,
    image_weights,
    labels_with_groups,
    local_mixture,
    no_hooks_left,
    seeded,
    weights64,
)
from torch import nn

from metamixer_fast import CutMix, CutMixOrMixup, MetaMixer, MixedTarget, MixPlan, Mixup
from metamixer_fast.plan import cutmix_boxes

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
