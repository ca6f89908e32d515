"""A DataLoader-free batched loader over an in-memory uint8 dataset.

Per epoch, one draw from the loader's ``torch.Generator`` (on the CPU, so the stream is the
same on any device) gives the whole epoch's plan: the order (a permutation, or 0..N-1 without
shuffling) and, for each position in it, a crop offset and a flip bit. A batch is then
``images[order[i:i+B]]`` on the data's device, augmented with one gather (random crop with
zero padding and horizontal flip together), converted to float and normalised per channel.
No Python loop runs over samples.

Resuming: ``state_dict()`` holds the epoch, the position (batches handed out) in it and the
generator state at the start of the epoch; ``load_state_dict`` restores them, the plan is drawn
again from that state, and iteration continues with exactly the batches an uninterrupted run
would have seen.

Sharding (``rank``, ``world_size``): every rank draws the same plan (same seed) and takes the
contiguous slice ``[rank * M, (rank + 1) * M)`` of it with ``M = N // world_size``; the slices
are disjoint and of equal length, and the last ``N % world_size`` positions of each epoch's
order are skipped (a different random subset each epoch when shuffling).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .data import ImageDataset


def augment_batch(images: Tensor, offsets: Tensor | None, flips: Tensor | None, padding: int) -> Tensor:
    """Random crop with zero padding, then horizontal flip, as one gather.

    images (uint8 or any dtype) [B, C, H, W]; offsets int64 [B, 2] = (dy, dx) in [0, 2 * padding]
    (the top-left corner of the crop in the padded image; None = centre, no shift); flips bool
    [B] (None = no flip). Returns a contiguous [B, C, H, W]:
    ``out[b, c, i, j] = padded[b, c, dy_b + i, dx_b + (W - 1 - j if flip_b else j)]``.
    One spatial index [B, H*W] serves every channel (expanded, not copied), so the gather
    reads B*C*H*W elements and the index B*H*W int64s; padding writes B*C*(H+2p)*(W+2p).
    """
    b, c, h, w = images.shape
    dev = images.device
    if offsets is None:
        offsets = torch.full((b, 2), padding, dtype=torch.long, device=dev)
    padded = F.pad(images, (padding,) * 4) if padding > 0 else images.contiguous()
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = offsets[:, :1] + torch.arange(h, device=dev)                 # [B, H]
    cols = torch.arange(w, device=dev).expand(b, w)
    if flips is not None:
        cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    cols = offsets[:, 1:] + cols                                          # [B, W]
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, hp * wp).gather(2, index).view(b, c, h, w)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float], *,
              dtype: torch.dtype = torch.float32, channels_last: bool = False) -> Tensor:
    """uint8 [B, C, H, W] -> dtype, ``(x / 255 - mean[c]) / std[c]``, in the requested memory format."""
    c = images.shape[1]
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std_t)).view(1, c, 1, 1).to(images.device, dtype)
    shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, c, 1, 1).to(images.device, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # Normalise in the input's layout, then change layout: an affine map whose [C] constants
    # broadcast along the innermost dim (C=1 or 3 in NHWC) runs far slower than along W.
    out = images.to(dtype=dtype, copy=True).mul_(scale).add_(shift)  # copy: never aliases the input
    return out.contiguous(memory_format=fmt)


class BatchLoader:
    """Iterate over (images float [B, C, H, W], labels int64 [B]) batches of ``dataset``.

    ``for x, y in loader`` runs the rest of the current epoch, then moves to the next (after a
    ``break`` the next ``for`` goes on where it stopped, unless ``end_epoch()`` is called).
    ``augment`` turns on the dataset's recommended crop padding and flip (override with
    ``crop_padding`` / ``hflip``); ``device`` is where the whole uint8 dataset is kept and the
    batches are made; ``dtype`` and ``channels_last`` set the output's type and memory format.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool = True,
                 augment: bool = True, crop_padding: int | None = None, hflip: bool | None = None,
                 drop_last: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"BatchLoader: 'batch_size' must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"BatchLoader: need 0 <= rank < world_size, "
                             f"got rank={rank}, world_size={world_size}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"BatchLoader: 'dtype' must be a floating torch.dtype (the batches are "
                            f"normalised images), got {dtype!r}")
        pad = dataset.crop_padding if crop_padding is None else crop_padding
        if pad < 0:
            raise ValueError(f"BatchLoader: 'crop_padding' must be >= 0, got {pad}")
        self.dataset, self.batch_size, self.shuffle, self.drop_last = dataset, batch_size, shuffle, drop_last
        self.crop_padding = pad if augment else 0
        self.hflip = (dataset.hflip if hflip is None else hflip) and augment
        self.dtype, self.channels_last, self.seed = dtype, channels_last, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else dataset.images.device
        self._images = dataset.images.to(self.device)
        self._labels = dataset.labels.to(self.device)
        self.shard_size = len(dataset) // world_size
        if len(self) == 0:
            raise ValueError(f"BatchLoader: no batches: {self.shard_size} samples per rank, batch_size "
                             f"{batch_size}, drop_last={drop_last}; use a smaller batch_size")
        self._gen = torch.Generator().manual_seed(seed)
        self._epoch, self._position = 0, 0
        self._plan: tuple[Tensor, Tensor | None, Tensor | None] | None = None
        self._plan_state: Tensor | None = None

    def __len__(self) -> int:
        """Batches per epoch (on this rank)."""
        full, rest = divmod(self.shard_size, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch already handed out."""
        return self._position

    def _draw_plan(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if self._plan is None:
            g, n = self._gen, len(self.dataset)
            self._plan_state = g.get_state()
            order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
            pad = self.crop_padding
            offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g) if pad > 0 else None
            flips = torch.randint(0, 2, (n,), generator=g).bool() if self.hflip else None
            lo, hi = self.rank * self.shard_size, (self.rank + 1) * self.shard_size
            self._plan = tuple(None if t is None else t[lo:hi].to(self.device)  # type: ignore[assignment]
                               for t in (order, offsets, flips))
        return self._plan  # type: ignore[return-value]

    def _next_epoch(self) -> None:
        self._draw_plan()  # advances the generator past this epoch's draws, if not done yet
        self._epoch, self._position, self._plan = self._epoch + 1, 0, None

    def end_epoch(self) -> None:
        """Skip the rest of the current epoch: the next ``for`` starts the next epoch.

        A loop that stops early (``break``) otherwise continues the same epoch where it left off."""
        if self._position > 0:
            self._next_epoch()

    def _batch(self, i: int) -> tuple[Tensor, Tensor]:
        order, offsets, flips = self._draw_plan()
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        idx = order[sl]
        x, y = self._images.index_select(0, idx), self._labels.index_select(0, idx)
        if offsets is not None or flips is not None:
            x = augment_batch(x, None if offsets is None else offsets[sl],
                              None if flips is None else flips[sl], self.crop_padding)
        ds = self.dataset
        return normalize(x, ds.mean, ds.std, dtype=self.dtype, channels_last=self.channels_last), y

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._position >= len(self):
            self._next_epoch()
        while self._position < len(self):
            i = self._position
            self._position += 1
            yield self._batch(i)
        self._next_epoch()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the same batches (and the settings that must match)."""
        # the generator's state before this epoch's draws once they are made (see _draw_plan)
        state = self._plan_state if self._plan is not None else None
        if state is None:
            state = self._gen.get_state()
        return {"epoch": self._epoch, "position": self._position, "generator": state.clone(),
                **self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self._config().items():
            if state.get(key) != value:
                raise ValueError(f"BatchLoader.load_state_dict: '{key}' was {state.get(key)!r} when the "
                                 f"state was saved, but this loader has {value!r}; the batches would differ")
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"BatchLoader.load_state_dict: 'position' {state['position']} is outside "
                             f"[0, {len(self)}]")
        self._gen.set_state(state["generator"])
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._plan, self._plan_state = None, None

    def _config(self) -> dict[str, Any]:
        return {"num_samples": len(self.dataset), "batch_size": self.batch_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "crop_padding": self.crop_padding, "hflip": self.hflip,
                "world_size": self.world_size}
