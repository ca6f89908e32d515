"""The Triton mix and mix2 kernels compile ahead of time for sm_80 and sm_90 (no GPU needed) with no
register spills and no fused multiply-adds (the blend must round like the eager reference).

The compile runs in a subprocess with TRITON_INTERPRET=0: under the interpreter (set for this
test session by conftest.py) ``triton.jit`` yields interpreted functions, which cannot be
compiled. Spills are read from ``ptxas -v`` run on the generated PTX (``n_spills`` of a
compiled kernel is only filled in when it is loaded onto a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from metamixer_fast.kernels import mix as m

arch = int(sys.argv[1])
PTR = {"uint8": "*u8", "float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32",
       "float64": "*fp64"}
results = []
for dtype, ptr in PTR.items():
    wty = "*fp64" if dtype == "float64" else "*fp32"
    common = {"sample_size": "i32", "rows": "i32", "row_len": "i32", "col_scale": "i32",
              "rows_div": "i64", "row_len_div": "i64", "HAS_BOX": "constexpr"}
    variants = [("_mix_fwd_kernel", {"x_ptr": ptr, "out_ptr": ptr, "src_ptr": "*i64", "w_ptr": wty,
                 "box_ptr": "*i64", "ok_ptr": "*i32", **common, "IS_UINT8": "constexpr",
                 "SOFT_BF16": "constexpr", "BLOCK": "constexpr"},
                 {"IS_UINT8": dtype == "uint8", "SOFT_BF16": False, "BLOCK": m.BLOCK, "HAS_BOX": True})]
    variants.append(("_mix2_fwd_kernel", {"x_ptr": ptr, "out_ptr": ptr, "src_ptr": "*i64",
                     "w_ptr": wty, "box_ptr": "*i64", "src2_ptr": "*i64", "w2_ptr": wty,
                     "ok_ptr": "*i32", **common,
                     "IS_UINT8": "constexpr", "SOFT_BF16": "constexpr", "BLOCK": "constexpr"},
                     {"IS_UINT8": dtype == "uint8", "SOFT_BF16": False, "BLOCK": m.BLOCK,
                      "HAS_BOX": True}))
    for need_dw in ([True, False] if dtype != "uint8" else []):
        variants.append(("_mix_bwd_kernel", {"g_ptr": ptr, "x_ptr": ptr, "src_ptr": "*i64",
                         "w_ptr": wty, "box_ptr": "*i64", "inv_offsets_ptr": "*i64",
                         "inv_list_ptr": "*i64", "dx_ptr": ptr, "dw_part_ptr": wty, **common,
                         "SOFT_BF16": "constexpr", "NEED_DW": "constexpr", "BLOCK": "constexpr"},
                         {"SOFT_BF16": False, "NEED_DW": need_dw, "BLOCK": m.BLOCK,
                          "HAS_BOX": True}))
    if dtype == "float32":  # the same kernel with contraction allowed: the FMA count can fail
        variants.append(("_mix_fwd_kernel", *variants[0][1:], {"enable_fp_fusion": True}))
    for name, sig, consts, *override in variants:
        options = {**m.LAUNCH_OPTIONS, **(override[0] if override else {})}
        name_out = (name + ("" if consts.get("NEED_DW", True) else "_dx_only")
                    + ("_fused" if override else ""))
        src = ASTSource(getattr(m, name), sig, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = k.asm["ptx"]
        with tempfile.TemporaryDirectory() as d:
            path = d + "/k.ptx"
            open(path, "w").write(ptx)
            log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a" if arch == 90
                                  else f"--gpu-name=sm_{arch}", path, "-o", d + "/k.o"],
                                 capture_output=True, text=True, check=True).stderr
        spills = [int(a) + int(b) for a, b in
                  re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
        results.append({"kernel": name_out, "dtype": dtype, "n_spills": sum(spills),
                        "ptxas_reports": len(spills),
                        "fma": len(re.findall(r"\bfma\.", ptx)),
                        "loads": len(re.findall(r"\bld\.global", ptx)), "log": log})
print(json.dumps(results))
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_mix_compiles_without_spills(arch):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(arch)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    # mix and mix2 fwd for 5 dtypes, bwd with and without dw for the 4 float dtypes, and fp32
    # mix fwd compiled with contraction allowed
    assert len(results) == 19
    fused = [r for r in results if r["kernel"].endswith("_fused")]
    assert len(fused) == 1 and fused[0]["fma"] > 0, "with contraction allowed the blend is FMAs"
    results = [r for r in results if r not in fused]
    loads = {(r["kernel"], r["dtype"]): r["loads"] for r in results}
    for dtype in ("float16", "bfloat16", "float32", "float64"):  # dx only: x is never read
        assert loads[("_mix_bwd_kernel_dx_only", dtype)] < loads[("_mix_bwd_kernel", dtype)]
    for r in results:
        assert r["ptxas_reports"] > 0, ("ptxas -v printed no spill line", r["log"])
        assert r["n_spills"] == 0, r
        assert r["fma"] == 0, (r["kernel"], r["dtype"], "the blend must not be contracted into an FMA")


def test_sass_report_compiles_every_mix_kernel(tmp_path):
    """bench/triton_mix_sass.py, which gives docs/gpu.md's static instruction counts: every mix
    kernel and dtype compiles with no spills, and the table renders against an older run."""
    out = tmp_path / "sass.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "triton_mix_sass.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 33  # fwd and mix2 for 4 dtypes, the backward for 3; 3 specializations
    assert all(r["sass"] > 100 and r["regs"] > 0 and r["spills"] == 0 for r in rows), rows
    table = subprocess.run([sys.executable, str(script), "--render", str(out), "--before", str(out)],
                           capture_output=True, text=True, check=True).stdout
    first = rows[0]
    assert (f"| {first['shape']} | {first['kernel']} | {first['dtype']} | {first['sass']} -> "
            f"{first['sass']} |") in table
    hinted = {(r["kernel"], r["dtype"]): r["sass"] for r in rows if r["shape"] == "3x224x224 NCHW"}
    generic = {(r["kernel"], r["dtype"]): r["sass"] for r in rows if r["shape"] == "any shape"}
    assert hinted != generic  # the hints reach the compiler
