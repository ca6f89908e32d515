"""The baselines from the plan machinery: CutMix, Mixup and CutMix-or-Mixup with timm's
semantics (box rule, lam correction, switch probability, batch and elem modes)."""

from __future__ import annotations

import pytest
import torch
from plans import local_mixture, seeded

from metamixer_fast import CutMix, CutMixOrMixup, Mixup


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
