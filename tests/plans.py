"""Helpers of the MetaMixer tests (test_metamixer, test_stage_hooks, test_baselines): the
mixtures built sample by sample without ``mix``, and small models with named stages."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from metamixer_fast import MixPlan


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
