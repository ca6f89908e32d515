"""The benchmarks time what they say: every mixing row gives the reference's result for the batch
it was handed, --fresh-batches hands each call a different batch, and rows run in a shuffled
order with any mode switch outside their time."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_mix  # bench/ is not a package

from metamixer_fast import reference

MIXING_ROWS = ("mix x2", "mix2 fused", *bench_mix.STORE_ROWS, "reference x2", "reference x2, compiled")


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_input_rows_compute_the_reference_mixture(dtype: torch.dtype) -> None:
    # rows of 16 elements: the streamed-stores row streams (on an AVX-512 CPU)
    batches = bench_mix.Batches((6, 3, 9, 16), dtype, torch.Generator().manual_seed(3))
    x, _, plan = batches.entries[0]
    assert plan[2].shape == (6, 4) and bool((plan[2][:, 1] > plan[2][:, 0]).any())  # real boxes
    expected = reference.mix2(x, *plan)
    rows = bench_mix.input_rows(batches)
    for name in MIXING_ROWS:
        if isinstance(rows[name], str):  # torch.compile unavailable: says why, nothing to run
            assert name.endswith("compiled"), rows[name]
            continue
        row = rows[name]
        getattr(row, "before", lambda: None)()  # a store-mode row sets its mode outside its time
        try:
            assert torch.equal(row(), expected), name
        finally:
            getattr(row, "after", lambda: None)()
    assert torch.equal(rows["clone"](), x)


def test_interleaved_times_shuffles_rows_and_sets_modes_outside_the_timer() -> None:
    import _meta

    log: list[str] = []

    class Moded:
        def before(self) -> None:
            log.append("before")

        def after(self) -> None:
            log.append("after")

        def __call__(self) -> None:
            log.append("moded")

    rows = {"a": lambda: log.append("a"), "b": lambda: log.append("b"), "moded": Moded()}
    times = _meta.interleaved_times(rows, rounds=20, warmup=1)
    assert all(len(t) == 20 for t in times.values())
    calls = [c for c in log if c not in ("before", "after")]
    assert sorted(calls) == sorted(["a", "b", "moded"] * 21)
    firsts = {calls[3 * r] for r in range(21)}
    assert len(firsts) > 1  # not one fixed order
    i = log.index("moded")
    assert log[i - 1] == "before" and log[i + 1] == "after"


def test_fresh_batches_hand_every_call_the_next_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_mix, "FRESH_BYTES", 3 * (4 * 2 * 5 * 5) * 4)  # three fp32 batches
    batches = bench_mix.Batches((4, 2, 5, 5), torch.float32, torch.Generator().manual_seed(0),
                                fresh=True)
    assert len(batches.entries) == 3
    seen = [batches()[0] for _ in range(6)]
    assert [t.data_ptr() for t in seen[:3]] == [t.data_ptr() for t in seen[3:]]
    assert len({t.data_ptr() for t in seen}) == 3
    assert not torch.equal(seen[0], seen[1])
    assert not torch.equal(batches.entries[0][2][3], batches.entries[1][2][3])  # own plans


def test_fixed_batch_is_the_same_every_call() -> None:
    batches = bench_mix.Batches((4, 2, 5, 5), torch.float32, torch.Generator().manual_seed(0))
    assert len(batches.entries) == 1 and batches()[0] is batches()[0]


@pytest.mark.parametrize("row, mode", list(bench_mix.STORE_ROWS.items()))
def test_pytest_benchmark_rows_run_in_their_store_mode(row: str, mode: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`make bench` times each row through pytest-benchmark: a store-mode row must run with its
    mode set there too, and leave the variable and the thread count as they were."""
    monkeypatch.delenv("METAMIXER_STREAM_STORES", raising=False)
    seen: list[str | None] = []

    class Benchmark:  # pytest-benchmark's fixture, as far as test_mix_benchmark uses it
        def __init__(self) -> None:
            self.extra_info: dict = {}

        def __call__(self, fn) -> None:
            seen.append(os.environ.get("METAMIXER_STREAM_STORES"))
            fn()

    threads = torch.get_num_threads()
    case = "input 256x3x32x32 fp32"
    shape, dtype = bench_mix.INPUT_CASES[case]
    bench_mix.test_mix_benchmark(Benchmark(), case, shape, dtype, "input", row)
    assert seen == [mode]
    assert "METAMIXER_STREAM_STORES" not in os.environ
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_map_rows_compute_what_they_are_named(dtype: torch.dtype, channels_last: bool) -> None:
    """bench_mix_maps: the blend and box rows give the reference's mix, and the forward +
    backward rows its gradients."""
    import bench_mix_maps

    x, src, wt, box = bench_mix_maps.make_case((5, 6, 7, 7), dtype, channels_last)
    assert bool((box[:, 1] > box[:, 0]).all() and (box[:, 3] > box[:, 2]).all())  # real boxes
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
    rows = bench_mix_maps.rows_of(x, src, wt, box, grad=g)
    assert torch.equal(rows["clone"](), x)
    assert torch.equal(rows["blend"](), reference.mix(x, src, wt))
    assert torch.equal(rows["box"](), reference.mix(x, src, wt, box))
    if not dtype.is_floating_point:
        assert "box fwd+bwd" not in rows
        return
    for name, b in (("blend fwd+bwd", None), ("box fwd+bwd", box)):
        dx, dw = rows[name]()
        want_dx, want_dw = reference.mix_backward(g.double(), x.double(), src, wt.double(), b)
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
        torch.testing.assert_close(dx.double(), want_dx, rtol=tol, atol=tol)
        torch.testing.assert_close(dw.double(), want_dw, rtol=tol, atol=tol * 100)
