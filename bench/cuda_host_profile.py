"""Host time per call of the pieces of ``mix2`` and ``mixed_kd_loss`` on CUDA tensors.

    python bench/cuda_host_profile.py > bench/results/<commit>/host_profile.txt

Each row runs 300 calls back to back and reports the host's time per call, then the time once
the GPU has finished too ("with sync"): when the two agree, the call is bound by the host (the
Python, the op's checks and the kernel launches), not by the GPU. A torch.profiler table of 20
``mix2`` calls and 20 loss forward + backward steps follows. (Results on an H200:
bench/results/a3819e1/host_profile.txt and 889dd03/; bench/results/gpu-h200/host_profile.txt is the first,
before the value checks moved into the kernels.)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from metamixer_fast.kernels import mix as triton_mix
from metamixer_fast.kernels import mixed_kd_loss as triton_loss

import metamixer_fast as mf
from metamixer_fast import _backend, _checks
from metamixer_fast._layout import mix_output
from metamixer_fast.mix2 import _explain_mix2, _mix2_forward

DEV = torch.device("cuda")


def per_call(fn: Callable[[], object], calls: int = 300) -> str:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - start) / calls * 1e6
    return f"host {host:7.1f} us/call, with sync {total:7.1f}"


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
                            ).parse_args()  # no options: --help works without a GPU
    if not torch.cuda.is_available():
        sys.exit("cuda_host_profile: torch sees no CUDA device")
    n = 256
    x = torch.randn(n, 3, 32, 32, device=DEV)
    src, src2 = torch.randperm(n, device=DEV), torch.randperm(n, device=DEV)
    w, w2 = torch.zeros(n, device=DEV), torch.rand(n, device=DEV)
    box = torch.tensor([[4, 20, 5, 25]] * n, device=DEV)
    k, b, c = 4, 1024, 1000
    z = torch.randn(k, b, c, device=DEV, requires_grad=True)
    y = torch.randint(0, c, (b,), device=DEV)
    wts = torch.ones(b, 1, device=DEV)

    def fwd_bwd() -> None:
        z.grad = None
        ce, kd = mf.mixed_kd_loss(z, y, temperature=3.0)
        (ce.sum() + kd.sum()).backward()

    h = torch.randn(256, 128, 16, 16, device=DEV, requires_grad=True)

    def mix_fwd_bwd() -> None:  # a feature-stage blend, as MetaMixer's hook runs it
        h.grad = None
        mf.mix(h, src, w2).sum().backward()

    def fwd_nograd() -> None:
        with torch.no_grad():
            mf.mixed_kd_loss(z, y, temperature=3.0)

    rows: dict[str, Callable[[], object]] = {
        "x.clone()": x.clone,
        "mf.mix2": lambda: mf.mix2(x, src, w, box, src2, w2),
        "_mix2_forward (op body)": lambda: _mix2_forward(x, src, w, box, src2, w2),
        "arg checks (_explain_mix2)": lambda: _explain_mix2(x, src, w, box, src2, w2),
        "value checks (mix)": lambda: _checks.check_mix_values(x, src, w, box),
        "one _assert_async check": lambda: _checks._value_check(((src >= 0) & (src < n)).all(), "m"),
        "backend lookup": lambda: _backend.kernel("mix2", DEV),
        "triton launcher km.mix2": lambda: triton_mix.mix2(x, src, w, box, src2, w2),
        "mix_output": lambda: mix_output(x),
        "torch.empty_like": lambda: torch.empty_like(x),
        "mix fwd+bwd (256x128x16x16)": mix_fwd_bwd,
        "loss fwd+bwd": fwd_bwd,
        "loss fwd (no grad)": fwd_nograd,
        "loss value checks": lambda: _checks.check_mixed_kd_loss_values(y[:, None], wts, c, None),
        "loss triton fwd launcher": lambda: triton_loss.mixed_kd_loss_forward(
            [z.detach()], y[:, None], wts, 3.0, 0.0, "pairwise", None, True),
    }
    for name, fn in rows.items():
        print(f"{name:32s} {per_call(fn)}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            mf.mix2(x, src, w, box, src2, w2)
        for _ in range(20):
            fwd_bwd()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=50))


if __name__ == "__main__":
    main()
