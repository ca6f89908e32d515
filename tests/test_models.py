"""Peer networks: shapes, parameter counts from the literature, hookable stages, the registry."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from metamixer_fast.models import MODELS, BasicBlock, build_model, count_parameters


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches of 2-4 small images: one thread is fastest, and it cannot be slowed by other
    processes competing for the cores (a busy 2-core CI box made 2-thread forwards 20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Published sizes: He et al. 2016 Table 6 (0.27M, 0.46M, 0.85M, 1.7M); Zagoruyko & Komodakis
# 2016 (WRN-16-2 0.69M, WRN-40-2 2.2M); all with 10 classes and 3 input channels.
PUBLISHED = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet56": 0.85e6, "resnet110": 1.7e6,
             "wrn16_2": 0.69e6, "wrn40_2": 2.2e6}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_papers(name: str) -> None:
    n = count_parameters(build_model(name, num_classes=10, in_channels=3))
    published = PUBLISHED[name]
    # The papers round to two significant figures: within half a unit of the last digit.
    assert abs(n - published) <= 0.006e6 if published < 1e6 else abs(n - published) <= 0.06e6, n


def test_parameter_count_follows_classes_and_channels() -> None:
    base = count_parameters(build_model("resnet20", 10, 3))
    # fc gains 64 weights + 1 bias per class; conv1 loses 16 * 9 weights per input channel.
    assert count_parameters(build_model("resnet20", 100, 3)) == base + 90 * 65
    assert count_parameters(build_model("resnet20", 10, 1)) == base - 2 * 16 * 9


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_forward_shapes_and_stage_hooks(name: str, shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    model = build_model(name, num_classes=7, in_channels=c).eval()
    assert model.stage_names == ("stage1", "stage2", "stage3")
    seen: dict[str, torch.Size] = {}
    for stage in model.stage_names:
        getattr(model, stage).register_forward_hook(
            lambda _m, _i, out, stage=stage: seen.__setitem__(stage, out.shape))
    with torch.no_grad():
        assert model(torch.randn(2, c, h, w)).shape == (2, 7)
    k = 2 if name.startswith("wrn") else 1
    width = {"tiny": 8}.get(name, 16) * k
    assert seen["stage1"] == (2, width, h, w)
    assert seen["stage2"] == (2, 2 * width, (h + 1) // 2, (w + 1) // 2)
    assert seen["stage3"] == (2, 4 * width, (h + 3) // 4, (w + 3) // 4)


def test_stage_hook_can_replace_the_feature_map() -> None:
    """Global mixing replaces a stage's output through a hook; the logits must follow it."""
    torch.manual_seed(0)
    model = build_model("resnet8", 10, 3).eval()
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    handle = model.stage2.register_forward_hook(lambda _m, _i, out: out.flip(0))
    mixed = model(x)
    handle.remove()
    torch.testing.assert_close(mixed, ref.flip(0))


def test_option_a_shortcut() -> None:
    block = BasicBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0
    assert sum(p.numel() for p in block.parameters()) == 16 * 32 * 9 + 32 * 32 * 9 + 4 * 32


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2"])
def test_channels_last_matches_contiguous(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, 3).eval()
    x = torch.randn(3, 3, 32, 32)
    ref = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _compile_check(backend: str) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 10, 3).train().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    eager = model(x)
    eager.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: no graph breaks
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4)


def test_torch_compile_traces_without_graph_breaks() -> None:
    _compile_check("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager() -> None:
    _compile_check("inductor")


def test_wrn_dropout_is_passed_through() -> None:
    model = build_model("wrn16_2", 10, 3, dropout=0.3)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules())
    assert not any(isinstance(m, nn.Dropout) for m in build_model("wrn16_2", 10, 3).modules())
    with pytest.raises(ValueError, match=r"model 'resnet20'.*dropout.*unexpected keyword"):
        build_model("resnet20", 10, 3, dropout=0.3)


def test_arch_import_path(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_arch_pkg").mkdir()
    (tmp_path / "my_arch_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_arch_pkg" / "nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def mlp(num_classes, in_channels, hidden=5):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))
        NOT_CALLABLE = 3
        def not_a_module(num_classes, in_channels):
            return "nope"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("my_arch_pkg.nets:mlp", num_classes=4, in_channels=1, hidden=6)
    assert model(torch.randn(2, 1, 3, 3)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"cannot import module 'my_arch_pkg.nope'"):
        build_model("my_arch_pkg.nope:mlp", 4, 1)
    with pytest.raises(ValueError, match=r"has no attribute 'missing'"):
        build_model("my_arch_pkg.nets:missing", 4, 1)
    with pytest.raises(ValueError, match=r"not a callable"):
        build_model("my_arch_pkg.nets:NOT_CALLABLE", 4, 1)
    with pytest.raises(TypeError, match=r"not a torch.nn.Module"):
        build_model("my_arch_pkg.nets:not_a_module", 4, 1)
    with pytest.raises(ValueError, match=r"expected 'package.module:factory'"):
        build_model("my_arch_pkg.nets:", 4, 1)
    sys.modules.pop("my_arch_pkg.nets", None)
    sys.modules.pop("my_arch_pkg", None)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*resnet20, resnet32") as e:
        build_model("resnet21", 10, 3)
    for name in ("resnet56", "resnet110", "wrn16_2", "wrn40_2", "package.module:factory"):
        assert name in str(e.value)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0, "in_channels": 3},
                                    {"num_classes": 10, "in_channels": 0}])
def test_bad_sizes_are_refused(kwargs) -> None:
    with pytest.raises(ValueError, match=r"num_classes|in_channels"):
        build_model("resnet20", **kwargs)
