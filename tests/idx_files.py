"""Small IDX (MNIST-format) files for the loader, training and study tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """The IDX format: magic 0x0000 08 ndim, big-endian uint32 dims, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def fake_fashion_mnist(directory: Path, rng: torch.Generator, n_train: int = 30, n_test: int = 12,
                       shuffle_train_labels: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random Fashion-MNIST files in ``directory``; returns {prefix: (images, labels)} as written.
    ``shuffle_train_labels`` rolls the training labels by one: the same images, other data."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=rng, dtype=torch.uint8).numpy()
        labels = torch.randint(0, 10, (n,), generator=rng).numpy().astype(np.uint8)
        if shuffle_train_labels and prefix == "train":
            labels = np.roll(labels, 1)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[prefix] = (images, labels)
    return arrays
