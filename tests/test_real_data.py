"""The real Fashion-MNIST (Debian's ``dataset-fashion-mnist``): the loader reads it, and the demo
configuration learns from it. Skipped where the package is not installed; ``.ci/run`` installs
it and sets ``METAMIXER_REQUIRE_DATA=1``, which turns the skip into a failure."""

from __future__ import annotations

import json
import os

import pytest
import torch

from metamixer_fast.data import FASHION_MNIST_DIR, load_dataset
from metamixer_fast.train import main


@pytest.fixture
def fashion_mnist() -> None:
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        return
    why = f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)"
    if os.environ.get("METAMIXER_REQUIRE_DATA") == "1":
        pytest.fail(f"METAMIXER_REQUIRE_DATA=1 but {why}")
    pytest.skip(why)


def test_real_fashion_mnist(fashion_mnist) -> None:
    train, test = load_dataset("fashion-mnist")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert torch.equal(test.labels.bincount(), torch.full((10,), 1000))
    pixels = train.images.double() / 255
    assert abs(pixels.mean().item() - train.mean[0]) < 1e-3 and abs(pixels.std().item() - train.std[0]) < 1e-3


def test_the_demo_config_learns_real_fashion_mnist(fashion_mnist, tmp_path) -> None:
    """The demo's MetaMixer run (2 peers, every stage), cut to 120 steps of 128 images and 2,560
    test images: both peers and their ensemble must be far above chance (10 %). In that budget
    they reach 67-70 % (seeds 0-2); the bound leaves room for other machines' rounding."""
    out = tmp_path / "demo"
    assert main(["--config", "configs/demo-fashion-mnist.toml", "--epochs", "1",
                 "--limit-train-batches", "120", "--limit-eval-batches", "20", "--no-progress",
                 "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert min(record["top1"]) > 50 and record["ensemble_top1"] > 50, record
    assert (out / "checkpoint.pt").is_file()
