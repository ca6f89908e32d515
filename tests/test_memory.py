"""metamixer_fast.memory: with retain_freed_memory, a training-like allocation pattern (the same
blocks allocated and freed every step: a few MiB, or more than glibc's 32 MiB mmap ceiling)
stops faulting fresh pages in each step, where blocks that are unmapped when freed fault every
page again.

Measured in fresh interpreters, since the setting is process-wide and glibc's own thresholds
move with what a process has already allocated."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

STEPS = r"""
import resource, sys, torch
from metamixer_fast import memory
if sys.argv[1] == "on":
    assert memory.retain_freed_memory()
else:  # every block mapped fresh (glibc's default threshold, pinned: its own adjustment
    # depends on the process's history, which makes the default itself unpredictable)
    import ctypes
    assert ctypes.CDLL("libc.so.6").mallopt(memory.M_MMAP_THRESHOLD, 128 << 10)
count, mib = int(sys.argv[2]), int(sys.argv[3])
def step():  # `count` activations of about `mib` MiB, freed together, like one training step
    blocks = [torch.empty((mib << 18) + 4096 * i).fill_(1.0) for i in range(count)]
    del blocks
for _ in range(10):  # warm-up: the heap's layout settles after a few steps (in the first
    step()           # ones, small allocations land in the freed space and move the blocks)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""
def _faults_per_step(setting: str, count: int, mib: int) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS, setting, str(count), str(mib)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
@pytest.mark.parametrize("count, mib", [(8, 4), (3, 40)])
def test_retained_memory_is_reused_without_page_faults(count, mib):
    pages_per_step = count * (mib << 20) // 4096
    retained = _faults_per_step("on", count, mib)
    unmapped = _faults_per_step("unmapped", count, mib)
    assert unmapped > 0.5 * pages_per_step, (retained, unmapped)  # the pattern can fault
    assert retained < 0.1 * pages_per_step, (retained, unmapped)
