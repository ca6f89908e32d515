"""The forward hooks through which ``MixPlan.global_mixing`` blends inside the peers.

Stage "input" blends each peer's first positional input (a forward pre-hook on the peer); any
other stage is a submodule whose output is blended (a forward hook on it), with a pre-hook and a
hook on the peer that check the stage ran exactly once per forward of the peer.

Two guards keep a peer from being blended twice in one forward: a module shared by several
peers (a common trunk) gets one blend hook, whose call count every peer's forward re-arms; and
a peer, or a stage module, already inside an open ``global_mixing`` block (nested blocks, of
one plan or of two, at the same stage or at different ones) is refused.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["blend_hooks", "peer_list", "stage_targets"]

INPUT_STAGE = "input"

# Every peer, and every stage module carrying a blend hook, of an open ``global_mixing`` block.
_HOOKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def unwrap(peer: nn.Module) -> nn.Module:
    """The module whose submodule names the stages use: ``torch.compile`` wraps a peer in an
    ``OptimizedModule`` that prefixes every name with ``_orig_mod.``."""
    inner = getattr(peer, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else peer


def peer_list(peers: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """``peers`` as a list: one module, a sequence of modules, or an ``nn.ModuleList``."""
    if isinstance(peers, nn.Module) and not isinstance(peers, nn.ModuleList):
        return [peers]
    if not isinstance(peers, (nn.ModuleList, Sequence)) or isinstance(peers, str):
        raise TypeError(f"MixPlan.global_mixing: 'peers' must be a module or a sequence of the K "
                        f"peer modules, got {type(peers).__name__}")
    result = list(peers)
    if not result:
        raise ValueError("MixPlan.global_mixing: 'peers' is empty; pass the K peer modules")
    for k, peer in enumerate(result):
        if not isinstance(peer, nn.Module):
            raise TypeError(f"MixPlan.global_mixing: peers[{k}] must be an nn.Module, got "
                            f"{type(peer).__name__}")
    if len({id(p) for p in result}) != len(result):
        raise ValueError("MixPlan.global_mixing: the same module appears twice in 'peers'; its "
                         "activations would be blended twice")
    return result


def stage_targets(peers: list[nn.Module], stages: tuple[str, ...],
                  stage_modules: Sequence[Mapping[str, str]] | None) -> list[dict[str, str]]:
    """Per peer, stage name -> submodule name, after checking that every submodule exists."""
    if stage_modules is not None and (isinstance(stage_modules, (Mapping, str))
                                      or not isinstance(stage_modules, Sequence)
                                      or len(stage_modules) != len(peers)
                                      or not all(isinstance(m, Mapping) for m in stage_modules)):
        raise ValueError(f"MixPlan.global_mixing: 'stage_modules' must be a sequence of one dict "
                         f"per peer ({len(peers)} peers), got {stage_modules!r}")
    inner = [s for s in stages if s != INPUT_STAGE]
    result = []
    for k, peer in enumerate(peers):
        mapping = {s: s for s in inner} if stage_modules is None else dict(stage_modules[k])
        names = dict(unwrap(peer).named_modules(remove_duplicate=False))  # aliases too
        for stage in inner:
            if stage not in mapping:
                raise ValueError(f"MixPlan.global_mixing: stage_modules[{k}] has no entry for stage "
                                 f"{stage!r} (it maps {sorted(mapping)})")
            if mapping[stage] not in names:
                listed = ", ".join(repr(n) for n in names if n)
                raise ValueError(f"MixPlan.global_mixing: peer {k} ({type(peer).__name__}) has no "
                                 f"submodule {mapping[stage]!r} for stage {stage!r}; its submodules "
                                 f"are: {listed}")
        result.append(mapping)
    return result


@contextmanager
def blend_hooks(peers: list[nn.Module], stage: str, targets: list[dict[str, str]],
                input_hook: Callable[..., tuple[tuple, dict]],
                blend: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Hooks that blend at ``stage`` in every peer while the block runs; removed on exit."""
    peer_names = [f"peer {k} ({type(p).__name__})" for k, p in enumerate(peers)]
    if stage == INPUT_STAGE:
        modules, names = peers, peer_names
    else:
        names = [targets[k][stage] for k in range(len(peers))]
        modules = [unwrap(p).get_submodule(n) for p, n in zip(peers, names)]
    for module, name in {**dict(zip(peers, peer_names)), **dict(zip(modules, names))}.items():
        if module in _HOOKED:
            raise RuntimeError(f"MixPlan.global_mixing: {name!r} is already inside a "
                               f"global_mixing block that is still open; nested blocks would blend "
                               f"twice. Open one block around all the peers' forwards")
    handles: list[RemovableHandle] = []
    counts: dict[int, list[int]] = {}
    try:
        for k, (peer, module) in enumerate(zip(peers, modules)):
            if stage == INPUT_STAGE:
                handles.append(peer.register_forward_pre_hook(input_hook, with_kwargs=True))
            else:
                handles.extend(_stage_hooks(peer, k, module, names[k], counts, blend))
        _HOOKED.update([*peers, *modules])
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in [*peers, *modules]:
            _HOOKED.discard(module)


def _stage_hooks(peer: nn.Module, k: int, module: nn.Module, name: str,
                 counts: dict[int, list[int]], blend: Callable[[Tensor], Tensor]) -> list[RemovableHandle]:
    """Blend the output of ``module`` once per forward of ``peer``.

    A forward pre-hook on the peer arms the stage; the stage's forward hook blends and counts;
    a forward hook on the peer checks that the stage ran exactly once (a stage module that is
    skipped, or called twice in one forward, would make the target wrong, so both raise). A
    module shared by several peers gets one blend hook and one count, armed by each peer.
    """
    calls = counts.get(id(module))
    handles = []
    if calls is None:
        calls = counts[id(module)] = [0]

        def blend_output(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
            calls[0] += 1
            if calls[0] > 1:
                raise RuntimeError(f"MixPlan: stage module {name!r} ran twice in one forward of a "
                                   f"peer; pick a stage module that runs once per forward")
            if not isinstance(output, Tensor):
                raise TypeError(f"MixPlan: stage module {name!r} returned a "
                                f"{type(output).__name__}; the global blend needs a tensor output")
            return blend(output)

        handles.append(module.register_forward_hook(blend_output))

    def arm(_module: nn.Module, _args: tuple) -> None:
        calls[0] = 0

    def check(_module: nn.Module, _args: tuple, _output: object) -> None:
        if calls[0] != 1:
            raise RuntimeError(f"MixPlan: stage module {name!r} of peer {k} did not run during "
                               f"the forward, so no global mixing happened")

    return [peer.register_forward_pre_hook(arm), *handles, peer.register_forward_hook(check)]
