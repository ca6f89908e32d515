"""bench_cuda.py runs on a GPU only; what it computes from its timings is checked here: the
bytes each row's job moves, and its table rendered again from a stored JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_cuda  # noqa: E402  (bench/ is not a package)


@pytest.mark.parametrize("case, row, passes", [
    ("input 64x3x224x224 fp32", "mix2 fused", 2),
    ("input 64x3x224x224 fp32", "clone", 2),
    ("features 256x128x16x16 fp32 fwd+bwd", "mix fwd+bwd", 4),  # the weight needs no gradient
    ("features 256x128x16x16 fp32 fwd+bwd", "clone", 2),
    ("loss K=4,B=1024,C=1000 fp32", "fused", 3),
    ("loss K=4,B=1024,C=1000 fp32", "softmax fwd+bwd", 5),
])
def test_row_bytes_count_the_passes_of_each_job(case: str, row: str, passes: int) -> None:
    one_pass = 1000
    assert bench_cuda.row_bytes(case, {"pass_bytes": one_pass}, row) == passes * one_pass
    old = {"bytes": bench_cuda.OLD_PASSES[case.split()[0]] * one_pass}  # JSON before pass_bytes
    assert bench_cuda.row_bytes(case, old, row) == passes * one_pass


def test_a_stored_run_renders_every_row() -> None:
    path = ROOT / "bench/results/gpu-h200/cuda.json"
    result = json.loads(path.read_text())
    table = bench_cuda.markdown(result)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == sum(len(e["rows"]) for e in result["cases"].values())
    assert "do_bench" in table  # the run says how it was timed
    fused = next(r for r in rows if r.startswith("| features 256x128x16x16 fp32 fwd+bwd | mix fwd+bwd"))
    assert fused.split("|")[3].strip() == "1.124" and fused.split("|")[4].strip() == "119"
