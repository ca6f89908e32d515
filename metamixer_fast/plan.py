"""``MixPlan``: one step's mixing decisions; ``global_mixing`` carries them out inside the peers
through the hooks of ``stage_hooks.py``.

A plan holds, for a batch of N samples (DESIGN.md section 1, "Our formulation"):

- local mixing: partner sigma[N], and per sample either a CutMix box (pasted region of the
  partner; the box is fixed once the image size is known, and lam is the exact fraction of the
  image left to the sample), a Mixup blend (w = lam over the whole image), or (the baselines'
  "elem" mode with prob < 1) nothing: the sample is copied as it is (an empty box, lam = 1);
- global mixing (MetaMixer only): partner pi[N], mu[N] and a stage, where every peer replaces
  its activation h by h_i <- mu_i h_i + (1 - mu_i) h_pi(i);
- the target: labels[N, 4] of the images (i, sigma(i), pi(i), sigma(pi(i))) with weights
  (mu lam_i, mu (1 - lam_i), (1 - mu) lam_pi(i), (1 - mu) (1 - lam_pi(i))).

Plans are made by the samplers in ``metamixer_fast.metamixer``; every mixing is one call of
``metamixer_fast.mix``, except that ``apply`` does local mixing and a global blend at the input
in one ``metamixer_fast.mix2`` pass.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from .loss import MixedTarget
from .mix2 import mix2
from .ops import mix
from .stage_hooks import INPUT_STAGE, blend_hooks, peer_list, stage_targets

__all__ = ["INPUT_STAGE", "MixPlan", "cutmix_boxes", "image_size"]

def image_size(owner: str, size: Sequence[int]) -> tuple[int, int]:
    """``size`` as (H, W), checked: two positive integers."""
    if isinstance(size, (Tensor, str)) or not isinstance(size, Sequence) or len(size) != 2 \
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                       for s in size):
        raise ValueError(f"{owner}: 'size' must be the images' (H, W): two positive ints, e.g. "
                         f"x.shape[-2:], got {size!r}")
    return int(size[0]), int(size[1])


def cutmix_boxes(lam: Tensor, center: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """CutMix box rule: (box[N, 4] int64 (y0, y1, x0, x1) half-open, lam[N] corrected).

    The cut is floor(H sqrt(1 - lam)) x floor(W sqrt(1 - lam)), centred on a uniform random
    pixel (``center`` holds its position as fractions in [0, 1)), and clipped to the image; lam is
    then corrected to 1 - (pasted area) / (H W). Unlike timm (which spans cy +- cut // 2, one
    pixel short for odd cuts) the unclipped box is exactly the cut size.

    Computed in numpy on the host (a few hundred numbers: torch would spend ~2 us an operation,
    and on a GPU a kernel launch each); the results go to ``lam``'s device.
    """
    box, lam_cut = _cutmix_boxes(lam.detach().cpu().double().numpy(),
                                 center.detach().cpu().double().numpy(), height, width)
    return (torch.from_numpy(box).to(lam.device, non_blocking=True),
            torch.from_numpy(lam_cut).to(lam.device, non_blocking=True))


def _cutmix_boxes(lam: np.ndarray, center: np.ndarray, height: int,
                  width: int) -> tuple[np.ndarray, np.ndarray]:
    """``cutmix_boxes`` on host arrays: lam[N] and center[N, 2] float64."""
    size = np.array([height, width], dtype=np.float64)
    ratio = np.sqrt(1.0 - np.clip(lam, 0.0, 1.0))
    cut = np.floor(size * ratio[:, None]).astype(np.int64)  # [N, 2] (cut_h, cut_w)
    limit = size.astype(np.int64)
    lo = np.minimum(np.floor(center * size).astype(np.int64), limit - 1) - cut // 2
    box = np.empty((lam.size, 4), dtype=np.int64)  # (y0, y1, x0, x1)
    box[:, 0::2], box[:, 1::2] = np.maximum(lo, 0), np.minimum(lo + cut, limit)
    extent = np.maximum(box[:, 1::2] - box[:, 0::2], 0)
    return box, 1.0 - (extent[:, 0] * extent[:, 1]).astype(np.float64) / (height * width)


@dataclass(eq=False)
class MixPlan:
    """One step's mixing plan; see the module docstring. Tensors live on one device.

    Attributes:
        labels: [N] int64 class labels of the batch.
        mixed: False for an identity plan (the step is not mixed).
        local_src: [N] int64 local partner sigma.
        local_w: [N] float32 weight of the sample itself inside its region (0 for CutMix rows,
            lam for Mixup rows, 1 for kept rows).
        lam_draw: [N] float64 lam as drawn (CutMix rows are corrected once the box is fixed;
            Mixup rows hold float32-representable values, so local_w and the target agree;
            kept rows hold 1).
        cut: [N] bool, True for CutMix rows (a box of a drawn size), or None when there are
            none (the plan is then Mixup-only: its lam and target need no image size, and it
            mixes [N, D] features too).
        center: [N, 2] float64 box centres as fractions of (H, W), or None.
        global_src: [N] int64 global partner pi, or None (no global mixing).
        mu: [N] float32 global blend weight of the sample itself, or None.
        stage: where the global blend happens ("input" or a stage name), or None.
        stages: every stage this plan's sampler may pick (checked against the peers).
        keep: [N] bool, True for kept rows (left unmixed: copied bit for bit through an empty
            box, whatever the partner holds, with lam = 1), or None when every row is mixed.
            A kept row is no CutMix row.
    """

    labels: Tensor
    mixed: bool
    local_src: Tensor
    local_w: Tensor
    lam_draw: Tensor
    cut: Tensor | None = None
    center: Tensor | None = None
    global_src: Tensor | None = None
    mu: Tensor | None = None
    stage: str | None = None
    stages: tuple[str, ...] = ()
    keep: Tensor | None = None
    _size: tuple[int, int] | None = field(default=None, repr=False)
    _box: Tensor | None = field(default=None, repr=False)
    _lam: Tensor | None = field(default=None, repr=False)
    # The input-stage blend shared by the peers of a ``global_mixing`` block: (x, x._version,
    # blend(x), its _version); see ``_blend_input`` for when it may be reused.
    _input_cache: tuple[Tensor, int, Tensor, int] | None = field(default=None, repr=False)
    # Set by ``apply`` once it has done the input-stage blend: the input hook then leaves the
    # peers' inputs alone, whatever was done to the batch in between (a cast, a normalisation).
    _input_blended: bool = field(default=False, repr=False)
    # The plan on the host, kept by ``to`` (and never changed through this plan): ``resolve`` and
    # ``target`` do their arithmetic on a few hundred numbers there in numpy and move only the
    # results, so a plan on a GPU needs no device-to-host copy (a sync) and no kernel launches.
    _host: MixPlan | None = field(default=None, repr=False)
    _host_lam: Tensor | None = field(default=None, repr=False)  # resolved lam, on the host

    # ------------------------------------------------------------------ construction and moves
    @classmethod
    def identity(cls, labels: Tensor, stages: tuple[str, ...] = ()) -> MixPlan:
        """The plan of an unmixed step: u = x, no global blend, target weights (1, 0, 0, 0)."""
        n, dev = labels.numel(), labels.device
        return cls(labels=labels, mixed=False, local_src=torch.arange(n, device=dev),
                   local_w=torch.ones(n, device=dev), lam_draw=torch.ones(n, dtype=torch.float64,
                                                                           device=dev),
                   stages=stages)

    @property
    def num_samples(self) -> int:
        return self.labels.numel()

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def to(self, device: torch.device | str, labels: Tensor | None = None) -> MixPlan:
        """The plan with every tensor on ``device`` (``labels``: an already-moved copy to reuse)."""
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=True)

        def move_opt(t: Tensor | None) -> Tensor | None:
            return None if t is None else move(t)

        return replace(self, labels=labels if labels is not None else move(self.labels),
                       local_src=move(self.local_src), local_w=move(self.local_w),
                       lam_draw=move(self.lam_draw), cut=move_opt(self.cut), center=move_opt(self.center),
                       global_src=move_opt(self.global_src), mu=move_opt(self.mu), keep=move_opt(self.keep),
                       _box=move_opt(self._box),
                       _lam=move_opt(self._lam), _input_cache=None,
                       _host=self._on_host(),
                       _host_lam=self._lam if self.device.type == "cpu" else self._host_lam)

    def _on_host(self) -> MixPlan | None:
        """This plan's host twin: itself on the CPU, else the one ``to`` kept (or None)."""
        return self if self.device.type == "cpu" else self._host

    # --------------------------------------------------------------------------- local mixing
    def resolve(self, size: Sequence[int]) -> MixPlan:
        """Fix the boxes for images of ``size`` = (H, W) and correct the CutMix rows' lam;
        returns self. (A kept row's box is empty and its lam 1 at every size.)

        Called by ``apply_local``; call it yourself to read ``target`` before mixing."""
        h, w = image_size("MixPlan.resolve", size)
        if self._size is not None:
            if self._size != (h, w):
                raise ValueError(f"MixPlan: this plan's boxes were fixed for images of size "
                                 f"{self._size}, got images of size {(h, w)}; sample a new plan")
            return self
        if self.cut is None:
            self._lam = self.lam_draw  # Mixup and kept rows: lam as drawn, whatever the size
        if self.cut is not None or self.keep is not None:
            host = self._on_host() or self.to("cpu")  # a plan made on a device: copy it back
            if host.cut is not None:
                assert host.center is not None  # drawn with the CutMix rows
                lam_draw, cut = host.lam_draw.double().numpy(), host.cut.numpy()
                box, lam_cut = _cutmix_boxes(lam_draw, host.center.double().numpy(), h, w)
                box[~cut] = (0, h, 0, w)  # Mixup rows: the whole image
                self._host_lam = torch.from_numpy(np.where(cut, lam_cut, lam_draw))
                self._lam = self._host_lam.to(self.device, non_blocking=True)
            else:
                box = np.empty((self.num_samples, 4), dtype=np.int64)
                box[:] = (0, h, 0, w)
            if host.keep is not None:
                box[host.keep.numpy()] = 0  # kept rows: an empty box, so copied exactly
            self._box = torch.from_numpy(box).to(self.device, non_blocking=True)
        self._size = (h, w)
        return self

    @property
    def box(self) -> Tensor | None:
        """[N, 4] int64 (y0, y1, x0, x1) regions (whole image for Mixup rows, empty for kept
        rows), or None when the plan has neither CutMix nor kept rows."""
        if self._box is None:
            if self.cut is not None:
                raise _unresolved("the CutMix boxes are fixed by the image size")
            if self.keep is not None:
                raise _unresolved("the boxes (the whole image for a Mixup row, empty for a kept "
                                  "row) are fixed by the image size")
        return self._box

    @property
    def lam(self) -> Tensor:
        """[N] float64 share of each locally mixed sample u_i that comes from x_i (exact: a
        pixel count for CutMix rows, the float32 blend weight itself for Mixup rows)."""
        if self._lam is None:
            if self.cut is not None:
                raise _unresolved("lam is corrected to the pasted area, which depends on the image size")
            self._lam = self.lam_draw
        return self._lam

    def _check_batch(self, t: Tensor, what: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"MixPlan: {what} must be a tensor, got {type(t).__name__}")
        if t.dim() < 1 or t.shape[0] != self.num_samples:
            raise ValueError(f"MixPlan: {what} has shape {list(t.shape)} but the plan was sampled "
                             f"for a batch of N={self.num_samples}")
        if t.device != self.device:
            raise ValueError(f"MixPlan: {what} is on {t.device} but the plan is on {self.device}; "
                             f"sample with device={str(t.device)!r} or use plan.to(device)")

    def _prepare_images(self, x: Tensor, caller: str) -> None:
        """Check the images against the plan and fix the CutMix boxes for their size."""
        self._check_batch(x, "the images 'x'")
        if self.cut is not None and x.dim() != 4:
            raise ValueError(f"MixPlan.{caller}: CutMix boxes need [N, C, H, W] images, got "
                             f"shape {list(x.shape)} (only a plan without CutMix rows mixes "
                             f"[N, D] features)")
        if self.cut is not None or (self.keep is not None and x.dim() == 4):
            self.resolve(x.shape[-2:])

    def _mu_for(self, t: Tensor) -> Tensor:
        """mu as the blend weight for ``t``: float32, or float64 for float64 tensors."""
        assert self.mu is not None, "called for plans with a global blend only"
        return self.mu.double() if t.dtype == torch.float64 else self.mu

    def apply_local(self, x: Tensor) -> Tensor:
        """u = the locally mixed batch (one ``mix`` call). Returns ``x`` itself, uncopied, for an
        identity plan. ``x``: [N, C, H, W] images ([N, D] features also work for a plan without
        CutMix rows, ``cut is None``: Mixup, kept rows included)."""
        if not self.mixed:
            return x
        self._prepare_images(x, "apply_local")
        self._input_blended = False  # this batch still needs the global blend (see ``apply``)
        if self.keep is not None and x.dim() == 2:
            return self._mix_features_keeping(x)
        return mix(x, self.local_src, self.local_w, self.box)

    def _mix_features_keeping(self, x: Tensor) -> Tensor:
        """``apply_local`` of [N, D] features for a Mixup plan with kept rows.

        ``mix`` takes no box for features, and a kept row's w = 1 alone would give
        1 x_i + 0 x_sigma(i): NaN where the partner holds inf, not the copy timm makes (it skips
        the row). So the features go through as [N, 1, 1, D] images (a view, no copy), each
        Mixup row with the whole row as its box and each kept row with an empty one: one
        ``mix`` call, every kept row copied bit for bit on every backend, as for images. The
        boxes depend on D, so they are made here and not kept (``resolve`` fixes an image's).
        """
        n, d = x.shape
        host = self._on_host() or self.to("cpu")  # a plan made on a device: copy it back
        assert host.keep is not None, "called for plans with kept rows only"
        rows = np.where(host.keep.numpy()[:, None], 0, np.array([0, 1, 0, d], dtype=np.int64))
        box = torch.from_numpy(rows).to(self.device, non_blocking=True)
        return mix(x.view(n, 1, 1, d), self.local_src, self.local_w, box).view(n, d)

    def apply(self, x: Tensor) -> Tensor:
        """The batch as every peer sees it at its input: ``apply_local(x)``, and when the plan's
        stage is "input" also the global blend, done in one fused ``mix2`` pass (bit for bit the
        two ``mix`` calls, with one read and one write of the batch instead of two of each).

        Once ``apply`` has blended at the input, ``global_mixing`` passes the peers' inputs
        through unblended (also after a cast, a normalisation or a move of the returned batch,
        and on a copy made by ``to``), so ``apply`` and ``global_mixing`` combine like
        ``apply_local`` and ``global_mixing``; at an inner stage ``apply`` is ``apply_local``.
        The later of ``apply`` and ``apply_local`` decides: after ``apply_local`` the peers'
        inputs are blended again.
        """
        if not self.mixed or self.stage != INPUT_STAGE or self.global_src is None:
            return self.apply_local(x)
        self._prepare_images(x, "apply")
        out = mix2(x, self.local_src, self.local_w, self.box, self.global_src, self._mu_for(x))
        self._input_blended = True
        return out

    # -------------------------------------------------------------------------- global mixing
    def blend(self, h: Tensor) -> Tensor:
        """The global blend h_i <- mu_i h_i + (1 - mu_i) h_pi(i) of any [N, ...] activation
        (one ``mix`` call; shapes other than [N, D] and [N, C, H, W] are blended as [N, D])."""
        if not self.mixed or self.global_src is None:
            return h
        self._check_batch(h, "the activation")
        mu = self._mu_for(h)
        if h.dim() in (2, 4):
            return mix(h, self.global_src, mu, None)
        return mix(h.reshape(h.shape[0], -1), self.global_src, mu, None).view(h.shape)

    def _blend_input(self, x: Tensor) -> Tensor:
        """``blend`` for the peers' shared input: blended once, reused while that blend is still
        the one this call would make (same values, and a graph where this call needs one)."""
        if self._input_blended:
            return x  # ``apply`` has blended the batch already
        if torch.compiler.is_compiling():
            # A compiled forward that traces the hook: the cache's identity and ``_version``
            # tests are data-dependent to dynamo (a graph break, and with fullgraph=True an
            # error) and its contents would be guarded on, recompiling every step; each peer
            # blends its own input instead (the same values).
            return self.blend(x)
        if torch.jit.is_tracing():
            # torch.jit.trace records the ops it sees: a cached blend would enter the graph as
            # a constant (this batch's mixture, replayed for every later input).
            return self.blend(x)
        if x.is_inference():
            # An inference tensor has no version counter (``_version`` raises), so a change in
            # place could not be seen: each peer blends its own input (the same values).
            return self.blend(x)
        # Would this call record a graph back to x? Then only a blend that recorded one may
        # serve it: a blend made under no_grad (a teacher peer run first) would silently cut
        # x out of the later peers' gradients. The other way round is sound: under no_grad or
        # inference_mode a peer reads a blend with a graph like any tensor, records nothing,
        # and gets the same values, so the blend is shared.
        needs_graph = torch.is_grad_enabled() and x.requires_grad
        cache = self._input_cache
        if cache is not None:
            src, version, out, out_version = cache
            # The blend's own version too: a peer may change its input in place (an inplace
            # ReLU first), which must not reach the peers after it.
            if src is x and version == x._version and out._version == out_version \
                    and (out.requires_grad or not needs_graph):
                return out
        out = self.blend(x)
        # A blend made under inference_mode is an inference tensor: autograd refuses it, and it
        # has no version counter to check; it serves this call only.
        if not out.is_inference():
            self._input_cache = (x, x._version, out, out._version)
        return out

    @contextmanager
    def global_mixing(self, peers: nn.Module | Sequence[nn.Module],
                      stage_modules: Sequence[Mapping[str, str]] | None = None) -> Iterator[MixPlan]:
        """Apply the global blend at the plan's stage inside every peer while the block runs.

        ``peers``: one module, or a sequence (or ``nn.ModuleList``) of K modules. Stage
        "input" blends each peer's first positional input (forward pre-hook); any other stage
        is a submodule whose OUTPUT is blended (forward hook). ``stage_modules``: None (the
        stage name is the submodule name in every peer) or one dict per peer mapping stage
        name -> that peer's submodule name. Every stage the sampler may pick is checked
        against every peer on entry. The hooks are removed on exit, also when the block
        raises. An identity plan installs nothing. At "input" the peers share one blend of
        their input while it is unchanged; a peer may run under ``torch.no_grad()`` or
        ``torch.inference_mode()`` (a teacher) before or after the others without costing them
        their gradient back to the input.

        A stage module must run exactly once per forward of its peer; otherwise the forward
        raises (the target would not describe the mixture). A stage module shared by several
        peers is blended once per peer forward; blocks may not nest over the same module. With
        ``torch.compile``d peers only the "input" stage is reliable: a graph compiled before the
        hooks existed does not see hooks added later on inner modules (the check above then
        raises). Call ``backward`` after the block as usual, but keep stage modules out of
        reentrant activation checkpointing (``checkpoint(..., use_reentrant=True)``): its
        backward recomputes the forward after the hooks are gone, so the gradients would be
        those of the unblended activation (non-reentrant checkpointing detects this and raises).
        """
        modules = peer_list(peers)
        targets = stage_targets(modules, self.stages, stage_modules)
        if not self.mixed or self.stage is None:
            yield self
            return
        self._input_cache = None
        try:
            with blend_hooks(modules, self.stage, targets, self._input_hook, self.blend):
                yield self
        finally:
            self._input_cache = None

    def _input_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not args:
            raise RuntimeError(f"MixPlan: the global blend at 'input' mixes the first positional "
                               f"argument of {type(module).__name__}.forward, but it was called "
                               f"with keyword arguments only ({sorted(kwargs)})")
        return (self._blend_input(args[0]), *args[1:]), kwargs

    # --------------------------------------------------------------------------------- target
    @property
    def target(self) -> MixedTarget:
        """labels[N, 4] of the images (i, sigma(i), pi(i), sigma(pi(i))) and their weights[N, 4]
        (float32, rows sum to 1); zero-weight columns where a plan has no global mixing."""
        if self.cut is not None and self._host_lam is None:
            raise _unresolved("the target's weights hold lam, which depends on the image size")
        host = self._on_host() or self.to("cpu")  # a plan made on a device: copy it back
        lam = host.lam_draw if self.cut is None else self._host_lam
        assert lam is not None  # (checked above)
        p = host.global_src if self.mixed else None
        mu = None if p is None or host.mu is None else host.mu.double().numpy()
        labels, weights = _target(host.labels.numpy(), host.local_src.numpy(),
                                  None if p is None else p.numpy(), mu, lam.double().numpy())
        return MixedTarget(torch.from_numpy(labels).to(self.device, non_blocking=True),
                           torch.from_numpy(weights).to(self.device, non_blocking=True))


def _unresolved(why: str) -> RuntimeError:
    return RuntimeError(f"MixPlan: {why}; call plan.apply_local(x) or plan.resolve((H, W)) first")


def _target(y: np.ndarray, s: np.ndarray, p: np.ndarray | None, mu: np.ndarray | None,
            lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``MixPlan.target`` on host arrays: labels[N, 4] int64 and weights[N, 4] float32 (the
    products in float64, rounded once). No global mixing (p is None): pi = identity, mu = 1."""
    if p is None:
        p, mu = np.arange(y.size), np.ones_like(lam)
    assert mu is not None, "a plan with global partners has their mu"
    ys = y[s]
    labels = np.stack([y, ys, y[p], ys[p]], axis=1)
    lp = lam[p]
    weights = np.stack([mu * lam, mu * (1 - lam), (1 - mu) * lp, (1 - mu) * (1 - lp)], axis=1)
    return labels, weights.astype(np.float32)
