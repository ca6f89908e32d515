#!/usr/bin/env bash
# The GPU check (`make gpu-check`), for a machine with a CUDA GPU, torch and triton:
#   1. every test parametrized over the triton backend, with the kernels compiled for the GPU
#      (METAMIXER_TEST_DEVICE=cuda, see tests/conftest.py), the Triton AOT tests, and
#      tests/test_cuda.py (the public API on CUDA tensors);
#   2. bench/bench_cuda.py (timings and bandwidth), its JSON written to $RESULTS.
# The GPU path needs no C++ extension, so when metamixer_fast is not installed the package is
# staged (pure Python, kernels/ mapped in as setup.py maps it) into a temporary directory and
# the tests run from there. PYTHON, PYTEST_ARGS, BENCH_ARGS and RESULTS override the defaults.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
RESULTS="${RESULTS:-$ROOT/bench/results/cuda.json}"

"$PYTHON" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu-check: needs torch with a CUDA device and triton" >&2; exit 1; }

if (cd /tmp && "$PYTHON" -c "import metamixer_fast.kernels" 2>/dev/null); then
  RUN_DIR="$ROOT"
else
  RUN_DIR="$(mktemp -d)"
  trap 'rm -rf "$RUN_DIR"' EXIT
  mkdir "$RUN_DIR/metamixer_fast"
  cp "$ROOT"/metamixer_fast/*.py "$RUN_DIR/metamixer_fast/"
  cp -r "$ROOT/kernels" "$RUN_DIR/metamixer_fast/kernels"
  cp -r "$ROOT/tests" "$ROOT/bench" "$ROOT/docs" "$ROOT/pyproject.toml" "$ROOT/README.md" "$RUN_DIR/"
  export PYTHONPATH="$RUN_DIR${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu-check: metamixer_fast is not installed; staged the pure-Python package in $RUN_DIR"
fi
cd "$RUN_DIR"
# the benchmark records the commit of the checkout, not of the staged copy
BENCH_COMMIT="$(git -C "$ROOT" describe --always --dirty --exclude '*' 2>/dev/null || echo unknown)"
export METAMIXER_BENCH_COMMIT="${METAMIXER_BENCH_COMMIT:-$BENCH_COMMIT}"
export METAMIXER_BACKEND= PYTHONUNBUFFERED=1
XDIST=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi

status=0
METAMIXER_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
  -k "triton or cuda" tests ${PYTEST_ARGS:-} || status=$?
"$PYTHON" bench/bench_cuda.py --out "$RESULTS" ${BENCH_ARGS:-} || status=$?
exit $status
