# Two entry points for a fresh machine (Python 3.11; nothing else installed by hand):
#   make demo   installs everything into .venv and runs the main job
#   make test   installs everything into .venv and runs lint, the Python tests and the C++ tests
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.metamixer-installed
CMAKE_BUILD := build/cmake
# pytest worker processes for `make test-python` (pytest-xdist); 0 runs the tests in this process
PYTEST_WORKERS ?= 2

.PHONY: install fashion-mnist demo quickstart test test-python test-cpp test-sanitize lint bench bench-check gpu-check clean

$(STAMP): pyproject.toml setup.py requirements-dev.txt $(wildcard csrc/*.cpp csrc/*/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

install: $(STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian's dataset-fashion-mnist package, installed when its files are missing and apt-get is
# available (--reinstall: also when the package is installed but its files were deleted): the
# main job's data, and that of tests/test_real_data.py (which CI runs with it).
fashion-mnist:
	@if [ ! -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --reinstall dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is not in $(FASHION_MNIST): install Debian's dataset-fashion-mnist, or"; \
	    echo "download the four IDX .gz files and run: $(PY) -m metamixer_fast.train --config configs/demo-fashion-mnist.toml --data-dir DIR"; \
	    exit 1; \
	  fi; \
	fi

# The main job: MetaMixer with 2 peers on Fashion-MNIST.
demo: install fashion-mnist
	rm -rf runs/demo-fashion-mnist
	$(PY) -m metamixer_fast.train --config configs/demo-fashion-mnist.toml
	$(PY) -m metamixer_fast.plot runs/demo-fashion-mnist

quickstart: install
	$(PY) examples/quickstart.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

test-python: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS)

test-cpp:
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build $(CMAKE_BUILD) -j 2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# The torch-free cores and their C++ tests again, under AddressSanitizer + UBSan.
test-sanitize:
	cmake -S . -B build/sanitize -DMETAMIXER_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug > /dev/null
	cmake --build build/sanitize -j 2
	ctest --test-dir build/sanitize --output-on-failure

test: lint test-python bench-check test-cpp test-sanitize

bench: install
	$(PY) -m pytest -q bench

# Every benchmark row run once as a test, untimed: the rows' own checks (each contender gives
# the same result) run in CI without the minutes of timing.
bench-check: install
	$(PY) -m pytest -q bench --benchmark-disable

# On a machine with a CUDA GPU (torch and triton installed; not part of `make test`): the Triton
# test matrix compiled for the GPU, the CUDA tests, and the GPU benchmark (tests/gpu_check.sh).
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) bash tests/gpu_check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info metamixer_fast/_C*.so
