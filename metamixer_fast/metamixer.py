"""Samplers that turn a batch's labels into a ``MixPlan``: ``MetaMixer`` and the baselines
``CutMix``, ``Mixup`` and ``CutMixOrMixup``.

All randomness is drawn on the CPU from one ``torch.Generator`` (so a run is reproducible and
resumable through ``state_dict``), vectorized over the batch; the plan's tensors are then moved
to the target device once. With CPU labels and ``device="cuda"`` a step makes no host sync.

MetaMixer draws one lam_i and one mu_i per sample (not one per batch): the global blend
h_i <- mu_i h_i + (1 - mu_i) h_pi(i) uses each sample's own mu_i, and sample i's target weights
(mu_i lam_i, mu_i (1 - lam_i), (1 - mu_i) lam_pi(i), (1 - mu_i) (1 - lam_pi(i))) use that same
mu_i. The stage is drawn once per step and shared by all peers.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .pairing import other_class_partners, random_cycle, same_class_partners
from .plan import INPUT_STAGE, MixPlan, image_size

__all__ = ["CutMix", "CutMixOrMixup", "MetaMixer", "Mixup"]

LOCAL_PAIRINGS = ("same_class", "random")
GLOBAL_PAIRINGS = ("other_class", "random")
MODES = ("batch", "elem")

_STAT_KEYS = ("steps", "mixed_steps", "local_samples", "local_fallback", "global_samples",
              "global_fallback")


def _is_real(value: object) -> bool:
    """A real number, as ``MixedKDLoss`` takes them: numpy scalars (np.float32(0.5), read from an
    array or a config) and Fractions too, but not a bool (np.bool_ is no ``numbers.Real``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_alpha(owner: str, name: str, value: float) -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: '{name}' must be a finite number > 0 (the Beta(a, a) "
                         f"concentration), got {value!r}")
    return float(value)


def _check_prob(owner: str, name: str, value: float) -> float:
    if not _is_real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: '{name}' must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: '{name}' must be one of {choices}, got {value!r}")
    return value


def _beta(alpha: float, n: int, generator: torch.Generator) -> Tensor:
    """n draws of Beta(alpha, alpha) in float64 from ``generator`` (via a Dirichlet)."""
    conc = torch.full((n, 2), alpha, dtype=torch.float64)
    return torch._sample_dirichlet(conc, generator=generator)[:, 0].clamp(0.0, 1.0)


class _Sampler(abc.ABC):
    """Shared machinery: the generator, the 'is this step mixed' coin, stats and state."""

    name = "_Sampler"

    def __init__(self, prob: float, generator: torch.Generator | None) -> None:
        self.prob = _check_prob(self.name, "prob", prob)
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)))  # follows torch.manual_seed
            generator = torch.Generator().manual_seed(seed)
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError(f"{self.name}: 'generator' must be a CPU torch.Generator (sampling runs "
                             f"on the CPU; the plan is then moved to the labels' device), got "
                             f"{generator!r}")
        self.generator = generator
        self._stats = dict.fromkeys(_STAT_KEYS, 0)

    def _labels(self, y: Tensor) -> Tensor:
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.dim() != 1 or y.numel() < 1:
            got = f"a {y.dtype} tensor of shape {list(y.shape)}" if isinstance(y, Tensor) \
                else type(y).__name__
            raise ValueError(f"{self.name}.sample: 'y' must be a 1-D int64 tensor [N] of class "
                             f"labels with N >= 1, got {got}")
        return y if y.device.type == "cpu" else y.cpu()

    def sample(self, y: Tensor, device: torch.device | str | None = None,
               size: Sequence[int] | None = None) -> MixPlan:
        """A plan for the batch with labels ``y`` [N] (int64, any device).

        ``device``: where the plan's tensors go (default ``y.device``); ``size``: (H, W) of the
        images, to fix the CutMix boxes (and so ``plan.target``) now rather than at
        ``apply_local``. Sampling runs on the CPU: labels on a GPU cost one device-to-host copy
        (a sync), so pass the loader's CPU labels with ``device=`` where you can.
        """
        y_cpu = self._labels(y)
        size = None if size is None else image_size(f"{self.name}.sample", size)
        dev = y.device if device is None else torch.device(device)
        self._stats["steps"] += 1
        coin = float(torch.rand(1, dtype=torch.float64, generator=self.generator))
        plan = self._draw(y_cpu) if coin < self._step_prob() else None
        if plan is None or not plan.mixed:
            plan = MixPlan.identity(y_cpu, self._stages())
        else:
            self._stats["mixed_steps"] += 1
            if size is not None:
                plan.resolve(size)
        if plan.device == dev:
            return plan
        return plan.to(dev, labels=y if y.device == dev else None)

    def _stages(self) -> tuple[str, ...]:
        return ()

    def _step_prob(self) -> float:
        """The chance that a step draws a plan at all (a sampler that applies ``prob`` per
        sample draws every step)."""
        return self.prob

    @abc.abstractmethod
    def _draw(self, y: Tensor) -> MixPlan:
        """The plan of a mixed step for CPU labels ``y`` (each sampler's own rule); a plan that
        mixes no sample may say so with ``mixed=False``."""

    @property
    def stats(self) -> dict[str, float]:
        """Counts since construction (or the last ``reset_stats``): steps, mixed steps, samples
        paired locally/globally, how many of them fell back to a random partner because the
        batch had none satisfying the rule, and the found rates (1 - fallback / samples)."""
        s: dict[str, float] = dict(self._stats)
        for part in ("local", "global"):
            total = self._stats[f"{part}_samples"]
            s[f"{part}_found_rate"] = 1.0 - self._stats[f"{part}_fallback"] / total if total else 1.0
        return s

    def reset_stats(self) -> None:
        self._stats = dict.fromkeys(_STAT_KEYS, 0)

    def state_dict(self) -> dict[str, Any]:
        """The generator state and the stats: loading them resumes the exact plan sequence."""
        return {"generator": self.generator.get_state(), "stats": dict(self._stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"generator", "stats"} - set(state)
        if missing:
            raise KeyError(f"{self.name}.load_state_dict: missing keys {sorted(missing)}")
        stats = state["stats"]
        if not isinstance(stats, dict) or not all(isinstance(stats.get(k, 0), int) for k in _STAT_KEYS):
            raise ValueError(f"{self.name}.load_state_dict: 'stats' must be a dict of int counts "
                             f"{list(_STAT_KEYS)}, got {stats!r}")
        rng = state["generator"]
        if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.dim() == 1):
            raise ValueError(f"{self.name}.load_state_dict: 'generator' must be a torch.Generator "
                             f"state (a 1-D uint8 tensor from get_state()), got {_describe(rng)}")
        try:
            self.generator.set_state(rng)
        except RuntimeError as exc:  # a uint8 tensor of the wrong length
            raise ValueError(f"{self.name}.load_state_dict: 'generator' is not a state of this "
                             f"generator's kind ({exc})") from None
        self._stats = {k: int(stats.get(k, 0)) for k in _STAT_KEYS}


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


class MetaMixer(_Sampler):
    """MetaMixer's two-stage mixing plan (DESIGN.md section 1).

    Args:
        local_alpha: lam_i ~ Beta(local_alpha, local_alpha); a CutMix box of area 1 - lam_i.
        global_alpha: mu_i ~ Beta(global_alpha, global_alpha), one per sample.
        prob: the chance that a step is mixed at all (else an identity plan).
        stages: where the global blend may happen, one drawn uniformly per step: "input" (the
            peers' input) and/or stage names (submodules, see ``MixPlan.global_mixing``).
        local_pairing: "same_class" (each locally mixed image stays one class) or "random".
        global_pairing: "other_class" (four images from two classes) or "random".
        generator: a CPU ``torch.Generator``; default: a new one seeded from torch's global RNG.

    Where the batch has no partner satisfying a pairing rule for a sample (a class alone in the
    batch, a batch of one class) that sample gets a random partner, counted in ``stats``.

    The pairing defaults are the ones the accuracy study (docs/study.md) supports: same_class /
    other_class beat random / random on every seed. ``stages`` defaults to the input because
    only the input exists in every model; name your model's stages to blend features too.
    """

    name = "MetaMixer"

    def __init__(self, local_alpha: float = 1.0, global_alpha: float = 1.0, prob: float = 1.0,
                 stages: Sequence[str] = (INPUT_STAGE,), local_pairing: str = "same_class",
                 global_pairing: str = "other_class",
                 generator: torch.Generator | None = None) -> None:
        self.local_alpha = _check_alpha(self.name, "local_alpha", local_alpha)
        self.global_alpha = _check_alpha(self.name, "global_alpha", global_alpha)
        given = stages
        stages = (stages,) if isinstance(stages, str) or not isinstance(stages, Sequence) \
            else tuple(stages)
        if not stages or not all(isinstance(s, str) and s for s in stages):
            raise ValueError(f"MetaMixer: 'stages' must be a non-empty sequence of stage names "
                             f"('input' or submodule names), got {given!r}")
        if len(set(stages)) != len(stages):
            raise ValueError(f"MetaMixer: 'stages' has duplicates: {stages!r}")
        self.stages = stages
        self.local_pairing = _check_choice(self.name, "local_pairing", local_pairing, LOCAL_PAIRINGS)
        self.global_pairing = _check_choice(self.name, "global_pairing", global_pairing,
                                            GLOBAL_PAIRINGS)
        super().__init__(prob, generator)

    def _stages(self) -> tuple[str, ...]:
        return self.stages

    def _draw(self, y: Tensor) -> MixPlan:
        g, n = self.generator, y.numel()
        if self.local_pairing == "same_class":
            sigma, local_fb = same_class_partners(y, g)
        else:
            sigma, local_fb = random_cycle(n, g), torch.zeros(n, dtype=torch.bool)
        if self.global_pairing == "other_class":
            pi, global_fb = other_class_partners(y, g)
        else:
            pi, global_fb = random_cycle(n, g), torch.zeros(n, dtype=torch.bool)
        lam = _beta(self.local_alpha, n, g)
        center = torch.rand(n, 2, dtype=torch.float64, generator=g)
        mu = _beta(self.global_alpha, n, g).float()
        stage = self.stages[int(torch.randint(len(self.stages), (1,), generator=g))]
        st = self._stats
        st["local_samples"] += n
        st["local_fallback"] += int(local_fb.sum())
        st["global_samples"] += n
        st["global_fallback"] += int(global_fb.sum())
        return MixPlan(labels=y, mixed=True, local_src=sigma, local_w=torch.zeros(n),
                       lam_draw=lam, cut=torch.ones(n, dtype=torch.bool), center=center,
                       global_src=pi, mu=mu, stage=stage, stages=self.stages)

    def __repr__(self) -> str:
        return (f"MetaMixer(local_alpha={self.local_alpha}, global_alpha={self.global_alpha}, "
                f"prob={self.prob}, stages={self.stages}, local_pairing={self.local_pairing!r}, "
                f"global_pairing={self.global_pairing!r})")


class CutMixOrMixup(_Sampler):
    """CutMix or Mixup with timm's semantics, as a ``MixPlan`` (local mixing only).

    Each mixed sample i takes pixels from its partner sigma(i) (a random cyclic permutation of
    the batch; timm flips it): with probability ``switch_prob`` CutMix (lam ~ Beta(cutmix_alpha),
    a box of area 1 - lam pasted from the partner, lam corrected to the pasted area), else Mixup
    (lam ~ Beta(mixup_alpha), u_i = lam x_i + (1 - lam) x_sigma(i)). Target: labels
    (y_i, y_sigma(i), y_i, y_sigma(i)) with weights (lam, 1 - lam, 0, 0).

    ``mode="batch"`` (timm's default): one coin, one lam and one box for the whole batch, and
    ``prob`` is the chance that the step is mixed at all; ``mode="elem"``: all of them per
    sample, ``prob`` included, as timm's ``mix_prob``: a sample left unmixed keeps its pixels
    exactly (an empty box) and its target is its own label (lam = 1).

    Inputs: a plan with CutMix rows needs [N, C, H, W] images (``CutMix``, and
    ``CutMixOrMixup`` whenever a mixed sample drew CutMix: in "batch" mode a step that drew
    it, in "elem" mode nearly every batch), and its ``target`` needs the image size
    (``apply_local``, ``resolve`` or ``sample(size=...)``). A plan without (``Mixup`` in either
    mode, unmixed samples included) also mixes [N, D] features and has its target at once.
    """

    name = "CutMixOrMixup"

    def __init__(self, cutmix_alpha: float = 1.0, mixup_alpha: float = 0.8, switch_prob: float = 0.5,
                 prob: float = 1.0, mode: str = "batch",
                 generator: torch.Generator | None = None) -> None:
        self.cutmix_alpha = _check_alpha(self.name, "cutmix_alpha", cutmix_alpha)
        self.mixup_alpha = _check_alpha(self.name, "mixup_alpha", mixup_alpha)
        self.switch_prob = _check_prob(self.name, "switch_prob", switch_prob)
        self.mode = _check_choice(self.name, "mode", mode, MODES)
        super().__init__(prob, generator)

    def _step_prob(self) -> float:
        return self.prob if self.mode == "batch" else 1.0

    def _draw(self, y: Tensor) -> MixPlan:
        g, n = self.generator, y.numel()
        m = 1 if self.mode == "batch" else n
        cut = torch.rand(m, dtype=torch.float64, generator=g) < self.switch_prob
        # Mixup rows blend with a float32 weight: round lam to it so the target is exact.
        mixup_lam = _beta(self.mixup_alpha, m, g).float().double()
        lam = torch.where(cut, _beta(self.cutmix_alpha, m, g), mixup_lam)
        center = torch.rand(m, 2, dtype=torch.float64, generator=g)
        cut, lam, center = cut.expand(n), lam.expand(n), center.expand(n, 2)
        mixed, keep = n, None
        if self.mode == "elem" and self.prob < 1.0:  # (prob = 1 draws nothing: the same plans)
            unmixed = torch.rand(n, dtype=torch.float64, generator=g) >= self.prob
            mixed -= int(unmixed.sum())
            if mixed == 0:
                return MixPlan.identity(y)
            # A kept row (lam = w = 1, an empty box) is copied exactly, whatever its partner
            # holds, as timm skips it. It is no CutMix row even where a CutMix lam was drawn:
            # so a plan whose mixed rows are all Mixup stays Mixup-only (a target before the
            # image size is known; [N, D] features). The draws are the same as before.
            cut, lam, keep = cut & ~unmixed, torch.where(unmixed, 1.0, lam), unmixed
        sigma = random_cycle(n, g)
        self._stats["local_samples"] += mixed
        has_cut = bool(cut.any())
        return MixPlan(labels=y, mixed=True, local_src=sigma,
                       local_w=torch.where(cut, 0.0, lam).float(), lam_draw=lam.contiguous(),
                       cut=cut.contiguous() if has_cut else None,
                       center=center.contiguous() if has_cut else None, keep=keep)

    def __repr__(self) -> str:
        return (f"{self.name}(cutmix_alpha={self.cutmix_alpha}, mixup_alpha={self.mixup_alpha}, "
                f"switch_prob={self.switch_prob}, prob={self.prob}, mode={self.mode!r})")


class CutMix(CutMixOrMixup):
    """CutMix (timm semantics): see ``CutMixOrMixup`` with ``switch_prob=1``."""

    name = "CutMix"

    def __init__(self, alpha: float = 1.0, prob: float = 1.0, mode: str = "batch",
                 generator: torch.Generator | None = None) -> None:
        alpha = _check_alpha(self.name, "alpha", alpha)
        super().__init__(cutmix_alpha=alpha, mixup_alpha=1.0, switch_prob=1.0, prob=prob,
                         mode=mode, generator=generator)

    def __repr__(self) -> str:
        return f"CutMix(alpha={self.cutmix_alpha}, prob={self.prob}, mode={self.mode!r})"


class Mixup(CutMixOrMixup):
    """Mixup (timm semantics): see ``CutMixOrMixup`` with ``switch_prob=0``."""

    name = "Mixup"

    def __init__(self, alpha: float = 0.8, prob: float = 1.0, mode: str = "batch",
                 generator: torch.Generator | None = None) -> None:
        alpha = _check_alpha(self.name, "alpha", alpha)
        super().__init__(cutmix_alpha=1.0, mixup_alpha=alpha, switch_prob=0.0, prob=prob,
                         mode=mode, generator=generator)

    def __repr__(self) -> str:
        return f"Mixup(alpha={self.mixup_alpha}, prob={self.prob}, mode={self.mode!r})"
