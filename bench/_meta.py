"""What every benchmark shares: the interleaved timing loop, and what it records next to its
timings (the commit and the CPU)."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """Short hash of HEAD, with ``-dirty`` when tracked files differ from it (other than the
    benchmark results in bench/results, which a series of runs rewrites as it goes).
    METAMIXER_BENCH_COMMIT, if set, is taken instead (a run from a copy of the checkout)."""
    if os.environ.get("METAMIXER_BENCH_COMMIT"):
        return os.environ["METAMIXER_BENCH_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def interleaved_times(rows: dict[str, Callable[[], object]], rounds: int, warmup: int = 3
                      ) -> dict[str, list[float]]:
    """Seconds per row and round, each round running every row once, in a new random order
    (seeded): a row leaves the cache dirty or clean for the next one (a row whose outputs are
    written back while the next one runs, or one that evicts the inputs), so no row may always
    follow the same one, as it would in a fixed or rotating order.

    A row may have ``before()`` / ``after()`` methods (e.g. to set a mode): they run around
    the row's call, outside its time."""
    names = list(rows)
    times: dict[str, list[float]] = {name: [] for name in names}
    shuffle = random.Random(0).shuffle
    for r in range(warmup + rounds):
        order = list(names)
        shuffle(order)
        for name in order:
            row = rows[name]
            getattr(row, "before", lambda: None)()
            start = time.perf_counter()
            row()
            elapsed = time.perf_counter() - start
            getattr(row, "after", lambda: None)()
            if r >= warmup:
                times[name].append(elapsed)
    return times
