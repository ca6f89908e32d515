"""The loss benchmark's hand-written DML loops compute the loss the fused op does (same value,
same gradient), so their times are of the same work, and the loss tables' columns say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.bench_mixed_kd_loss import DML_LOOPS, SHAPES, Shape, contenders, make_inputs
from bench.report import loss_markdown
from metamixer_fast import reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("loop", list(DML_LOOPS))
@pytest.mark.parametrize("k", [2, 3, 4])
def test_dml_loops_compute_the_reference_loss(loop: str, k: int) -> None:
    z0, labels, weights = make_inputs(Shape(k, 16, 11, dtype=torch.float64))
    z = z0.clone().requires_grad_(True)
    loss = DML_LOOPS[loop](z, labels, 3.0)
    loss.backward()
    zr = z0.clone().requires_grad_(True)
    ce, kd = reference.mixed_kd_loss(zr, labels[:, None], weights.double(), 3.0, 0.0, "pairwise")
    want = ce.sum() + kd.sum()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-12, atol=1e-12)


def test_the_loops_run_on_pairwise_shapes_only() -> None:
    for shape in SHAPES:
        names = set(contenders(Shape(shape.k, 8, 7, shape.mode, shape.temperature)))
        assert names >= {"fused", "reference", "softmax_floor"}
        assert (set(DML_LOOPS) <= names) == (shape.mode == "pairwise"), shape


def test_tables_of_older_runs_keep_their_columns() -> None:
    """A run from before the softmax-once loop renders without its columns; a newer one with."""
    old = json.loads((ROOT / "bench/results/95719c8/mixed_kd_loss_off_4.json").read_text())
    assert "softmax once" not in loss_markdown(old)
    new = json.loads(json.dumps(old))
    for row in new["rows"]:
        if "dml_pair_loop" in row["median_ms"]:
            row["median_ms"]["dml_loop_peer_softmax"] = row["median_ms"]["dml_pair_loop"] / 2
            row["speedup_vs_dml_loop_peer_softmax"] = row["speedup_vs_dml_pair_loop"] / 2
    table = loss_markdown(new).splitlines()
    assert table[0].count("|") == table[2].count("|") == 14
    assert table[2].endswith(f"| {new['rows'][0]['speedup_vs_dml_loop_peer_softmax']:.2f}x |")
