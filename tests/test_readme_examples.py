"""The README's Python examples run as written: its ```python blocks, in order, in one
namespace, given the two names a reader supplies (``make_model`` and ``loader``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from metamixer_fast.models import build_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_examples_run_and_train() -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) == 2  # the quick start and the MetaMixer loop; a new block needs its check here
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g))
              for _ in range(3)]
    initial = []

    def make_model() -> torch.nn.Module:
        model = build_model("tiny", 10, 3)
        initial.append([p.detach().clone() for p in model.parameters()])
        return model

    namespace = {"make_model": make_model, "loader": loader}
    exec(compile(blocks[0], "README quick start", "exec"), namespace)
    for model, params in zip(namespace["peers"], initial, strict=True):  # the optimizer stepped
        assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    exec(compile(blocks[1], "README MetaMixer", "exec"), namespace)
    assert namespace["mixer"].stats["steps"] == len(loader)  # one plan per batch
    out = namespace["out"]
    assert torch.isfinite(out.loss) and out.ce.shape == out.kd.shape == (2,)
