"""Keep freed CPU memory in the process between training steps.

PyTorch's CPU allocator is the C library's ``malloc``. With glibc's defaults, large blocks (an
activation of a CIFAR batch is 4-8 MB) are mapped fresh from the kernel and unmapped again when
freed, or the top of the heap is trimmed back, so every step touches its activations' pages for
the first time again: tens of thousands of page faults a step, on the CPU the step runs on. For
2 ResNet-20 peers at batch 128, run as separate jobs, the research-style loop with glibc's
defaults took 10.9-25.6 thousand faults a step and ours, with this setting, 0-333
(``python bench/bench_train_step.py --steps 10 --fresh-processes 3``,
bench/results/train_step_resnet20_b128_fresh-processes.json). A training loop allocates the
same sizes every step, so it is better served by keeping them, as the CUDA caching allocator
does on GPUs.

``retain_freed_memory()`` sets glibc's ``M_MMAP_MAX`` to 0, so no block is mapped on its own and
blocks of every size come from the heap (``M_MMAP_THRESHOLD`` alone stops at 32 MiB, below a
64x3x224x224 fp32 batch), pins ``M_MMAP_THRESHOLD`` at that ceiling (which also stops glibc from
moving it), and sets ``M_TRIM_THRESHOLD`` to 1 GiB (up to that much freed memory stays in the
process). glibc still maps memory where the heap cannot grow. It affects the whole process; it is
a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 1 << 30


def retain_freed_memory() -> bool:
    """Make malloc keep freed blocks for reuse; True if the settings took effect."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_MMAP_MAX, 0),
                (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all([bool(libc.mallopt(param, value)) for param, value in settings])  # (applies all)
