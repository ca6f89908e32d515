"""The README's Python examples run as written: its ```python blocks, in order, in one
namespace, given the two names a reader supplies (``make_model`` and ``loader``); and the
quick-start script it points to."""

from __future__ import annotations

import re
import subprocess
import sys
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


def test_the_quickstart_script_learns() -> None:
    """examples/quickstart.py (``make quickstart``) runs, its loss falls, and its peers end near
    the task's best possible top-1 (the nearest-centre rule it prints), far above chance (10 %)."""
    script = README.parent / "examples" / "quickstart.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    bayes = float(lines[0].rsplit(":", 1)[1])
    epochs = [re.search(r"loss ([\d.]+) .*per peer \[([\d.]+), ([\d.]+)\]  ensemble ([\d.]+)", line)
              for line in lines[1:]]
    assert len(epochs) == 5 and all(epochs), proc.stdout
    losses = [float(m.group(1)) for m in epochs]
    assert losses == sorted(losses, reverse=True)
    final = [float(v) for v in epochs[-1].groups()[1:]]
    assert all(bayes - 6 < acc <= bayes + 3 for acc in final), (bayes, final)
