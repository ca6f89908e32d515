"""Config parsing/validation and crash-safe checkpoint files."""

from __future__ import annotations

import os

import pytest
import torch

from metamixer_fast import checkpoint
from metamixer_fast.config import ConfigError, TrainConfig, from_args, from_mapping
from metamixer_fast.train import build_parser, resume_config


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def test_toml_then_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nmethod = "dml"\nepochs = 7\narch = ["resnet20", "resnet32"]\n'
                    'stages = "input,stage2"\nnesterov = false\n')
    cfg = from_args(_args("--config", str(path), "--epochs", "3", "--lr", "0.05"))
    assert (cfg.method, cfg.epochs, cfg.lr, cfg.nesterov) == ("dml", 3, 0.05, False)
    assert cfg.peer_archs == ["resnet20", "resnet32"]
    assert cfg.stages == ["input", "stage2"]


def test_single_arch_repeats_for_every_peer():
    cfg = from_args(_args("--arch", "resnet20", "--peers", "3"))
    assert cfg.peer_archs == ["resnet20"] * 3


@pytest.mark.parametrize("argv, match", [
    (("--method", "magic"), "method"),
    (("--epochs", "0"), "epochs"),
    (("--epochs", "2.5"), "epochs"),
    (("--lr", "-1"), "lr"),
    (("--amp", "fp8"), "amp"),
    (("--peers", "1"), "peers"),
    (("--mix-prob", "1.5"), "mix_prob"),
    (("--temperature", "0"), "temperature"),
    (("--local-alpha", "0"), "local_alpha"),
    (("--milestones", "0.5,2"), "milestones"),
    (("--dataset", "imagenet"), "dataset"),
])
def test_bad_options_name_the_option(argv, match):
    with pytest.raises(ConfigError, match=match):
        from_args(_args(*argv))


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        from_args(_args("--config", str(bad)))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("epochz = 3\n")
    with pytest.raises(ConfigError, match="unknown config option 'epochz'"):
        from_args(_args("--config", str(unknown)))
    with pytest.raises(ConfigError, match="does not exist"):
        from_args(_args("--config", str(tmp_path / "missing.toml")))


def test_checkpoint_round_trip_and_atomic_replace(tmp_path):
    state = {"config": TrainConfig().to_dict(), "epoch": 1, "step": 10, "peers": [{"w": torch.ones(3)}],
             "optimizer": {}, "scheduler": {}, "rng": {"torch": torch.get_rng_state()}}
    checkpoint.save(state, tmp_path)
    state["epoch"] = 2
    checkpoint.save(state, tmp_path)
    loaded = checkpoint.load(tmp_path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["peers"][0]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no temporary left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_corrupt_checkpoint_is_refused_and_left_untouched(tmp_path, damage):
    path = tmp_path / checkpoint.NAME
    if damage == "foreign":
        torch.save({"weights": torch.ones(2)}, path)
    else:
        checkpoint.save({"config": {}, "epoch": 1, "step": 1, "peers": [], "optimizer": {},
                         "scheduler": {}, "rng": {}}, tmp_path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 50)
    before = path.read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint"):
        checkpoint.load(tmp_path)
    assert path.read_bytes() == before


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "nowhere")


def test_resume_refuses_a_changed_config():
    state = {"config": from_mapping({"method": "dml", "epochs": 4}).to_dict()}
    assert resume_config(state, {"progress": False}).epochs == 4
    with pytest.raises(checkpoint.CheckpointError, match="'lr'"):
        resume_config(state, {"lr": "0.5"})


def test_shipped_configs_are_valid():
    from pathlib import Path

    from metamixer_fast.config import load_toml
    from metamixer_fast.study import load_study

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        if path.name.startswith("study-"):
            load_study(path)
        else:
            from_mapping(load_toml(path)).validate()
