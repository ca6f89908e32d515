"""Shared fixtures: backend parametrization and fresh (unseeded) random inputs.

``METAMIXER_TEST_DEVICE=cuda`` runs the Triton kernels compiled for the GPU instead of
interpreted: every test parametrized over the ``triton`` backend then hands its CPU inputs to
the kernel on the GPU (same strides, same storage offsets) and gets the results back on the
CPU, so the whole CPU test matrix checks the real GPU code (see ``_run_triton_on_cuda``).
``tests/test_cuda.py`` runs the public API on CUDA tensors themselves.
"""

from __future__ import annotations

import os

ON_CUDA = os.environ.get("METAMIXER_TEST_DEVICE", "cpu") == "cuda"
# Triton kernels run on CPU tensors under the interpreter, which must be chosen before triton
# is imported; with it set, the triton backend joins the parametrization below.
if ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_map  # noqa: E402

from metamixer_fast import _backend  # noqa: E402


def _on_cuda(t: object) -> object:
    """A CPU tensor copied to the GPU with its layout: the whole storage moves, and the copy is
    the same view of it (strides, storage offset), so crops and transposes stay what they were."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        return t
    whole = t.untyped_storage().nbytes() // t.element_size()
    storage = torch.as_strided(t.detach(), (whole,), (1,), 0).cuda()
    return storage.as_strided(t.shape, t.stride(), t.storage_offset())


def _on_cpu(t: object) -> object:
    return t.cpu() if isinstance(t, torch.Tensor) else t


def _run_triton_on_cuda() -> None:
    """Register each Triton kernel wrapped so that CPU arguments run on the GPU, and let the
    triton backend take CPU tensors (the dispatch on the ops' side is unchanged)."""
    if not torch.cuda.is_available():
        raise pytest.UsageError("METAMIXER_TEST_DEVICE=cuda but torch sees no CUDA device")
    for (op, backend), kernel in list(_backend._kernels.items()):
        if backend == "triton":
            # not functools.wraps: without checks_values the op body checks values on the CPU
            # first, so a bad-input test never reaches a GPU assert (which would end the
            # process's CUDA work)
            def on_gpu(*args, _kernel=kernel, **kwargs):
                tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
                if not any(t.device.type == "cpu" for t in tensors):
                    return _kernel(*args, **kwargs)  # CUDA tensors (tests/test_cuda.py)
                args, kwargs = tree_map(_on_cuda, (args, kwargs))
                return tree_map(_on_cpu, _kernel(*args, **kwargs))
            _backend.register_kernel(op, backend, on_gpu)
    usable = _backend._usable
    _backend._usable = lambda backend, device: (None if backend == "triton" else
                                                usable(backend, device))


if ON_CUDA:
    _run_triton_on_cuda()


def cpu_backends(op: str) -> list[str]:
    """Backends that can run ``op`` on CPU tensors in this process (the reference always;
    C++ once built and registered; Triton under TRITON_INTERPRET=1).

    Under the ``reference`` parameter a kernel test compares the reference with itself, so its
    numbers cannot fail there: that parameter checks the route a package without the C++
    extension takes (op registration, autograd glue, output layout and dtype, list or stacked
    logits). The reference's own maths is checked against independent plain loops
    (tests/naive.py) in test_reference.py, and a hand-written DML loss in test_loss.py."""
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
