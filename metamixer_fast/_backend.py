"""Backend choice per op and device (DESIGN.md section 3).

CPU -> the C++ kernel if ``metamixer_fast._C`` was built and implements the op, else the
reference; CUDA -> the Triton kernel. ``METAMIXER_BACKEND=reference|cpp|triton`` forces one
(read at every call, so it can be changed at run time); with ``TRITON_INTERPRET=1`` the Triton
kernels run on CPU tensors.

Kernels announce themselves with ``register_kernel(op, backend, fn)``; the reference is
always registered, so an op works before (or without) any compiled kernel.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import forward_ad as _forward_ad

BACKENDS = ("reference", "cpp", "triton")
ENV_VAR = "METAMIXER_BACKEND"

_kernels: dict[tuple[str, str], Callable] = {}
# op -> its eager entry point (see register_eager), looked up on every eager call.
eager_entries: dict[str, Callable] = {}
# (op, device type) -> the automatic choice. It depends only on what is registered and built,
# so it is worked out once (a registration clears it); the forced choice is read every call.
_automatic: dict[tuple[str, str], str] = {}


def register_kernel(op: str, backend: str, fn: Callable) -> None:
    """Make ``fn`` the implementation of ``op`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _kernels[(op, backend)] = fn
    _automatic.clear()


@functools.cache
def cpp_module():
    """The compiled extension, or None when the C++ build failed or was skipped."""
    try:
        return importlib.import_module("metamixer_fast._C")
    except ImportError as exc:
        global cpp_missing_reason
        cpp_missing_reason = str(exc)
        return None


# Why ``cpp_module()`` found no extension (set when it looked and failed).
cpp_missing_reason: str | None = None


def source_checkout() -> Path | None:
    """The source tree this package was imported from, if it is one (a setup.py beside it) and
    holds no built extension: an installed copy is then shadowed, e.g. by ``python -m`` run from
    the checkout, which puts the current directory first on sys.path."""
    root = Path(__file__).resolve().parents[1]
    if (root / "setup.py").is_file() and not any(Path(__file__).parent.glob("_C*.so")):
        return root
    return None


@functools.cache
def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if not forced:
        return None
    if forced not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={forced!r} is not a backend; use one of {', '.join(BACKENDS)} "
                         f"or unset it for the automatic choice")
    return forced


def _preferred(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "reference")
    if device.type == "cpu":
        return ("cpp", "reference")
    return ("reference",)


def _usable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device`` here, else the reason it cannot."""
    if backend == "cpp":
        if cpp_module() is None:
            return "the C++ extension metamixer_fast._C is not built (reinstall, see README)"
        if device.type != "cpu":
            return f"the C++ kernels run on CPU tensors only, got {device.type}"
    if backend == "triton":
        if triton_version() is None:
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and not triton_interpreted():
            return "Triton on CPU tensors needs TRITON_INTERPRET=1 set before import"
    return None


def backend_for(op: str, device: torch.device) -> str:
    """The backend that ``op`` will use for tensors on ``device``."""
    forced = forced_backend()
    if forced is not None:
        why = _usable(forced, device)
        if why is None and (op, forced) not in _kernels:
            why = f"no {forced} kernel is registered for {op}"
        if why is not None:
            raise RuntimeError(f"{ENV_VAR}={forced} cannot run metamixer::{op}: {why}")
        return forced
    choice = _automatic.get((op, device.type))
    if choice is None:
        choice = next((b for b in _preferred(device)
                       if (op, b) in _kernels and _usable(b, device) is None), "reference")
        _automatic[(op, device.type)] = choice
    return choice


def kernel(op: str, device: torch.device) -> Callable:
    return _kernels[(op, backend_for(op, device))]


def register_eager(op: str, fn: Callable) -> None:
    """An eager entry point for ``op``, tried before the custom op outside ``torch.compile``
    tracing: called with the op's arguments, it returns the op's result, doing its own autograd
    (e.g. a C++ autograd node), or None when the call is not one it takes (another backend
    forced or needed, a dispatch or torch-function mode, a tensor subclass, a torch.func
    transform, torch.jit.trace, an open forward-AD level); then the custom op runs. It must
    decide that cheaply: it runs on every call."""
    eager_entries[op] = fn


# Bound once: the eager path runs on every call, and dynamo folds this function when tracing.
_is_compiling = torch.compiler.is_compiling
# torch.jit.trace records the ops that pass the dispatcher's Tracer key: a C++ entry, which
# writes its outputs through raw pointers, would leave the traced graph an aten::empty (replayed
# as uninitialised memory), and a direct route the kernel's inner ops, not metamixer::*.
_is_jit_tracing = torch._C._is_tracing
# ``_forward_ad._current_level >= 0`` (one attribute read, no call, so inlined where tested):
# inside ``torch.autograd.forward_ad.dual_level``, also entered by torch.func.jvp and jacfwd, a
# tensor may carry a tangent, which only the op's forward-AD refusal (refuse_forward_ad) sees;
# the C++ entries and the op bodies would silently drop it.


def eager_call(op: str, args: tuple, explain: Callable[..., object]) -> object | None:
    """``op``'s eager entry (register_eager) run on ``args`` outside torch.compile tracing:
    its result, or None when there is no entry or it declines the call. The entry checks what
    it relies on, tersely; when it raises, ``explain(*args)`` runs first (the Python checks,
    which name the argument and the fix), off the hot path."""
    eager = eager_entries.get(op)
    # the last two: a jit trace and an open forward-AD level must see the op (see _tracing)
    if (eager is None or _is_compiling() or _in_transform() or _is_jit_tracing()
            or _forward_ad._current_level >= 0):
        return None
    try:
        return eager(*args)
    except (RuntimeError, TypeError, ValueError):
        explain(*args)
        raise


def _in_transform() -> bool:
    """True inside a torch.func transform (grad, vjp, vmap, ...). Its inputs are wrapped, but a
    tensor captured from outside is not: a call on captured tensors alone looks plain, yet the
    transform's dispatch layer is active, so the ATen calls of a C++ entry would make wrapped
    tensors it cannot read ("Cannot access data pointer of Tensor that doesn't have storage")."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _tracing() -> bool:
    """True while something must see every custom op call: torch.compile tracing, a dispatch
    or function mode (make_fx, FakeTensorMode, user modes), a torch.func transform,
    torch.jit.trace (it records the op, not what its body does through raw pointers), or an
    open forward-AD level (the op refuses a tangent, which the body would silently drop)."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled() or _in_transform()
            or _is_jit_tracing() or _forward_ad._current_level >= 0)


def _plain(x: torch.Tensor) -> bool:
    """A plain tensor: not a subclass (FakeTensor, ...) nor wrapped by a torch.func transform."""
    return type(x) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(x)


def runs_direct(*tensors: torch.Tensor | None) -> bool:
    """True when an eager call of a custom op on ``tensors`` may skip the op: nothing is tracing
    and every input is a plain tensor. Such a call runs the op's body, and, when it needs a
    gradient, links a ``torch.autograd.Function`` that runs the backward kernel.

    The custom op's Python dispatch (autograd wrapper, redispatch, aliasing check) and its
    autograd glue cost tens of microseconds a call (44 % of a mixed_kd_loss forward + backward
    at K=2, B=128, C=100 through the op on CPU, bench/bench_call_routes.py), and several
    times that right after a kernel has streamed a large batch through the caches; for such a
    call they do nothing the body and the backward rule do not. Anything that must see every op call
    (torch.compile, make_fx, FakeTensorMode, user modes, torch.func) gets the op.
    """
    return not _tracing() and all(t is None or _plain(t) for t in tensors)


def runs_without_dispatcher(*tensors: torch.Tensor | None) -> bool:
    """``runs_direct`` for a call that needs no gradient: no input requires one (or grad mode
    is off), so the op's body alone is the whole call. A backward rule uses it to call its
    backward kernel directly: with ``create_graph=True`` the saved inputs require a gradient,
    so the call goes through the op, whose missing double-backward formula then says so."""
    grad = torch.is_grad_enabled()
    return runs_direct(*tensors) and not any(t is not None and grad and t.requires_grad
                                             for t in tensors)


def direct_function(name: str, forward: Callable, setup_context: Callable,
                    backward: Callable) -> type[torch.autograd.Function]:
    """The autograd.Function of a ``runs_direct`` call that needs a gradient: ``forward`` (the
    op's body), then ``setup_context(ctx, inputs, output)`` and ``backward`` (the op's rules).

    It takes ``ctx`` in its forward rather than defining ``setup_context``: with one defined,
    every ``apply`` binds its arguments through ``inspect.signature`` (for torch.func), a
    measurable share of a small call (bench/bench_call_routes.py, the README's A/B), and these
    Functions never run under a transform (``_tracing``)."""

    def forward_with_ctx(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "__module__": forward.__module__, "__qualname__": name,
        "__doc__": f"{name}: see metamixer_fast._backend.direct_function.",
        "forward": staticmethod(forward_with_ctx), "backward": staticmethod(backward)})


def body_or_op(body: Callable, op: Callable, *tensors: torch.Tensor | None) -> Callable:
    """What a backward rule calls for a backward (or forward) op on ``tensors``: the op's body
    where ``runs_without_dispatcher`` allows it, else the op itself."""
    return body if runs_without_dispatcher(*tensors) else op


# ------------------------------------------------------------------------ forward-mode AD

# torch.library has no forward-mode formula for a custom op (no register_jvp): without one, an
# op call whose inputs carry tangents runs its body below autograd and returns outputs without
# tangents, so torch.func.jvp / jacfwd and torch.autograd.forward_ad would report a zero
# derivative. refuse_forward_ad makes such a call raise instead, as the README promises for
# every transform that would otherwise miss a term.
_refusals = torch.library.Library("metamixer", "IMPL")
_after_ad_inplace_or_view = torch._C._after_ADInplaceOrView_keyset
# Added to a keyset below autograd, it makes the Autograd kernel of _unpack_dual the one that
# runs (AutogradCPU, AutogradCUDA, ... by the tensor's backend).
_autograd = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
_unpack_dual = torch.ops.aten._unpack_dual.default


def forward_ad_refusal(op: str) -> str:
    """The message of a forward-AD refusal; "forward-mode AD is not supported" is also in the
    C++ loss entry's refusal (csrc/mixed_kd_loss.cpp)."""
    return (f"{op}: forward-mode AD is not supported (a tangent reached metamixer::{op} through "
            f"torch.func.jvp, jacfwd or torch.autograd.forward_ad); use reverse mode: backward() "
            f"or torch.autograd.grad")


def _carries_tangent(keyset: torch._C.DispatchKeySet, args: tuple) -> bool:
    """Whether a floating tensor among ``args`` (or in a list among them) has a tangent at the
    open forward-AD level. The ADInplaceOrView kernel runs below autograd, where a plain
    ``forward_ad.unpack_dual`` would reach functorch's layer first, which unwraps a jvp
    transform's tensor and loses its tangent; redispatching to _unpack_dual's Autograd kernel
    reads the tangent of the tensor as given. Forward grad mode is switched on for the read:
    the op's autograd.Function (inputs that also require grad) runs its forward with it off,
    which hides every tangent, and would then fail with torch's generic "You must implement
    the jvp function" instead of this refusal."""
    level = _forward_ad._current_level
    fw_grad_mode = torch._C._is_fwd_grad_enabled()
    torch._C._set_fwd_grad_enabled(True)
    try:
        for arg in args:
            for t in arg if isinstance(arg, (list, tuple)) else (arg,):
                if (isinstance(t, torch.Tensor) and t.is_floating_point()
                        and _unpack_dual.redispatch(keyset | _autograd, t, level)[1] is not None):
                    return True
        return False
    finally:
        torch._C._set_fwd_grad_enabled(fw_grad_mode)


def refuse_forward_ad(name: str) -> None:
    """Make ``metamixer::<name>`` raise when an input carries a forward-AD tangent.

    A kernel at the ADInplaceOrView key (torch.library registers none for a functional op):
    every call through the dispatcher reaches it, after the op's Autograd kernel, with the
    inputs as the caller gave them (a torch.func jvp transform's wrapped tensors included;
    functorch unwraps them only further down). Without an open forward-AD level it costs one
    attribute read and a redispatch, on the op route only: the eager C++ entries and the direct
    routes never enter the dispatcher for the op, and ``eager_call`` / ``_tracing`` send every
    call made under an open level here."""
    op = getattr(torch.ops.metamixer, name).default
    message = forward_ad_refusal(name)

    def refuse_tangents(keyset: torch._C.DispatchKeySet, *args: object, **kwargs: object) -> object:
        if _forward_ad._current_level >= 0 and _carries_tangent(keyset, args):
            raise RuntimeError(message)
        return op.redispatch(keyset & _after_ad_inplace_or_view, *args, **kwargs)

    _refusals.impl(name, refuse_tangents, "ADInplaceOrView", with_keyset=True)
