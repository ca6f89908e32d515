"""metamixer_fast.memory: with retain_freed_memory, a training-like allocation pattern (the same
few-MiB blocks allocated and freed every step) stops faulting fresh pages in each step, where
blocks that are unmapped when freed fault every page again.

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
def step():  # eight activations of about 4 MiB, freed together, like one training step
    blocks = [torch.empty((1 << 20) + 4096 * i).fill_(1.0) for i in range(8)]
    del blocks
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""
PAGES_PER_STEP = 8 * (4 << 20) // 4096


def _faults_per_step(setting: str) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS, setting], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    retained, unmapped = _faults_per_step("on"), _faults_per_step("unmapped")
    assert unmapped > 0.5 * PAGES_PER_STEP, (retained, unmapped)  # the pattern can fault
    assert retained < 0.1 * PAGES_PER_STEP, (retained, unmapped)
