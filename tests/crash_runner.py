"""Runs ``metamixer_fast.train.main`` and SIGKILLs itself at a chosen moment (for the crash tests).

usage: python tests/crash_runner.py MOMENT N -- TRAIN_ARGS...
MOMENT: ``step`` (before training step N, counted from 1 in this process), ``write`` (half way
through writing the N-th checkpoint file), ``rename`` (after the N-th checkpoint's temporary file
is complete, before it replaces the previous one).
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from metamixer_fast import checkpoint, train


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    moment, n = sys.argv[1], int(sys.argv[2])
    calls = {"count": 0}

    def hit() -> bool:
        calls["count"] += 1
        return calls["count"] == n

    if moment == "step":
        real_step = train.Run.train_step

        def train_step(self, x, y):
            if hit():
                die()
            return real_step(self, x, y)

        train.Run.train_step = train_step
    elif moment == "write":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if hit():
                f.write(b"\x50\x4b\x03\x04 half a checkpoint" * 512)
                f.flush()
                die()
            return real_save(obj, f, *args, **kwargs)

        checkpoint.torch.save = save
    elif moment == "rename":
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith(checkpoint.NAME) and hit():
                die()
            return real_replace(src, dst)

        checkpoint.os.replace = replace
    else:
        raise SystemExit(f"unknown moment {moment!r}")
    return train.main(sys.argv[sys.argv.index("--") + 1:])


if __name__ == "__main__":
    sys.exit(main())
