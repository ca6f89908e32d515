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

import numpy as np
import torch
from torch import Tensor

__all__ = ["ClassGroups", "class_groups", "other_class_partners", "random_cycle",
           "same_class_partners"]

# The draws come from the torch generator; the index arithmetic on them runs in numpy, where
# an operation on a few hundred integers costs about a microsecond instead of torch's two to
# five (python bench/bench_sampler.py). The results are the same integers either way.


def _randperm(n: int, generator: torch.Generator) -> np.ndarray:
    return torch.randperm(n, generator=generator).numpy()


def _random_cycle(n: int, generator: torch.Generator) -> np.ndarray:
    order = _randperm(n, generator)
    partner = np.empty(n, dtype=np.int64)
    partner[order[:-1]], partner[order[-1:]] = order[1:], order[:1]  # np.roll(order, -1)
    return partner


def random_cycle(n: int, generator: torch.Generator) -> Tensor:
    """A uniformly random n-cycle as a partner map: no fixed points for n >= 2."""
    return torch.from_numpy(_random_cycle(n, generator))


class ClassGroups(NamedTuple):
    """The batch grouped by class, in a random class order and a random order within a class.

    ``order[p]`` is the sample at sorted position p; ``start[p]``/``size[p]`` are the first
    position and the size of the class group that position p belongs to.
    """

    order: Tensor
    start: Tensor
    size: Tensor


def _classes(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inverse, counts) of ``np.unique(y)``: each sample's class index among the sorted
    classes present, and each class's count. Labels in [0, 65536) take a bincount, four times
    faster than np.unique's sort."""
    if y.min() < 0 or y.max() >= 65536:
        _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        return inverse, counts
    counts = np.bincount(y)
    present = counts > 0
    index = np.cumsum(present) - 1  # class index of every label value present
    return index[y], counts[present]


def _class_groups(y: np.ndarray, generator: torch.Generator) -> tuple[np.ndarray, ...]:
    """(order, start, size) of ``ClassGroups`` as numpy arrays."""
    shuffle = _randperm(y.size, generator)
    inverse, counts = _classes(y)
    rank = _randperm(counts.size, generator)  # a random rank per class
    key = rank[inverse][shuffle]
    within = np.argsort(key, kind="stable")
    sorted_key = key[within]
    counts_by_rank = np.empty_like(counts)
    counts_by_rank[rank] = counts
    starts_by_rank = counts_by_rank.cumsum() - counts_by_rank
    return shuffle[within], starts_by_rank[sorted_key], counts_by_rank[sorted_key]


def class_groups(y: Tensor, generator: torch.Generator) -> ClassGroups:
    return ClassGroups(*(torch.from_numpy(a) for a in _class_groups(y.numpy(), generator)))


def _scatter(order: np.ndarray, partner_pos: np.ndarray) -> np.ndarray:
    """Turn 'position p pairs with position q' into partner[sample at p] = sample at q."""
    partner = np.empty_like(order)
    partner[order] = order[partner_pos]
    return partner


def _with_fallback(order: np.ndarray, partner: np.ndarray, alone: np.ndarray,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(partner, fallback) with a random cycle's partner for the samples at positions ``alone``."""
    fallback = np.empty(order.size, dtype=bool)
    fallback[order] = alone
    rnd = _random_cycle(order.size, generator)
    return torch.from_numpy(np.where(fallback, rnd, partner)), torch.from_numpy(fallback)


def same_class_partners(y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each sample's partner is another sample of its class: a random cycle inside every class
    group (a permutation). Samples alone in their class fall back to a random partner."""
    order, start, size = _class_groups(y.numpy(), generator)
    nxt = start + (np.arange(y.numel()) - start + 1) % size
    return _with_fallback(order, _scatter(order, nxt), size == 1, generator)


def other_class_partners(y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each sample's partner is a sample of another class.

    With the largest class holding m <= N/2 samples, shifting the class-sorted batch by any s in
    [m, N - m] pairs every position with another class, and the result is a permutation; s is
    drawn at random. When one class holds more than half the batch no permutation can do that,
    so the samples the shift leaves in their own class draw a partner uniformly among the other
    classes (the map is then not a permutation). A batch of one class falls back to random.
    """
    n = y.numel()
    order, start, size = _class_groups(y.numpy(), generator)
    m = int(size.max())
    lo, hi = min(m, n - m), max(m, n - m)
    shift = int(torch.randint(lo, hi + 1, (1,), generator=generator)) if n > 1 else 0
    pos = np.arange(n)
    shifted = (pos + shift) % n
    # Uniform draw among the N - size positions outside the own group, for the repairs.
    others = n - size
    u = torch.rand(n, dtype=torch.float64, generator=generator).numpy()
    r = np.minimum((u * others).astype(np.int64), np.maximum(others - 1, 0))
    outside = np.where(r < start, r, r + size)
    same = (shifted >= start) & (shifted < start + size)
    partner_pos = np.where(same & (others > 0), outside, shifted)
    return _with_fallback(order, _scatter(order, partner_pos), others == 0, generator)
