"""Static cost of the Triton mix kernels on a GPU target, without a GPU: machine instructions
(SASS), registers and spills of each kernel, per dtype, from ``triton.compile`` and cuobjdump.

    python bench/triton_mix_sass.py --out bench/results/<commit>/mix_sass.json
    python bench/triton_mix_sass.py --render bench/results/<commit>/mix_sass.json [--before OLD.json]

A kernel's instruction count is static (its whole cubin: the per-sample value checks that one
program per sample runs, then the path every element takes, BLOCK / (32 * num_warps) elements
per thread), so it says how much work the compiler emitted, not how long a launch takes: only a
GPU run of bench/bench_cuda.py gives that. Variants: a box (HAS_BOX), the backward with dw.
Each kernel compiles three times: for any shape (no hints), and as the JIT specializes a launch
on 3x224x224 and on 128x28x28 NCHW samples (pointers 16-byte aligned, integer arguments that
are multiples of 16 marked so, which lets loads vectorize and, where the row length is one,
lets the compiler share a division among 16 consecutive elements; those equal to 1 made
constants). The signature is
built from the kernel's own argument names, so an older checkout's kernels compile too (stage
its package on PYTHONPATH, as tests/gpu_check.sh does, to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from _meta import commit  # bench/ is on sys.path

KERNELS = ("_mix_fwd_kernel", "_mix2_fwd_kernel", "_mix_bwd_kernel")
DTYPES = {"uint8": "u8", "float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
DATA = ("x_ptr", "out_ptr", "g_ptr", "dx_ptr")  # pointers to the batch's dtype
ARG_TYPES = {"src_ptr": "*i64", "src2_ptr": "*i64", "box_ptr": "*i64", "inv_offsets_ptr": "*i64",
             "inv_list_ptr": "*i64", "ok_ptr": "*i32", "w_ptr": "*fp32", "w2_ptr": "*fp32",
             "dw_part_ptr": "*fp32", "rows_div": "i64", "row_len_div": "i64"}
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+\S", re.MULTILINE)
SHAPES: dict[str, tuple[int, int, int] | None] = {
    "any shape": None, "3x224x224 NCHW": (3, 224, 224), "128x28x28 NCHW": (128, 28, 28)}


def _launch_values(mix, plane: tuple[int, int, int]) -> dict[str, int]:
    """The integer arguments of a launch on NCHW samples of ``plane`` (C, H, W) with a box."""
    c, h, w = plane
    values = {"sample_size": c * h * w, "rows": h, "row_len": w, "col_scale": 1}
    if hasattr(mix, "divider"):
        values.update(rows_div=mix.divider(h), row_len_div=mix.divider(w))
    return values


def compile_kernel(name: str, dtype: str, arch: int, plane: tuple[int, int, int] | None = None):
    import triton
    from metamixer_fast.kernels import mix
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(mix, name)
    constexprs = {"HAS_BOX": True, "IS_UINT8": dtype == "uint8", "SOFT_BF16": False,
                  "NEED_DW": True, "BLOCK": mix.BLOCK}
    values = _launch_values(mix, plane) if plane else {}
    constexprs.update({arg: 1 for arg, v in values.items() if v == 1})
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature = {arg: "constexpr" if arg in constexprs else
                 "*" + DTYPES[dtype] if arg in DATA else ARG_TYPES.get(arg, "i32")
                 for arg in fn.arg_names}
    aligned = [i for i, arg in enumerate(fn.arg_names) if plane and signature[arg] != "constexpr"
               and (signature[arg].startswith("*") or values.get(arg, 1) % 16 == 0)]
    src = ASTSource(fn, signature, constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=mix.LAUNCH_OPTIONS)


def sass_instructions(compiled) -> int:
    from metamixer_fast.kernels.aot import cuobjdump_text

    return len(INSTRUCTION.findall(cuobjdump_text(compiled, "--dump-sass")))


def run(arch: int) -> dict:
    import triton
    from metamixer_fast.kernels.aot import resource_usage

    rows = []
    for shape, plane in SHAPES.items():
        for name in KERNELS:
            for dtype in DTYPES:
                if name == "_mix_bwd_kernel" and dtype == "uint8":
                    continue  # uint8 is not differentiable
                compiled = compile_kernel(name, dtype, arch, plane)
                rows.append({"shape": shape, "kernel": name, "dtype": dtype,
                             "sass": sass_instructions(compiled), **resource_usage(compiled)})
                print(f"{shape} {name} {dtype}: {rows[-1]['sass']} instructions", file=sys.stderr)
    return {"commit": commit(), "arch": arch, "triton": triton.__version__, "rows": rows}


def markdown(result: dict, before: dict | None = None) -> str:
    def key(r: dict) -> tuple[str, str, str]:
        return r.get("shape", "any shape"), r["kernel"], r["dtype"]

    old = {key(r): r for r in before["rows"]} if before else {}
    head = f"sm_{result['arch']}, triton {result['triton']}, commit {result['commit']}"
    if before:
        head += f" (before: commit {before['commit']}, triton {before['triton']})"
    lines = [head, "", "| compiled for | kernel | dtype | SASS instructions | registers | spills |",
             "|---|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        was = old.get(key(r))
        count = f"{was['sass']} -> {r['sass']}" if was else str(r["sass"])
        regs = f"{was['regs']} -> {r['regs']}" if was else str(r["regs"])
        lines.append(f"| {key(r)[0]} | {r['kernel']} | {r['dtype']} | {count} | {regs} | "
                     f"{r['spills']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    parser.add_argument("--render", type=Path, metavar="JSON", help="print a stored JSON's table")
    parser.add_argument("--before", type=Path, metavar="JSON", help="with --render: an older run")
    args = parser.parse_args()
    if args.render:
        before = json.loads(args.before.read_text()) if args.before else None
        print(markdown(json.loads(args.render.read_text()), before))
        return
    os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels (triton is imported after this)
    result = run(args.arch)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
