"""``metamixer-fast info`` (or ``python -m metamixer_fast.info``): versions, what was built, and
the backend per device."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from . import __version__, _backend
from . import ops as _ops  # noqa: F401  (registers the ops and their reference kernels)
from .cli import plain_text

OPS = ("mixed_kd_loss", "mixed_kd_loss_backward", "mix", "mix_backward", "mix2")
STREAM_STORES_VAR = "METAMIXER_STREAM_STORES"  # read by the C++ mix2 on every call (csrc/mix.cpp)


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def _store_mode_line() -> str:
    """What METAMIXER_STREAM_STORES makes mix2's C++ kernel do with its output's stores."""
    value = os.environ.get(STREAM_STORES_VAR, "")
    timed = "mix2 (C++) times both store modes for outputs from 1 MB and keeps the faster"
    what = {"": timed, "auto": timed,
            "on": "mix2 (C++) streams its outputs past the cache where it can",
            "off": "mix2 (C++) stores its outputs through the cache"}
    return (f"{STREAM_STORES_VAR}  {value or '(unset)'}: "
            f"{what.get(value, 'not one of auto, on, off: mix2 will refuse it')}")


def report() -> str:
    lines = [
        f"metamixer_fast {__version__}",
        f"python         {platform.python_version()} ({sys.executable})",
        f"torch          {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
        f"{torch.get_num_threads()} CPU threads)",
        f"triton         {_backend.triton_version() or 'not installed'}"
        + (" (TRITON_INTERPRET=1)" if _backend.triton_interpreted() else ""),
    ]
    cpp = _backend.cpp_module()
    if cpp is None:
        lines.append("C++ extension  NOT BUILT: CPU ops use the PyTorch reference "
                     "(reinstall with METAMIXER_REQUIRE_CPP=1 to see why)")
    else:
        lines.append(f"C++ extension  built: {torch.ops.metamixer_cpp.build_info()}")
    # A bad setting is reported on its line, like a per-op error: a report that crashes on the
    # very setting it should show would hide everything else.
    try:
        forced = _backend.forced_backend() or "(unset: automatic choice)"
    except ValueError as exc:
        forced = f"ERROR: {exc}"
    lines.append(f"{_backend.ENV_VAR}  {forced}")
    lines.append(_store_mode_line())
    for device in _devices():
        for op in OPS:
            try:
                choice = _backend.backend_for(op, device)
            except (RuntimeError, ValueError) as exc:
                choice = f"ERROR: {exc}"
            lines.append(f"  {device.type:4s} {op:24s} -> {choice}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Prints the report; status 1 when a line of it is an ERROR (a bad METAMIXER_BACKEND, a
    backend that cannot run here), so that scripts can check the setting."""
    argparse.ArgumentParser(prog="metamixer-fast info", description=plain_text(__doc__)
                            ).parse_args(argv)
    text = report()
    print(text)
    return 1 if "ERROR:" in text else 0


if __name__ == "__main__":
    sys.exit(main())
