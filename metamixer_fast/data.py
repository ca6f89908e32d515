"""Datasets read from local files only, held in memory as uint8 tensors.

``load_dataset(name, data_dir=None) -> (train, test)`` gives two ``ImageDataset`` (images uint8
[N, C, H, W], labels int64 [N], num_classes, per-channel mean/std in [0, 1] units, name, and the
recommended augmentation for the loader). Names:

* ``fashion-mnist``: the four IDX ``.gz`` files (``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``;
  uncompressed copies without ``.gz`` are accepted too) in ``data_dir``, by default
  ``/usr/share/datasets/fashion-mnist`` where Debian's ``dataset-fashion-mnist`` installs them.
* ``cifar10`` / ``cifar100``: the standard python pickle batches (``data_batch_1..5`` and
  ``test_batch``; ``train``/``test``/``meta``) in ``data_dir`` or its ``cifar-10-batches-py`` /
  ``cifar-100-python`` subdirectory. The pickles are read with an unpickler that only
  reconstructs numpy arrays and plain containers: a file that asks for anything else is refused.
* ``synthetic``: seeded images with class-dependent patterns plus noise (``synthetic_dataset``).

Missing or malformed files raise ``DatasetError`` naming the path and how to get the data.
The batched loader (augmentation as batched tensor ops, resumable, shardable) is
``metamixer_fast.loader.BatchLoader``, re-exported here.
"""

from __future__ import annotations

import gzip
import math
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = ("install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files "
                      f"go to {FASHION_MNIST_DIR}), or download the four *-ubyte.gz files from "
                      "https://github.com/zalandoresearch/fashion-mnist (data/fashion) and pass "
                      "--data-dir DIR")
CIFAR_URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}
CIFAR_SUBDIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "synthetic")

# Per-channel statistics of the training images, in [0, 1] units.
MEAN_STD = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# Recommended augmentation (crop padding in pixels, horizontal flip). Flip is on for
# Fashion-MNIST too: every class (shirt, sneaker, bag, ...) is still itself in a mirror.
AUGMENT = {"fashion-mnist": (2, True), "cifar10": (4, True), "cifar100": (4, True)}


class DatasetError(RuntimeError):
    """A dataset file is missing or malformed; the message names the path and the remedy."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset directory or file does not exist."""


@dataclass
class ImageDataset:
    """Images uint8 [N, C, H, W], labels int64 [N] in [0, num_classes), per-channel mean/std
    (of image / 255), and the augmentation the loader applies by default for training."""

    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        im, lb = self.images, self.labels
        if im.dtype != torch.uint8 or im.dim() != 4:
            raise ValueError(f"{self.name}: 'images' must be uint8 [N, C, H, W], "
                             f"got {im.dtype} {list(im.shape)}")
        if lb.dtype != torch.int64 or lb.shape != (im.shape[0],):
            raise ValueError(f"{self.name}: 'labels' must be int64 [{im.shape[0]}], "
                             f"got {lb.dtype} {list(lb.shape)}")
        if len(self.mean) != im.shape[1] or len(self.std) != im.shape[1]:
            raise ValueError(f"{self.name}: 'mean'/'std' need one value per channel ({im.shape[1]})")
        if lb.numel() and (int(lb.min()) < 0 or int(lb.max()) >= self.num_classes):
            raise ValueError(f"{self.name}: labels must lie in [0, {self.num_classes}), "
                             f"got [{int(lb.min())}, {int(lb.max())}]")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return c, h, w


# ----------------------------------------------------------------------------- IDX (Fashion-MNIST)

IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte images [N, H, W] and labels [N]


def read_idx(path: str | Path, ndim: int) -> Tensor:
    """Parse an IDX file of unsigned bytes (gzip-compressed if it ends in .gz) with ``ndim``
    dimensions; checks the magic number, the dimensions and that the size matches the header."""
    if ndim not in IDX_MAGIC:
        raise ValueError(f"read_idx: 'ndim' must be one of {sorted(IDX_MAGIC)} (labels, images), "
                         f"got {ndim!r}")
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"IDX file {path} is not a valid gzip file ({e}); it is truncated or "
                           f"corrupt: fetch it again") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"IDX file {path} is truncated: {len(raw)} bytes, the header alone is {header}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != IDX_MAGIC[ndim]:
        raise DatasetError(f"IDX file {path} has magic number 0x{magic:08x}, expected "
                           f"0x{IDX_MAGIC[ndim]:08x} (unsigned bytes, {ndim} dimension(s)); wrong file?")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if 0 in dims[1:]:  # a count of 0 items is a (useless) file; an item of size 0 is damage
        raise DatasetError(f"IDX file {path} has an item of size 0 (header {dims}); the file is "
                           f"corrupt: fetch it again")
    expected = header + math.prod(dims)  # Python ints: a corrupt header's product must not wrap
    if len(raw) != expected:
        raise DatasetError(f"IDX file {path} holds {len(raw)} bytes but its header {dims} implies "
                           f"{expected}; the file is truncated or corrupt: fetch it again")
    data = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(data.copy())


def _idx_path(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(f"fashion-mnist: {directory / (stem + '.gz')} does not exist; "
                               f"{FASHION_MNIST_HINT}")


def _fashion_split(directory: Path, prefix: str) -> ImageDataset:
    img_path, lbl_path = _idx_path(directory, f"{prefix}-images-idx3-ubyte"), \
        _idx_path(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"fashion-mnist: {img_path} holds {images.shape[0]} images but "
                           f"{lbl_path} holds {labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) >= 10:
        raise DatasetError(f"fashion-mnist: {lbl_path} has label {int(labels.max())}, expected 0..9")
    mean, std = MEAN_STD["fashion-mnist"]
    pad, flip = AUGMENT["fashion-mnist"]
    return ImageDataset(images.unsqueeze(1), labels.long(), 10, mean, std, "fashion-mnist", pad, flip)


def _not_a_directory(path: Path) -> str:
    if path.exists():
        return f"{path} is a file, not a directory (--data-dir names the folder of the files)"
    return f"directory {path} does not exist"


def load_fashion_mnist(data_dir: str | Path | None = None) -> tuple[ImageDataset, ImageDataset]:
    directory = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    if not directory.is_dir():
        raise DatasetNotFoundError(f"fashion-mnist: {_not_a_directory(directory)}; {FASHION_MNIST_HINT}")
    if (directory / "fashion-mnist").is_dir() and not list(directory.glob("*-ubyte*")):
        directory = directory / "fashion-mnist"
    train, test = _fashion_split(directory, "train"), _fashion_split(directory, "t10k")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DatasetError(f"fashion-mnist: the training images in {directory} are "
                           f"{list(train.images.shape[2:])} pixels but the test images "
                           f"{list(test.images.shape[2:])}; the files come from different data sets")
    return train, test


# ----------------------------------------------------------------------------- CIFAR pickles

# The only globals a CIFAR batch may reference: numpy's array/dtype reconstruction (under
# both the numpy 1 and numpy 2 module paths). Everything else in the files is plain data.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
    ("numpy._core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
}


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global outside the numpy allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that reconstructs numpy arrays and builtin containers only; any other global
    (the way a malicious pickle runs code) raises ``pickle.UnpicklingError``."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _NUMPY_GLOBALS.get((module, name))
        if obj is None:
            raise ForbiddenGlobalError(f"refusing to load global {module}.{name}: only numpy arrays "
                                         "are allowed in a dataset pickle")
        return obj


def load_pickle(path: Path) -> Any:
    """Read a (python 2 or 3) pickle with ``RestrictedUnpickler``; errors name the path."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path} does not exist") from None
    except ForbiddenGlobalError as e:
        raise DatasetError(f"{path}: {e}") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OSError) as e:
        raise DatasetError(f"{path} is not a valid CIFAR pickle ({type(e).__name__}: {e}); it is "
                           f"truncated or corrupt: fetch it again") from e


def _field(batch: dict, key: str, path: Path) -> Any:
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    raise DatasetError(f"{path}: no '{key}' entry (has {sorted(map(str, batch))}); not a CIFAR batch")


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    batch = load_pickle(path)
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(batch).__name__}; not a CIFAR batch")
    data, labels = _field(batch, "data", path), _field(batch, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"{path}: 'data' must be a uint8 array [N, 3072], got "
                           f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as exc:  # e.g. a ragged list
        raise DatasetError(f"{path}: '{label_key}' must hold {data.shape[0]} integers ({exc})") from None
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: '{label_key}' must hold {data.shape[0]} integers, got "
                           f"{labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: '{label_key}' out of range [0, {num_classes}): "
                           f"[{labels.min()}, {labels.max()}]")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def load_cifar(name: str, data_dir: str | Path | None) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``, fine labels)."""
    url, sub = CIFAR_URLS[name], CIFAR_SUBDIRS[name]
    hint = f"download {url}, extract it (tar xzf) and pass --data-dir DIR (the folder holding {sub}/)"
    if data_dir is None:
        raise DatasetNotFoundError(f"{name}: no data directory given; {hint}")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DatasetNotFoundError(f"{name}: {_not_a_directory(directory)}; {hint}")
    if (directory / sub).is_dir():
        directory = directory / sub
    if name == "cifar10":
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        key, classes = "labels", 10
    else:
        train_files, test_files, key, classes = ["train"], ["test"], "fine_labels", 100
    for f in train_files + test_files:
        if not (directory / f).is_file():
            archive = directory / Path(url).name
            extra = f" ({archive} is there: extract it with tar xzf)" if archive.is_file() else ""
            raise DatasetNotFoundError(f"{name}: {directory / f} does not exist{extra}; {hint}")

    def split(files: list[str]) -> ImageDataset:
        parts = [_cifar_batch(directory / f, key, classes) for f in files]
        mean, std = MEAN_STD[name]
        pad, flip = AUGMENT[name]
        return ImageDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                            classes, mean, std, name, pad, flip)

    return split(train_files), split(test_files)


# ----------------------------------------------------------------------------- synthetic

def synthetic_dataset(num_train: int = 2048, num_test: int = 512, num_classes: int = 10,
                      channels: int = 3, size: int = 32, noise: float = 0.2, seed: int = 0,
                      ) -> tuple[ImageDataset, ImageDataset]:
    """Seeded images with learnable structure: each class has a smooth random template (a 4x4
    random grid upsampled to size x size); a sample is its class template at a random
    contrast plus Gaussian pixel noise of std ``noise`` (in [0, 1] units), quantised to uint8."""
    if min(num_train, num_classes, channels) < 1 or num_test < 0 or size < 4 or noise < 0:
        raise ValueError(f"synthetic: need num_train, num_classes, channels >= 1, num_test >= 0, "
                         f"size >= 4 and noise >= 0; got {num_train}, {num_classes}, {channels}, "
                         f"{num_test}, {size}, {noise}")
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        contrast = 0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
        x = 0.5 + contrast * (templates[labels] - 0.5)
        x = x + noise * torch.randn(n, channels, size, size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels

    (xtr, ytr), (xte, yte) = make(num_train), make(num_test)
    flat = xtr.double().div(255).transpose(0, 1).reshape(channels, -1)
    mean, std = tuple(flat.mean(1).tolist()), tuple(flat.std(1).clamp_min(1e-3).tolist())
    return (ImageDataset(xtr, ytr, num_classes, mean, std, "synthetic"),
            ImageDataset(xte, yte, num_classes, mean, std, "synthetic"))


def load_dataset(name: str, data_dir: str | Path | None = None,
                 **synthetic_options: Any) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) for ``name`` in ``DATASETS``; ``synthetic_options`` go to ``synthetic_dataset``."""
    key = name.lower().replace("_", "-")
    if key == "synthetic":
        return synthetic_dataset(**synthetic_options)
    if synthetic_options:
        raise ValueError(f"options {sorted(synthetic_options)} apply to the synthetic dataset only")
    if key in ("fashion-mnist", "fashionmnist", "fmnist"):
        splits = load_fashion_mnist(data_dir)
    elif key in ("cifar10", "cifar-10", "cifar100", "cifar-100"):
        splits = load_cifar(key.replace("-", ""), data_dir)
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    for split, dataset in zip(("training", "test"), splits):
        if len(dataset) == 0:  # well-formed files that hold nothing: a cut-short download
            raise DatasetError(f"{key}: the {split} files hold no images; fetch them again")
    return splits


from .loader import BatchLoader, augment_batch, normalize  # noqa: E402  (re-export)

__all__ = ["DATASETS", "BatchLoader", "DatasetError", "DatasetNotFoundError", "ForbiddenGlobalError",
           "ImageDataset",
           "RestrictedUnpickler", "augment_batch", "load_cifar", "load_dataset", "load_fashion_mnist",
           "normalize", "read_idx", "synthetic_dataset"]
