"""The package as installed: the C++ module, `info`, and `metamixer_fast.kernels` from both an
editable and a regular (wheel) install."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest
import torch

import metamixer_fast as mf
from metamixer_fast import _backend, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQUIRE_CPP = os.environ.get("METAMIXER_REQUIRE_CPP") == "1"
REQUIRE_TRITON = os.environ.get("METAMIXER_REQUIRE_TRITON") == "1"


def _python(code: str, cwd: pathlib.Path, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cpp_module_builds_and_registers_its_ops():
    if _backend.cpp_module() is None:
        assert not REQUIRE_CPP, "METAMIXER_REQUIRE_CPP=1 but metamixer_fast._C did not import"
        pytest.skip("C++ extension not built in this install (allowed without METAMIXER_REQUIRE_CPP=1)")
    info = torch.ops.metamixer_cpp.build_info()
    assert "compiler=" in info and f"torch={torch.__version__.split('+')[0]}" in info
    for op in ("mixed_kd_loss", "mix", "mix2"):  # the kernels the CPU backend dispatches to
        assert hasattr(torch.ops.metamixer_cpp, op), op
    z = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (5, 1))
    with torch.no_grad():
        ce, kd = mf.mixed_kd_loss(z, labels, torch.ones(5, 1), temperature=2.0)
    want_ce, want_kd = reference.mixed_kd_loss(z.double(), labels, torch.ones(5, 1), 2.0)
    torch.testing.assert_close(ce.double(), want_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd.double(), want_kd, rtol=1e-5, atol=1e-6)


def test_triton_kernels_join_the_cpu_test_matrix():
    """Without a usable triton the ``triton`` parameter drops out of every kernel test and the
    AOT tests skip; CI sets METAMIXER_REQUIRE_TRITON=1 so that cannot pass unnoticed."""
    from conftest import cpu_backends

    missing = [op for op in ("mixed_kd_loss", "mix", "mix2") if "triton" not in cpu_backends(op)]
    if missing:
        why = _backend._usable("triton", torch.device("cpu"))
        assert not REQUIRE_TRITON, (f"METAMIXER_REQUIRE_TRITON=1 but the triton backend does not "
                                    f"run {missing} on CPU tensors: {why}")
        pytest.skip(f"triton backend unusable here ({why}); METAMIXER_REQUIRE_TRITON=1 fails")


def test_info_reports_build_and_backends(tmp_path):
    out = _python("import metamixer_fast.info as i; i.main()", tmp_path, METAMIXER_STREAM_STORES="")
    assert "torch" in out and "mixed_kd_loss" in out and "cpu" in out
    assert "METAMIXER_STREAM_STORES  (unset): mix2 (C++) times both store modes" in out
    if REQUIRE_CPP:
        assert "C++ extension  built" in out


@pytest.mark.parametrize("value, says", [("on", "streams its outputs"),
                                         ("off", "through the cache"),
                                         ("sometimes", "not one of auto, on, off")])
def test_info_reports_the_store_mode_setting(tmp_path, value, says):
    out = _python("import metamixer_fast.info as i; i.main()", tmp_path,
                  METAMIXER_STREAM_STORES=value)
    assert f"METAMIXER_STREAM_STORES  {value}: " in out and says in out


def test_kernels_package_from_editable_install(tmp_path):
    """Outside the source tree, metamixer_fast.kernels resolves to the repo's kernels/ dir."""
    out = _python("import metamixer_fast.kernels as k; print(k.__file__)", tmp_path)
    assert pathlib.Path(out.strip()).parent == ROOT / "kernels"


def test_regular_install_ships_kernels_and_extension(tmp_path):
    """Build a wheel (as `pip install .` does) and import from its unpacked contents only."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True,
                   env={**os.environ, "METAMIXER_REQUIRE_CPP": "1" if REQUIRE_CPP else "0"})
    (wheel,) = (tmp_path / "dist").glob("metamixer_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "metamixer_fast/kernels/__init__.py" in names
    assert "metamixer_fast/py.typed" in names  # PEP 561: a type checker reads the annotations
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import metamixer_fast, metamixer_fast.kernels as k; "
            "from metamixer_fast import _backend; "
            "print(k.__file__); print(_backend.cpp_module() is not None)")
    out = _python(code, tmp_path, PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    kernels_file, has_cpp = out.split()
    assert pathlib.Path(kernels_file).is_relative_to(site)
    if REQUIRE_CPP:
        assert has_cpp == "True"


def _source_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    """The package's sources as a checkout has them before any build: no _C, no kernels/ inside."""
    src = tmp_path / "checkout"
    (src / "metamixer_fast").mkdir(parents=True)
    for path in (ROOT / "metamixer_fast").glob("*.py"):
        (src / "metamixer_fast" / path.name).write_text(path.read_text())
    (src / "setup.py").write_text((ROOT / "setup.py").read_text())
    return src


# Import from ``src`` only: drop the editable install's finder, which would map the package back
# to this repository; optionally make triton unimportable.
_IMPORT_FROM = """
import builtins, sys, warnings
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]
sys.path.insert(0, {src!r})
if {no_triton}:
    real = builtins.__import__
    def no_triton(name, *args, **kwargs):
        if name == 'triton' or name.startswith('triton.'):
            raise ImportError('triton hidden by the test')
        return real(name, *args, **kwargs)
    builtins.__import__ = no_triton
warnings.simplefilter('always')
try:
    import metamixer_fast
    print('imported', metamixer_fast.__file__)
except ImportError as exc:
    print('ImportError:', exc)
"""


def test_a_checkout_without_the_extension_warns_on_import(tmp_path):
    src = _source_copy(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _IMPORT_FROM.format(src=str(src), no_triton=True)],
                          cwd=tmp_path, capture_output=True, text=True, check=True)
    assert f"imported {src}" in proc.stdout
    assert "RuntimeWarning: metamixer_fast: the C++ extension is not available" in proc.stderr
    assert f"This is the source checkout {src}" in proc.stderr
    assert "METAMIXER_BACKEND=reference" in proc.stderr
    quiet = subprocess.run([sys.executable, "-c", _IMPORT_FROM.format(src=str(src), no_triton=True)],
                           cwd=tmp_path, capture_output=True, text=True, check=True,
                           env={**os.environ, "METAMIXER_BACKEND": "reference"})
    assert "RuntimeWarning" not in quiet.stderr


def test_a_checkout_that_shadows_the_installed_package_says_so(tmp_path):
    if _backend.triton_version() is None:
        pytest.skip("triton is not installed: the kernels subpackage is not imported")
    src = _source_copy(tmp_path)
    out = subprocess.run([sys.executable, "-c", _IMPORT_FROM.format(src=str(src), no_triton=False)],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert f"ImportError: metamixer_fast was imported from the source checkout {src}" in out
