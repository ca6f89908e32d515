"""metamixer_fast.memory: with retain_freed_memory, a training-like allocation pattern (the same
few-MiB blocks allocated and freed every step) stops faulting fresh pages in each step.

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
    retained, default = _faults_per_step("on"), _faults_per_step("off")
    assert retained < 0.1 * PAGES_PER_STEP, (retained, default)
    assert default > 2 * retained, (retained, default)  # the setting is what makes the difference
