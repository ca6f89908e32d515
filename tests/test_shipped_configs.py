"""The configs under configs/ are valid as shipped: each train config validates (its stage names
included: the built-in models' stages are checked in test_models.py); the study file builds a
valid config for every run."""

from __future__ import annotations

from pathlib import Path

import pytest

from metamixer_fast.config import from_mapping, load_toml
from metamixer_fast.study import load_study, study_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN = sorted(p for p in CONFIGS.glob("*.toml") if not p.name.startswith("study-"))
STUDIES = sorted(CONFIGS.glob("study-*.toml"))


def test_the_configs_directory_holds_both_kinds() -> None:
    assert TRAIN and STUDIES


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: p.name)
def test_a_shipped_train_config_is_valid(path: Path) -> None:
    from_mapping(load_toml(path)).validate()


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_a_shipped_study_builds_a_valid_config_for_every_run(path: Path) -> None:
    study = load_study(path)
    runs = [study_config(study, name, overrides, seed) for name, overrides, seed in study.runs()]
    assert len(runs) == len(study.variants) * len(study.seeds) > 0
