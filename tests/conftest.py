"""Shared fixtures: backend parametrization and fresh (unseeded) random inputs."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors under the interpreter, which must be chosen before triton
# is imported; with it set, the triton backend joins the parametrization below.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from metamixer_fast import _backend


def cpu_backends(op: str) -> list[str]:
    """Backends that can run ``op`` on CPU tensors in this process (the reference always;
    C++ once built and registered; Triton under TRITON_INTERPRET=1)."""
    names = []
    for name in _backend.BACKENDS:
        if _backend._usable(name, torch.device("cpu")) is None and (op, name) in _backend._kernels:
            names.append(name)
    return names


def _backend_fixture(op: str):
    @pytest.fixture(params=cpu_backends(op))
    def fixture(request, monkeypatch) -> str:
        monkeypatch.setenv(_backend.ENV_VAR, request.param)
        return request.param

    return fixture


loss_backend = _backend_fixture("mixed_kd_loss")
mix_backend = _backend_fixture("mix")


@pytest.fixture
def rng() -> torch.Generator:
    """A generator with a fresh seed each run (printed on failure) so inputs vary run to run."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)
