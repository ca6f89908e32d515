"""Wrong uses of the public API that a type checker must report (tests/test_typing.py counts
one error on each line marked `# error`)."""

from __future__ import annotations

import torch

import metamixer_fast as mf
from metamixer_fast import MetaMixer, MixedTarget, MixPlan

y = torch.zeros(4, dtype=torch.long)
plan: MixPlan = MetaMixer().sample(y)
count: int = mf.mix(torch.randn(2, 3), torch.tensor([1, 0]), torch.rand(2))  # error
target: MixedTarget = plan  # error
MetaMixer(local_alpha="1.0")  # error
plan.resolve(8)  # error
