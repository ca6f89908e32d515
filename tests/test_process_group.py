"""process_group.mean_over_ranks: an epoch's training metrics under DDP describe every rank's
shard of the data, not rank 0's alone."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metamixer_fast import process_group


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sums = torch.tensor([1.0 + rank, 10.0 * rank], dtype=torch.float64)  # rank-local sums
        process_group.mean_over_ranks(sums, world)
        torch.save(sums, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_mean_over_ranks_averages_every_ranks_sums(tmp_path: Path) -> None:
    out = str(tmp_path / "sums")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in range(2):
        assert torch.equal(torch.load(f"{out}.{rank}"),
                           torch.tensor([1.5, 5.0], dtype=torch.float64))


def test_one_process_leaves_its_sums_alone() -> None:
    sums = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert process_group.mean_over_ranks(sums, 1) is sums and sums.tolist() == [3.0, 4.0]
