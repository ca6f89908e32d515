"""Ahead-of-time compilation of the Triton kernels for real GPU targets, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas that ships with triton) for each launch
configuration ``launch_config`` picks; ``resource_usage`` reads registers and spills from the
cubin. ``python -m metamixer_fast.kernels.aot --report`` prints the table in docs/gpu.md
(``--json``: the same as JSON). Needs a process without TRITON_INTERPRET=1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .mixed_kd_loss import (
    _acc,
    _mixed_kd_loss_bwd_kernel,
    _mixed_kd_loss_fwd_kernel,
    launch_config,
    triton,
)

__all__ = ["AOT_ARCHS", "AOT_CLASSES", "aot_cases", "aot_compile", "aot_report", "aot_results",
           "cuobjdump_text", "resource_usage"]
_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                  torch.float64: "fp64"}


def aot_compile(backward: bool, k: int, c: int, mode: str, arch: int,
                dtype: torch.dtype = torch.float32, detach: bool = True):
    """Compile one kernel for ``GPUTarget("cuda", arch, 32)`` without a GPU, with the block
    sizes and num_warps ``launch_config`` picks and contiguous logits (stride_c = 1, as the
    JIT specializes it), M = 1 labels. Returns triton's CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ensemble = mode == "ensemble"
    k_pad, block_c, rows, warps = launch_config(k, c, ensemble, backward)
    fn = _mixed_kd_loss_bwd_kernel if backward else _mixed_kd_loss_fwd_kernel
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("ahead-of-time compilation needs the kernels compiled, not interpreted: "
                           "run it in a process without TRITON_INTERPRET=1, e.g. python -m "
                           "metamixer_fast.kernels.aot --json")
    out = "fp64" if dtype == torch.float64 else "fp32"
    pointers = {"z_ptr": _TRITON_DTYPES[dtype], "dz_ptr": _TRITON_DTYPES[dtype], "lab_ptr": "i64",
                "w_ptr": "fp32", "a_ptr": out, "stats_ptr": "fp64", "ce_ptr": out, "kd_ptr": out,
                "gce_ptr": out, "gkd_ptr": out, "ok_ptr": "i32"}
    constexprs = {"K": k, "K_PAD": k_pad, "BLOCK_C": block_c, "ROWS": rows, "ENSEMBLE": ensemble,
                  "ACC": _acc(dtype), "stride_c": 1, "dstride_c": 1, "M": 1}
    constexprs.update({"DETACH": detach, "SOFT_BF16": False} if backward else {"HAS_EPS": True})
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in ("t_hi", "t_lo", "eps_hi", "eps_lo"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def _cuobjdump(ptxas: Path) -> Path:
    """The cuobjdump beside the ptxas triton uses, else triton's own, else one on PATH. (Once
    torch._inductor is imported, TRITON_PTXAS_PATH may point at torch's bundled ptxas, which
    has no cuobjdump beside it; child processes inherit that.)"""
    import shutil

    import triton

    candidates = [ptxas.with_name("cuobjdump"),
                  Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"]
    on_path = shutil.which("cuobjdump")
    candidates += [Path(on_path)] if on_path else []
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no cuobjdump found (looked at {', '.join(map(str, candidates))}); "
                            f"install triton's NVIDIA backend or the CUDA toolkit")


def cuobjdump_text(compiled, option: str) -> str:
    """What cuobjdump ``option`` (``-res-usage``, ``--dump-sass``) prints for a compiled
    kernel's cubin, with the cuobjdump that ships with triton (no GPU or driver needed)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = _cuobjdump(Path(get_ptxas(compiled.metadata.target.arch).path))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        return subprocess.run([str(cuobjdump), option, str(cubin)], check=True,
                              capture_output=True, text=True).stdout


def resource_usage(compiled) -> dict[str, int]:
    """Registers and per-thread local memory of a compiled kernel, read from its cubin.
    Spilled registers live in the stack frame (STACK), which is part of the local memory the
    driver reports, so ``spills`` is (STACK + LOCAL) / 4: the number CompiledKernel.n_spills
    gives once loaded on a GPU."""
    import re

    text = cuobjdump_text(compiled, "-res-usage")
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text))
    local, stack = int(fields["LOCAL"]), int(fields["STACK"])
    return {"regs": int(fields["REG"]), "spills": (local + stack) // 4, "local_bytes": local,
            "stack_bytes": stack, "shared_bytes": int(fields["SHARED"])}


AOT_CLASSES = (100, 1000, 32768)
AOT_ARCHS = (80, 90)


def aot_cases(ks: Sequence[int] = (4,)):
    """(kernel, K, C, mode, detach) for every configuration the AOT test compiles."""
    for k in ks:
        for c in AOT_CLASSES:
            for mode in ("pairwise", "ensemble"):
                yield "fwd", k, c, mode, True
                for detach in (True, False):
                    yield "bwd", k, c, mode, detach


def aot_results(ks: Sequence[int] = (4, 8)) -> list[dict]:
    """Compile every ``aot_cases`` configuration for every ``AOT_ARCHS`` target; one dict each
    with the launch parameters and ``resource_usage``."""
    results = []
    for kind, k, c, mode, detach in aot_cases(ks):
        _, block_c, rows, warps = launch_config(k, c, mode == "ensemble", kind == "bwd")
        for arch in AOT_ARCHS:
            compiled = aot_compile(kind == "bwd", k, c, mode, arch, detach=detach)
            results.append({"kernel": kind, "K": k, "C": c, "mode": mode, "detach": detach,
                            "arch": arch, "BLOCK_C": block_c, "ROWS": rows, "num_warps": warps,
                            "compiled_num_warps": compiled.metadata.num_warps,
                            **resource_usage(compiled)})
    return results


def aot_report(results: list[dict]) -> str:
    """Markdown table of registers / spills per kernel configuration and target."""
    lines = ["| kernel | K | C | mode | detach | BLOCK_C | ROWS | warps | "
             + " | ".join(f"sm_{a} regs / spills" for a in AOT_ARCHS) + " |",
             "|---" * (8 + len(AOT_ARCHS)) + "|"]
    for i in range(0, len(results), len(AOT_ARCHS)):
        r = results[i]
        cells = [f"{x['regs']} / {x['spills']}" for x in results[i:i + len(AOT_ARCHS)]]
        det = str(r["detach"]) if r["kernel"] == "bwd" else "-"
        lines.append(f"| {r['kernel']} | {r['K']} | {r['C']} | {r['mode']} | {det} | "
                     f"{r['BLOCK_C']} | {r['ROWS']} | {r['num_warps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true",
                        help="compile for sm_80/sm_90 (no GPU needed), print registers/spills")
    parser.add_argument("--json", action="store_true", help="the same as JSON")
    args = parser.parse_args()
    if args.report or args.json:
        table = aot_results()
        print(json.dumps(table) if args.json else aot_report(table))
