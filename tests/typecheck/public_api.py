"""Typical uses of the public API, written as a user would: a type checker must accept them
(tests/test_typing.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import metamixer_fast as mf
from metamixer_fast import CutMix, CutMixOrMixup, MetaMixer, MixedKDLoss, MixedTarget, MixPlan, Mixup

peers = nn.ModuleList([nn.Linear(8, 10), nn.Linear(8, 10)])
criterion = MixedKDLoss(temperature=3.0, kd_weight=1.0, mode="ensemble",
                        peer_weights=torch.ones(2, 2))
x, y = torch.randn(4, 8), torch.randint(0, 10, (4,))
out = criterion([p(x) for p in peers], y)
loss: Tensor = out.loss
ce: Tensor = out.ce
ce2, kd2 = mf.mixed_kd_loss(torch.randn(2, 4, 10), y, None, temperature=2.0, label_smoothing=0.1,
                            mode="pairwise", peer_matrix=None, detach_targets=False)
target = MixedTarget(torch.zeros(4, 2, dtype=torch.long), torch.full((4, 2), 0.5))
out2 = criterion(torch.randn(2, 4, 10), target)
mixed: Tensor = mf.mix(torch.randn(4, 3, 8, 8), torch.tensor([1, 0, 3, 2]), torch.rand(4),
                       torch.tensor([[0, 4, 0, 4]] * 4))
both: Tensor = mf.mix2(torch.randn(4, 3, 8, 8), torch.tensor([1, 0, 3, 2]), torch.rand(4),
                       torch.tensor([[0, 4, 0, 4]] * 4), torch.tensor([2, 3, 0, 1]), torch.rand(4))
g = torch.Generator().manual_seed(0)
mixer = MetaMixer(local_alpha=1.0, global_alpha=0.5, prob=0.8, stages=("input", "layer2"),
                  local_pairing="same_class", global_pairing="other_class", generator=g)
plan: MixPlan = mixer.sample(y)
images = plan.apply_local(torch.randn(4, 3, 8, 8))
images = plan.apply(images)
t: MixedTarget = plan.target
with plan.global_mixing(list(peers)):
    pass
stats: dict = mixer.stats
state = mixer.state_dict()
mixer.load_state_dict(state)
for base in (CutMix(1.0), Mixup(0.2), CutMixOrMixup(1.0, 0.8, switch_prob=0.5, prob=0.5, mode="elem")):
    p2: MixPlan = base.sample(y)
    p2.resolve((8, 8))
