"""Build of metamixer_fast and its C++ extension metamixer_fast._C.

Install with ``pip install --no-build-isolation -e .`` (or without -e), torch already
installed: an isolated build environment would download another torch. The extension is built
with torch.utils.cpp_extension and ninja. If it cannot be built, the install warns and goes on
without it (the ops then run on the reference path); METAMIXER_REQUIRE_CPP=1 makes a failed
build fatal. No -march flags: the binary must run on any x86-64.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
REQUIRE_CPP = os.environ.get("METAMIXER_REQUIRE_CPP", "0") == "1"
# at::parallel_for is an OpenMP loop compiled into the extension: without -fopenmp it runs on
# one thread. (Linux/GCC, as torch's own CPU build; other platforms keep the serial loop.)
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


def _warn(message: str) -> None:
    print(f"\nmetamixer_fast: WARNING: {message}\n", file=sys.stderr)


def cpp_build_setup() -> dict:
    """ext_modules/cmdclass for the C++ extension, or {} (with a warning) if torch is absent."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths
    except ImportError as exc:
        if REQUIRE_CPP:
            raise RuntimeError("METAMIXER_REQUIRE_CPP=1 but torch is not importable; install "
                               "torch first and build with --no-build-isolation") from exc
        _warn(f"torch is not importable ({exc}); building without the C++ extension")
        return {}

    class OptionalBuildExtension(BuildExtension):
        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # any compiler/linker failure
                if REQUIRE_CPP:
                    raise
                self._remove_stale_extensions()
                _warn(f"building metamixer_fast._C failed ({exc}); the package will use the "
                      f"pure-PyTorch reference. Set METAMIXER_REQUIRE_CPP=1 to make this fatal.")

        def _remove_stale_extensions(self) -> None:
            # The last good build stays in the source tree (editable installs) and in build/lib
            # (which a wheel is packed from); left there, it would be imported as if this
            # (failed) build had produced it.
            for ext in self.extensions:
                for stale in {os.path.join(ROOT, self.get_ext_filename(ext.name)),
                              os.path.abspath(self.get_ext_fullpath(ext.name))}:
                    if os.path.exists(stale):
                        os.remove(stale)
                        _warn(f"removed {os.path.relpath(stale, ROOT)}, built from older sources")

    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    extension = CppExtension(
        "metamixer_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # torch's headers as system headers: -Wall -Wextra then reports our code only.
        extra_compile_args=["-O3", "-Wall", "-Wextra", "-fno-math-errno"] + OPENMP
        + [flag for path in include_paths() for flag in ("-isystem", path)],
        extra_link_args=OPENMP,
    )
    return {"ext_modules": [extension],
            "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(
    packages=["metamixer_fast", "metamixer_fast.kernels"],
    package_dir={"metamixer_fast": "metamixer_fast", "metamixer_fast.kernels": "kernels"},
    package_data={"metamixer_fast": ["py.typed"]},  # PEP 561: type checkers read our annotations
    **cpp_build_setup(),
)
