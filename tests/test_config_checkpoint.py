"""Config parsing/validation and crash-safe checkpoint files."""

from __future__ import annotations

import os
import re
import struct
import zipfile

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
    (("--local-pairing", "bogus"), "local_pairing"),
    (("--global-pairing", "same_class"), "global_pairing"),
    (("--local-alpha", "inf"), "local_alpha"),
    (("--temperature", "inf"), "temperature"),
    (("--kd-weight", "inf"), "kd_weight"),
    (("--lr", "inf"), "lr"),
    (("--lr", "nan"), "lr"),
    (("--weight-decay", "inf"), "weight_decay"),
    (("--warmup-epochs", "inf"), "warmup_epochs"),
    (("--epochs", "2", "--warmup-epochs", "2.5"), "warmup_epochs"),
    (("--gamma", "-1"), "gamma"),
    (("--gamma", "0"), "gamma"),
    (("--gamma", "inf"), "gamma"),
    (("--stages", "input,foo"), "stages"),
    (("--seed", "-1"), "seed"),
    (("--seed", str(2**32)), "seed"),
    (("--seed", "99999999999999999999"), "seed"),
    (("--out", ""), "out"),
    (("--dataset", "synthetic", "--data-dir", "somewhere"), "data_dir"),
])
def test_bad_options_name_the_option(argv, match):
    with pytest.raises(ConfigError, match=f"config '{match}'"):
        from_args(_args(*argv))


@pytest.mark.parametrize("values, match", [
    ({"epochs": True}, "'epochs' must be an integer; got True"),
    ({"lr": True}, "'lr' must be a number; got True"),
    ({"epochs": 1.5}, "'epochs' must be an integer; got 1.5"),
    ({"milestones": [0.5, True]}, "'milestones' must be a list"),
    ({"out": 5}, "'out' must be a string; got 5"),
    ({"nesterov": 1}, "'nesterov' must be true or false; got 1"),
    ({"arch": {"resnet8": 1, "tiny": 2}}, "'arch' must be a list (or comma-separated string)"),
])
def test_config_values_of_the_wrong_type_are_refused(values, match):
    """TOML's true is not 1 epoch nor a learning rate of 1.0."""
    with pytest.raises(ConfigError, match=re.escape(match)):
        from_mapping(values)


def test_stage_names_are_checked_where_they_are_known():
    from_args(_args("--stages", "foo", "--method", "dml"))  # only MetaMixer blends at a stage
    # a factory's stages are known once its peers are built (tested in test_train.py)
    from_args(_args("--stages", "input,block9", "--arch", "my.models:net"))
    with pytest.raises(ConfigError, match="names among input, stage1, stage2, stage3"):
        from_args(_args("--stages", "input,stage4", "--arch", "resnet20,wrn16_2"))


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
    inside = tmp_path / "inside.toml"
    inside.write_text("[train]\nepochz = 3\n")
    with pytest.raises(ConfigError, match="unknown config option 'epochz'"):
        from_args(_args("--config", str(inside)))


def test_keys_beside_the_train_table_are_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('epochs = 3\nlr = 0.5\n[train]\nmethod = "dml"\n')
    with pytest.raises(ConfigError, match=r"'epochs', 'lr' outside the \[train\] table"):
        from_args(_args("--config", str(path)))
    path.write_text("train = 3\n")
    with pytest.raises(ConfigError, match="'train' must be a table"):
        from_args(_args("--config", str(path)))


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


@pytest.mark.parametrize("key, value, match", [
    ("config", "oops", "'config' is a str"),
    ("epoch", -5, "'epoch' is -5"),
    ("step", 1.5, "'step' is 1.5"),
    ("history", "abc", "'history' is not a list"),
    ("history", [{}], "'history' holds 1 epochs but 'epoch' is 2"),
])
def test_malformed_checkpoint_bookkeeping_is_refused(tmp_path, key, value, match):
    """A CRC-clean checkpoint whose bookkeeping is wrong is refused before a resume rewrites
    metrics.jsonl from its history or trains on from its epoch."""
    state = {"config": TrainConfig().to_dict(), "epoch": 2, "step": 20, "peers": [], "optimizer": {},
             "scheduler": {}, "rng": {}, "history": [{"epoch": 1}, {"epoch": 2}]}
    checkpoint.save({**state, key: value}, tmp_path)
    before = (tmp_path / checkpoint.NAME).read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(match)):
        checkpoint.load(tmp_path)
    assert (tmp_path / checkpoint.NAME).read_bytes() == before
    checkpoint.save(state, tmp_path)
    assert checkpoint.load(tmp_path)["epoch"] == 2  # the well-formed one loads


def _member_data(path, suffix: str) -> tuple[int, int]:
    """(offset, size) of the bytes of the zip member whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


@pytest.mark.parametrize("member", ["data/0", "data.pkl"])
def test_flipped_byte_in_checkpoint_is_refused(tmp_path, member):
    """A tensor's bytes load without complaint unless the CRCs are checked; a flip in the pickle
    may reach torch's unpickler as any exception (KeyError, ...)."""
    checkpoint.save({"config": {}, "epoch": 1, "step": 1, "peers": [{"w": torch.arange(256.0)}],
                     "optimizer": {}, "scheduler": {}, "rng": {}}, tmp_path)
    path = tmp_path / checkpoint.NAME
    offset, size = _member_data(path, member)
    raw = bytearray(path.read_bytes())
    raw[offset + size // 2] ^= 0x10
    path.write_bytes(raw)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"checkpoint {path} is corrupt")):
        checkpoint.load(tmp_path)
    assert path.read_bytes() == raw


def test_unpickler_failure_is_a_checkpoint_error(tmp_path, monkeypatch):
    checkpoint.save({"config": {}, "epoch": 1, "step": 1, "peers": [], "optimizer": {},
                     "scheduler": {}, "rng": {}}, tmp_path)

    def load(*args, **kwargs):
        raise KeyError("storage key seen by a damaged pickle")

    monkeypatch.setattr(checkpoint.torch, "load", load)
    with pytest.raises(checkpoint.CheckpointError, match=r"corrupt.*KeyError"):
        checkpoint.load(tmp_path)


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "nowhere")


def test_resume_refuses_a_changed_config():
    state = {"config": from_mapping({"method": "dml", "epochs": 4}).to_dict()}
    assert resume_config(state, {"progress": False}).epochs == 4
    with pytest.raises(checkpoint.CheckpointError, match="'lr'"):
        resume_config(state, {"lr": "0.5"})


def test_resume_config_keeps_the_run_directory():
    state = {"config": from_mapping({"out": "runs/old", "data_dir": "/data/a"}).to_dict()}
    cfg = resume_config(state, {"data-dir": "/data/b", "stop-after-epochs": 1}, run_dir="runs/moved")
    assert (cfg.out, cfg.data_dir, cfg.stop_after_epochs) == ("runs/moved", "/data/b", 1)
    assert resume_config(state, {"out": "runs/moved/"}, run_dir="runs/moved").out == "runs/moved"
    with pytest.raises(ConfigError, match="--out runs/other differs"):
        resume_config(state, {"out": "runs/other"}, run_dir="runs/moved")


def test_info_reports_a_bad_backend_setting_on_its_line(monkeypatch):
    from metamixer_fast import info

    monkeypatch.setenv("METAMIXER_BACKEND", "bogus")
    lines = info.report().splitlines()
    (line,) = [x for x in lines if x.startswith("METAMIXER_BACKEND")]
    assert "ERROR:" in line and "'bogus' is not a backend" in line
    assert any("mixed_kd_loss" in x and "ERROR:" in x for x in lines)
    assert info.main([]) == 1  # scripts can check the setting
    monkeypatch.setenv("METAMIXER_BACKEND", "reference")
    assert info.main([]) == 0


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
