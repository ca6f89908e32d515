"""Datasets (IDX, CIFAR pickles, synthetic) and the batched loader (augmentation, resume, sharding)."""

from __future__ import annotations

import gzip
import pickle
import re
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from idx_files import fake_fashion_mnist, write_idx

from metamixer_fast.data import (
    BatchLoader,
    DatasetError,
    DatasetNotFoundError,
    ImageDataset,
    augment_batch,
    load_dataset,
    normalize,
    read_idx,
    synthetic_dataset,
)

# ----------------------------------------------------------------------------- file writers


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as python 2 ``str`` (SHORT_BINSTRING/BINSTRING), as the real CIFAR files do."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n))
        self.write(obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_cifar_pickle(path: Path, batch: dict, py2: bool) -> None:
    if py2:  # keys and strings are py2 str; numpy's module path as numpy 1 wrote it
        batch = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in batch.items()}
        with open(path, "wb") as f:
            Py2Pickler(f, protocol=2).dump(batch)
        path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    else:
        with open(path, "wb") as f:
            pickle.dump(batch, f)


def fake_cifar(root: Path, name: str, rng: torch.Generator, py2: bool, n: int = 6) -> dict:
    classes, key = (10, "labels") if name == "cifar10" else (100, "fine_labels")
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        files = ["train", "test"]
    directory = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    directory.mkdir(parents=True)
    written = {}
    for f in files:
        data = torch.randint(0, 256, (n, 3072), generator=rng, dtype=torch.uint8).numpy()
        labels = torch.randint(0, classes, (n,), generator=rng).tolist()
        batch = {"batch_label": f"fake {f}", "data": data, key: labels,
                 "filenames": [f"{i}.png" for i in range(n)]}
        if name == "cifar100":
            batch["coarse_labels"] = [x // 5 for x in labels]
        write_cifar_pickle(directory / f, batch, py2)
        written[f] = (data, labels)
    if name == "cifar100":
        write_cifar_pickle(directory / "meta", {"fine_label_names": [str(i) for i in range(100)]}, py2)
    return written


# ----------------------------------------------------------------------------- Fashion-MNIST / IDX


def test_idx_round_trip(tmp_path, rng) -> None:
    arrays = fake_fashion_mnist(tmp_path, rng)
    train, test = load_dataset("fashion-mnist", tmp_path)
    for ds, (images, labels) in ((train, arrays["train"]), (test, arrays["t10k"])):
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 1, 28, 28)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert ds.labels.dtype == torch.int64 and torch.equal(ds.labels, torch.from_numpy(labels).long())
        assert ds.num_classes == 10 and ds.name == "fashion-mnist" and len(ds.mean) == 1


def test_idx_uncompressed_files_are_accepted(tmp_path, rng) -> None:
    images = torch.randint(0, 256, (3, 5, 4), generator=rng, dtype=torch.uint8).numpy()
    write_idx(tmp_path / "x-idx3-ubyte", images, compress=False)
    assert torch.equal(read_idx(tmp_path / "x-idx3-ubyte", 3), torch.from_numpy(images))


def _corrupt(path: Path, how: str) -> None:
    raw = gzip.decompress(path.read_bytes())
    if how == "truncated-gzip":
        path.write_bytes(path.read_bytes()[:-20])
    elif how == "truncated-data":
        path.write_bytes(gzip.compress(raw[:-7]))
    elif how == "extra-data":
        path.write_bytes(gzip.compress(raw + b"\0"))
    elif how == "wrong-magic":
        path.write_bytes(gzip.compress(b"\0\0\x08\x01" + raw[4:]))
    elif how == "not-gzip":
        path.write_bytes(b"<html>not found</html>")
    elif how == "header-only":
        path.write_bytes(gzip.compress(raw[:6]))


@pytest.mark.parametrize("how, message", [
    ("truncated-gzip", "not a valid gzip file"), ("truncated-data", "truncated or corrupt"),
    ("extra-data", "truncated or corrupt"), ("wrong-magic", "magic number 0x00000801"),
    ("not-gzip", "not a valid gzip file"), ("header-only", "header alone"),
])
def test_malformed_idx_names_the_path(tmp_path, rng, how: str, message: str) -> None:
    fake_fashion_mnist(tmp_path, rng)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    _corrupt(bad, how)
    with pytest.raises(DatasetError, match=message) as e:
        load_dataset("fashion-mnist", tmp_path)
    assert str(bad) in str(e.value)


def test_idx_label_range_and_count_mismatch(tmp_path, rng) -> None:
    fake_fashion_mnist(tmp_path, rng)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1] * 11 + [10]))
    with pytest.raises(DatasetError, match=r"label 10, expected 0..9") as e:
        load_dataset("fashion-mnist", tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1] * 5))
    with pytest.raises(DatasetError, match=r"12 images but .* 5 labels"):
        load_dataset("fashion-mnist", tmp_path)


def test_idx_images_of_size_zero_or_of_two_sizes_are_refused(tmp_path, rng) -> None:
    fake_fashion_mnist(tmp_path, rng)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(bad, np.zeros((30, 0, 28), np.uint8))
    with pytest.raises(DatasetError, match=r"item of size 0 \(header \[30, 0, 28\]\)") as e:
        load_dataset("fashion-mnist", tmp_path)
    assert str(bad) in str(e.value)
    write_idx(bad, np.zeros((30, 32, 32), np.uint8))
    with pytest.raises(DatasetError, match=r"\[32, 32\] pixels but the test images \[28, 28\]"):
        load_dataset("fashion-mnist", tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, rng) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=r"apt-get install dataset-fashion-mnist") as e:
        load_dataset("fashion-mnist", missing)
    assert str(missing) in str(e.value) and "--data-dir" in str(e.value)
    fake_fashion_mnist(tmp_path, rng)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte.gz does not exist.*apt-get"):
        load_dataset("fashion-mnist", tmp_path)


def test_a_data_dir_that_is_a_file_or_files_without_images_are_named(tmp_path, rng) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for name in ("fashion-mnist", "cifar10"):
        with pytest.raises(DatasetNotFoundError, match=r"is a file, not a directory"):
            load_dataset(name, not_a_dir)
    fake_fashion_mnist(tmp_path / "empty", rng, n_test=0)
    with pytest.raises(DatasetError, match=r"fashion-mnist: the test files hold no images; fetch them"):
        load_dataset("fashion-mnist", tmp_path / "empty")


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("py2", [True, False], ids=["py2-pickles", "py3-pickles"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_load(tmp_path, rng, name: str, py2: bool) -> None:
    written = fake_cifar(tmp_path, name, rng, py2)
    train, test = load_dataset(name, tmp_path)
    train_files = [f for f in written if f not in ("test_batch", "test")]
    test_file = "test_batch" if name == "cifar10" else "test"
    classes = 10 if name == "cifar10" else 100
    for ds, files in ((train, train_files), (test, [test_file])):
        data = np.concatenate([written[f][0] for f in files])
        labels = [label for f in files for label in written[f][1]]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 3, 32, 32)
        # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
        assert torch.equal(ds.images[:, 1, 2, 3], torch.from_numpy(data[:, 1024 + 2 * 32 + 3]))
        assert torch.equal(ds.images.reshape(len(labels), -1), torch.from_numpy(data))
        assert ds.labels.tolist() == labels and ds.num_classes == classes and len(ds.mean) == 3


def test_restricted_unpickler_refuses_other_globals(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / f).write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DatasetError, match=r"refusing to load global builtins.print") as e:
        load_dataset("cifar10", tmp_path)
    assert str(d / "data_batch_1") in str(e.value)


def test_malformed_cifar_names_the_path(tmp_path, rng) -> None:
    fake_cifar(tmp_path, "cifar10", rng, py2=False)
    d = tmp_path / "cifar-10-batches-py"
    (d / "data_batch_3").write_bytes((d / "data_batch_3").read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"data_batch_3 is not a valid CIFAR pickle"):
        load_dataset("cifar10", tmp_path)
    bad = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}
    write_cifar_pickle(d / "data_batch_3", bad, py2=False)
    with pytest.raises(DatasetError, match=r"data_batch_3: 'labels' out of range"):
        load_dataset("cifar10", tmp_path)
    bad = {"data": np.zeros((2, 3072), np.uint8), "labels": [[0, 1], [2]]}  # ragged
    write_cifar_pickle(d / "data_batch_3", bad, py2=False)
    with pytest.raises(DatasetError, match=r"data_batch_3: 'labels' must hold 2 integers"):
        load_dataset("cifar10", tmp_path)
    bad = {"data": np.zeros((2, 1000), np.uint8), "labels": [0, 1]}
    write_cifar_pickle(d / "data_batch_3", bad, py2=False)
    with pytest.raises(DatasetError, match=r"data_batch_3: 'data' must be a uint8 array \[N, 3072\]"):
        load_dataset("cifar10", tmp_path)


def test_missing_cifar_says_how_to_get_it(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError,
                       match=r"no data directory given.*cifar-10-python.tar.gz.*--data-dir"):
        load_dataset("cifar10")
    missing = re.escape(str(tmp_path / "x"))
    with pytest.raises(DatasetNotFoundError, match=rf"{missing} does not exist.*cifar-100-python.tar.gz"):
        load_dataset("cifar100", tmp_path / "x")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match=r"data_batch_1 does not exist.*extract it with tar xzf"):
        load_dataset("cifar10", tmp_path)


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError,
                       match=r"unknown dataset 'mnist'; known: fashion-mnist, cifar10, cifar100, synthetic"):
        load_dataset("mnist")


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_seeded_and_learnable() -> None:
    opts = {"num_train": 400, "num_test": 200, "num_classes": 5, "channels": 2, "size": 12}
    a_train, a_test = synthetic_dataset(**opts, seed=3)
    b_train, _ = synthetic_dataset(**opts, seed=3)
    c_train, _ = synthetic_dataset(**opts, seed=4)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_train.labels, b_train.labels)
    assert not torch.equal(a_train.images, c_train.images)
    assert a_train.images.shape == (400, 2, 12, 12) and a_test.images.shape == (200, 2, 12, 12)
    # Learnable: the nearest class mean of the training images classifies the test set well.
    x, xt = a_train.images.flatten(1).float(), a_test.images.flatten(1).float()
    means = torch.stack([x[a_train.labels == c].mean(0) for c in range(5)])
    accuracy = (torch.cdist(xt, means).argmin(1) == a_test.labels).float().mean().item()
    assert accuracy > 0.9, accuracy


# ----------------------------------------------------------------------------- augmentation


def test_crop_and_flip_match_direct_slicing(rng) -> None:
    b, c, h, w, pad = 6, 3, 9, 7, 3
    x = torch.randint(0, 256, (b, c, h, w), generator=rng, dtype=torch.uint8)
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=rng)
    offsets[0] = torch.tensor([0, 2 * pad])            # corners are included
    flips = torch.tensor([True, False, True, False, True, True])
    out = augment_batch(x, offsets, flips, pad)
    assert out.shape == (b, c, h, w) and out.dtype == torch.uint8
    padded = F.pad(x, (pad, pad, pad, pad))
    for i in range(b):
        dy, dx = offsets[i].tolist()
        window = padded[i, :, dy:dy + h, dx:dx + w]
        assert torch.equal(out[i], window.flip(-1) if flips[i] else window)
    assert torch.equal(augment_batch(x, None, None, 0), x)
    assert torch.equal(augment_batch(x, None, torch.ones(b, dtype=torch.bool), 0), x.flip(-1))


def test_normalize(rng) -> None:
    x = torch.randint(0, 256, (4, 3, 5, 5), generator=rng, dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    m, s = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
    expected = (x.double() / 255 - m) / s
    out = normalize(x, mean, std, channels_last=True)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- loader


def indexed_dataset(n: int, size: int = 8) -> ImageDataset:
    """Sample i has label i and constant pixel value i % 256 in its centre, so batches reveal order."""
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    images[:, :, 2:-2, 2:-2] = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1)
    return ImageDataset(images, torch.arange(n), n, (0.0,), (1 / 255,), "indexed", crop_padding=2, hflip=True)


def run(loader: BatchLoader, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < batches:
        for x, y in loader:
            out.append((x, y))
            if len(out) == batches:
                break
    return out


def test_loader_epoch_is_a_permutation_and_deterministic() -> None:
    ds = indexed_dataset(50)
    a = BatchLoader(ds, 16, seed=1)
    assert len(a) == 4 and len(BatchLoader(ds, 16, drop_last=True)) == 3
    epoch = list(a)
    assert [y.numel() for _, y in epoch] == [16, 16, 16, 2]
    labels = torch.cat([y for _, y in epoch])
    assert sorted(labels.tolist()) == list(range(50)) and labels.tolist() != list(range(50))
    again = list(BatchLoader(ds, 16, seed=1))
    for (x1, y1), (x2, y2) in zip(epoch, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(torch.cat([y for _, y in BatchLoader(ds, 16, seed=2)]), labels)
    assert not torch.equal(torch.cat([y for _, y in a]), labels)  # the next epoch reshuffles
    assert a.epoch == 2 and a.position == 0


def test_loader_batches_are_augmented_samples() -> None:
    ds = indexed_dataset(40)
    x, y = next(iter(BatchLoader(ds, 40, seed=0, channels_last=True)))
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    # Each output is its own sample, shifted by at most the padding: its centre value survives.
    values = (y % 256).float()
    assert torch.equal(x.flatten(1).max(1).values, values)
    crops = x[:, 0].ne(0).sum((1, 2))
    assert torch.all(crops <= 16) and torch.any(crops < 16)  # some crops cut the 4x4 centre
    x_eval, y_eval = next(iter(BatchLoader(ds, 40, shuffle=False, augment=False)))
    assert torch.equal(y_eval, torch.arange(40))
    assert torch.equal(x_eval, ds.images.float())


@pytest.mark.parametrize("stop", [0, 3, 4, 7, 8])
def test_loader_resume_sees_the_same_batches(stop: int) -> None:
    ds = indexed_dataset(70)
    reference = run(BatchLoader(ds, 16, seed=5, drop_last=True), 12)  # 4 batches per epoch
    first = BatchLoader(ds, 16, seed=5, drop_last=True)
    head = run(first, stop) if stop else []
    state = first.state_dict()
    resumed = BatchLoader(ds, 16, seed=999, drop_last=True)
    resumed.load_state_dict(state)
    tail = run(resumed, 12 - stop)
    for (x1, y1), (x2, y2) in zip(reference, head + tail, strict=True):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)


def test_end_epoch_after_a_break_starts_the_next_epoch() -> None:
    ds = indexed_dataset(64)
    full = [y for _, y in run(BatchLoader(ds, 16, seed=2), 8)]
    loader = BatchLoader(ds, 16, seed=2)
    first = next(iter(loader))[1]
    loader.end_epoch()
    assert loader.epoch == 1 and loader.position == 0
    loader.end_epoch()  # nothing handed out yet in this epoch: no-op
    second = [y for _, y in loader]
    assert torch.equal(first, full[0])
    assert all(torch.equal(a, b) for a, b in zip(second, full[4:], strict=True))


def test_loader_refuses_a_mismatched_state() -> None:
    state = BatchLoader(indexed_dataset(70), 16).state_dict()
    with pytest.raises(ValueError, match=r"'batch_size' was 16 .* has 8"):
        BatchLoader(indexed_dataset(70), 8).load_state_dict(state)
    with pytest.raises(ValueError, match=r"'num_samples'"):
        BatchLoader(indexed_dataset(71), 16).load_state_dict(state)


@pytest.mark.parametrize("n, world", [(50, 3), (64, 4), (7, 2)])
def test_sharding_is_disjoint_equal_and_follows_the_single_process_plan(n: int, world: int) -> None:
    ds = indexed_dataset(n)
    single = next(iter(BatchLoader(ds, n, seed=4)))
    shards = [list(BatchLoader(ds, 3, seed=4, rank=r, world_size=world)) for r in range(world)]
    per_rank = n // world
    labels = [torch.cat([y for _, y in s]) for s in shards]
    assert all(lb.numel() == per_rank for lb in labels)
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    union = torch.cat(labels)
    assert union.unique().numel() == per_rank * world  # disjoint
    # Together the ranks cover the single-process epoch, with the same augmentation.
    assert torch.equal(union, single[1][: per_rank * world])
    images = torch.cat([x for s in shards for x, _ in s])
    assert torch.equal(images, single[0][: per_rank * world])


def test_loader_bad_arguments() -> None:
    ds = indexed_dataset(10)
    with pytest.raises(ValueError, match=r"rank"):
        BatchLoader(ds, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"batch_size"):
        BatchLoader(ds, 0)
    with pytest.raises(ValueError, match=r"no batches"):
        BatchLoader(ds, 11, drop_last=True)
    for dtype in (torch.int64, torch.uint8, "float32"):
        with pytest.raises(TypeError, match=r"'dtype' must be a floating torch.dtype"):
            BatchLoader(ds, 4, dtype=dtype)


def test_idx_header_whose_size_overflows_int64_is_refused(tmp_path) -> None:
    """Dimensions whose product passes 2**64 (a corrupt header) wrapped to a small size in int64
    arithmetic, passed the size check and failed in numpy without the path."""
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 2**31, 2**31, 4))
    with pytest.raises(DatasetError, match=rf"IDX file {re.escape(str(path))} holds 16 bytes but "
                                           r"its header \[2147483648, 2147483648, 4\] implies "
                                           r"18446744073709551632"):
        read_idx(path, 3)


def test_read_idx_refuses_an_ndim_it_cannot_read(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"read_idx: 'ndim' must be one of \[1, 3\]"):
        read_idx(tmp_path / "any", 2)
