"""The study command: a small grid on synthetic data, its report, and skipping finished runs."""

from __future__ import annotations

import csv

import pytest

from metamixer_fast.config import ConfigError
from metamixer_fast.study import load_study, main

STUDY = """
[study]
out = "{out}"
seeds = [0, 1]

[base]
dataset = "synthetic"
synthetic_size = 128
arch = "tiny"
batch_size = 32
epochs = 2
limit_train_batches = 2
progress = false

[[variant]]
name = "dml"
method = "dml"

[[variant]]
name = "metamixer-random"
method = "metamixer"
local_pairing = "random"
global_pairing = "random"
"""


def test_study_runs_reports_and_skips_finished_runs(tmp_path, capsys):
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(out=tmp_path / "out"))
    assert main([str(path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [r["variant"] for r in rows] == ["dml", "metamixer-random"]
    assert all(r["seeds"] == "2" and r["epochs"] == "2" for r in rows)
    for name in ("results.md", "final_accuracy.png", "accuracy_curves.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    capsys.readouterr()
    assert main([str(path)]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4


@pytest.mark.parametrize("text, match", [
    ("[study]\nseeds = []\n[[variant]]\nname = 'a'\n", "seeds"),
    ("[study]\nseeds = [0]\n", "no \\[\\[variant\\]\\]"),
    ("[[variant]]\nname = 'a'\nmethod = 'magic'\n", "variant 'a'.*method"),
    ("[[variant]]\nname = 'a'\n[[variant]]\nname = 'a'\n", "unique"),
])
def test_bad_study_files(tmp_path, text, match):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_study(path)
