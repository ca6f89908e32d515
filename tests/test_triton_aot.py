"""Ahead-of-time compilation of the Triton mixed_kd_loss kernels for real GPU targets.

``triton.compile`` with a ``GPUTarget`` runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin, with the ptxas that ships with triton) without a GPU. ``CompiledKernel.n_spills`` is only
filled in when the binary is loaded on a device, so the registers and the local memory
(stack frame, where spills go) are read from the cubin itself with ``cuobjdump -res-usage`` (also shipped with
triton). The kernels are compiled in a child process: this test session runs Triton in
interpreter mode (TRITON_INTERPRET=1), in which kernels cannot be compiled. The table is what
``python -m metamixer_fast.kernels.aot --report`` prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
from metamixer_fast.kernels import aot
from metamixer_fast.kernels import mixed_kd_loss as tk

CASES = list(aot.aot_cases(ks=(4, 8)))


def _compiled_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, stated to silence its warning
    return env


def _python(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], env=_compiled_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def results() -> dict[tuple, dict]:
    rows = json.loads(_python("-m", "metamixer_fast.kernels.aot", "--json"))
    print(aot.aot_report(rows))
    return {(r["kernel"], r["K"], r["C"], r["mode"], r["detach"], r["arch"]): r for r in rows}


@pytest.mark.parametrize("arch", aot.AOT_ARCHS)
@pytest.mark.parametrize("kind,k,c,mode,detach", CASES)
def test_compiles_without_spills(results, kind, k, c, mode, detach, arch):
    r = results[(kind, k, c, mode, detach, arch)]
    _, block_c, rows, warps = tk.launch_config(k, c, mode == "ensemble", kind == "bwd")
    assert (r["BLOCK_C"], r["ROWS"], r["num_warps"]) == (block_c, rows, warps)
    assert r["compiled_num_warps"] == warps
    assert r["spills"] == 0, r
    assert 0 < r["regs"] <= 255, r


def test_spill_check_can_fail():
    """Squeezing the K = 8 ensemble forward into one warp of 64 registers shows up as spills,
    so the zero above is a measurement, not a constant."""
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from metamixer_fast.kernels import aot
        from metamixer_fast.kernels import mixed_kd_loss as tk
        fn = tk._mixed_kd_loss_fwd_kernel
        const = {"K": 8, "K_PAD": 8, "BLOCK_C": 128, "ROWS": 1, "ENSEMBLE": True,
                 "HAS_EPS": True, "ACC": tk.tl.float32, "stride_c": 1, "M": 1}
        sig = {n: "constexpr" if n in const else "*fp32" if n.endswith("_ptr")
               else "fp32" if n.endswith(("_hi", "_lo")) else "i32" for n in fn.arg_names}
        sig["lab_ptr"] = "*i64"
        sig["ok_ptr"] = "*i32"
        compiled = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 80, 32),
                                  options={"num_warps": 1, "maxnreg": 64})
        print(aot.resource_usage(compiled)["spills"])
    """)
    assert int(_python("-c", script).strip()) > 0


def test_cuobjdump_is_found_when_ptxas_lives_elsewhere(tmp_path):
    """torch._inductor points TRITON_PTXAS_PATH at torch's own ptxas, with no cuobjdump beside
    it; the resource report must still find one (seen on a GPU machine, where every AOT test
    failed after a compile test had run in the same worker)."""
    from triton.backends.nvidia.compiler import get_ptxas

    lone = tmp_path / "ptxas"
    lone.symlink_to(get_ptxas(80).path)
    assert not (tmp_path / "cuobjdump").exists()
    assert aot._cuobjdump(lone).is_file()
