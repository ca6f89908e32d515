"""In-batch partner sampling for the mixing plans (DESIGN.md section 1, "Pairing modes").

Every function takes CPU labels y[N] (int64) and a CPU ``torch.Generator`` and returns
(partner[N] int64, fallback[N] bool): ``partner[i]`` is the sample whose pixels/activations
sample i receives, ``fallback[i]`` says that no sample satisfied the requested rule for i and a
random partner was used instead. All work is vectorized (sort by a random class key, then
index arithmetic inside the class groups); there is no Python loop over samples.

Random partners come from a random cyclic permutation (shuffle the batch, then each sample
takes the next one in the shuffled order): a permutation without fixed points for N >= 2, so
every image is used exactly once as a partner and no sample is mixed with itself. (timm flips
the batch, which is a fixed pairing that leaves the middle sample of an odd batch alone.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ClassGroups", "class_groups", "other_class_partners", "random_cycle",
           "same_class_partners"]


def random_cycle(n: int, generator: torch.Generator) -> Tensor:
    """A uniformly random n-cycle as a partner map: no fixed points for n >= 2."""
    order = torch.randperm(n, generator=generator)
    partner = torch.empty(n, dtype=torch.int64)
    partner[order] = order.roll(-1)
    return partner


class ClassGroups(NamedTuple):
    """The batch grouped by class, in a random class order and a random order within a class.

    ``order[p]`` is the sample at sorted position p; ``start[p]``/``size[p]`` are the first
    position and the size of the class group that position p belongs to.
    """

    order: Tensor
    start: Tensor
    size: Tensor


def class_groups(y: Tensor, generator: torch.Generator) -> ClassGroups:
    n = y.numel()
    shuffle = torch.randperm(n, generator=generator)
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    rank = torch.randperm(counts.numel(), generator=generator)  # a random rank per class
    sorted_key, within = torch.sort(rank[inverse][shuffle], stable=True)
    order = shuffle[within]
    counts_by_rank = torch.empty_like(counts)
    counts_by_rank[rank] = counts
    starts_by_rank = counts_by_rank.cumsum(0) - counts_by_rank
    return ClassGroups(order, starts_by_rank[sorted_key], counts_by_rank[sorted_key])


def _scatter(groups: ClassGroups, partner_pos: Tensor) -> Tensor:
    """Turn 'position p pairs with position q' into partner[sample at p] = sample at q."""
    partner = torch.empty_like(groups.order)
    partner[groups.order] = groups.order[partner_pos]
    return partner


def same_class_partners(y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each sample's partner is another sample of its class: a random cycle inside every class
    group (a permutation). Samples alone in their class fall back to a random partner."""
    n = y.numel()
    groups = class_groups(y, generator)
    pos = torch.arange(n)
    nxt = groups.start + (pos - groups.start + 1) % groups.size
    partner = _scatter(groups, nxt)
    fallback = torch.empty(n, dtype=torch.bool)
    fallback[groups.order] = groups.size == 1
    rnd = random_cycle(n, generator)
    return torch.where(fallback, rnd, partner), fallback


def other_class_partners(y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each sample's partner is a sample of another class.

    With the largest class holding m <= N/2 samples, shifting the class-sorted batch by any s in
    [m, N - m] pairs every position with another class, and the result is a permutation; s is
    drawn at random. When one class holds more than half the batch no permutation can do that,
    so the samples the shift leaves in their own class draw a partner uniformly among the other
    classes (the map is then not a permutation). A batch of one class falls back to random.
    """
    n = y.numel()
    groups = class_groups(y, generator)
    m = int(groups.size.max())
    lo, hi = min(m, n - m), max(m, n - m)
    shift = int(torch.randint(lo, hi + 1, (1,), generator=generator)) if n > 1 else 0
    pos = torch.arange(n)
    shifted = (pos + shift) % n
    # Uniform draw among the N - size positions outside the own group, for the repairs.
    others = n - groups.size
    r = (torch.rand(n, dtype=torch.float64, generator=generator) * others).long()
    r = torch.minimum(r, (others - 1).clamp_min(0))
    outside = torch.where(r < groups.start, r, r + groups.size)
    same = (shifted >= groups.start) & (shifted < groups.start + groups.size)
    partner_pos = torch.where(same & (others > 0), outside, shifted)
    partner = _scatter(groups, partner_pos)
    fallback = torch.empty(n, dtype=torch.bool)
    fallback[groups.order] = others == 0
    rnd = random_cycle(n, generator)
    return torch.where(fallback, rnd, partner), fallback
