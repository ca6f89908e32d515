"""The study command: a small grid on synthetic data, its report, and skipping finished runs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from idx_files import fake_fashion_mnist

from metamixer_fast import checkpoint
from metamixer_fast.config import ConfigError
from metamixer_fast.study import FAILED, load_study, main

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
    # limit_train_batches = 2: the report says the runs did not train on the whole data set
    assert all(r["data"] == "2 train batches per epoch" for r in rows)
    assert ("Not the whole data set (runs limited by limit_train_batches or limit_eval_batches): "
            "dml: 2 train batches per epoch; metamixer-random: 2 train batches per epoch."
            in (tmp_path / "out" / "results.md").read_text())
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
    ("[study]\nseed = [5, 6]\n[[variant]]\nname = 'a'\n", "unknown \\[study\\] key 'seed'.*out, seeds"),
    ("[bases]\nlr = 0.1\n[[variant]]\nname = 'a'\n", "unknown top-level table 'bases'.*study, base, variant"),
    ("[study]\nseeds = [0, 0]\n[[variant]]\nname = 'a'\n", "seeds lists 0 more than once"),
    ("[study]\nseeds = [true]\n[[variant]]\nname = 'a'\n", "seeds must be a non-empty list of integers"),
    ("[study]\nseeds = 3\n[[variant]]\nname = 'a'\n", "seeds must be a non-empty list of integers"),
    ("[base]\nseed = 3\n[[variant]]\nname = 'a'\n", "\\[base\\] sets 'seed'"),
    ("[[variant]]\nname = 'a'\nout = 'x'\n", "variant 'a' sets 'out'"),
    ("[variant]\nname = 'a'\n", "\\[\\[variant\\]\\] tables"),
    ("[[variant]]\nname = '..'\n", "needs a 'name'.*got '..'"),
    ("[[variant]]\nname = 'results.md'\n", "needs a 'name'.*report's files"),
    ("[[variant]]\nname = 'a|b'\n", "needs a 'name'"),
    ("[[variant]]\nname = '  '\n", "needs a 'name'"),
    ('[[variant]]\nname = "a\\u0000b"\n', "needs a 'name'"),
    ("[[variant]]\nname = 'a'\narch = {tiny = 1}\n", "variant 'a'.*'arch' must be a list"),
])
def test_bad_study_files(tmp_path, text, match):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_study(path)


def test_bad_study_file_is_a_cli_error(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text("[study]\nseed = [5, 6]\n[[variant]]\nname = 'a'\n")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'seed'" in err and "Traceback" not in err


ONE_RUN = """
[study]
out = "{out}"
seeds = {seeds}

[base]
dataset = "synthetic"
synthetic_size = 64
arch = "tiny"
batch_size = 32
epochs = 2
lr = {lr}
stop_after_epochs = {stop}
limit_train_batches = 1
limit_eval_batches = 1
progress = false

[[variant]]
name = "dml"
method = "dml"
"""


def _one_run(path, out, seeds="[0]", lr=0.1, stop=1):
    path.write_text(ONE_RUN.format(out=out, seeds=seeds, lr=lr, stop=stop))
    return str(path)


def _epochs_done(run_dir):
    return checkpoint.load(run_dir)["epoch"], len((run_dir / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("stop", [1, 0], ids=["unfinished", "finished"])
def test_a_changed_setting_of_a_run_on_disk_is_refused(tmp_path, capsys, stop):
    """A rerun must neither resume nor skip a run made with other settings (the table would carry
    the new ones): the study stops before training anything, naming the run and the option."""
    out, run_dir = tmp_path / "out", tmp_path / "out" / "dml" / "seed0"
    assert main([_one_run(tmp_path / "s.toml", out, stop=stop)]) == 0
    before = (run_dir / checkpoint.NAME).read_bytes()
    capsys.readouterr()
    changed = _one_run(tmp_path / "s.toml", out, lr=0.01, stop=stop)
    for argv in ([changed], [changed, "--report-only"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: study variant 'dml' seed 0") and "'lr'" in err
        assert "the study file asks for 0.01" in err and "--resume" not in err  # no train advice
        assert "move" in err and "Traceback" not in err
    assert (run_dir / checkpoint.NAME).read_bytes() == before


def test_a_run_resumed_on_other_data_names_the_study_setting(tmp_path, capsys):
    """Train's fix for other data (--data-dir) is the study file's 'data_dir' setting here."""
    data, other = tmp_path / "data", tmp_path / "other"
    fake_fashion_mnist(data, torch.Generator().manual_seed(0), n_train=64, n_test=16)
    fake_fashion_mnist(other, torch.Generator().manual_seed(0), n_train=64, n_test=16,
                       shuffle_train_labels=True)
    path, out = tmp_path / "s.toml", tmp_path / "out"
    _one_run(path, out)
    on = path.read_text().replace('dataset = "synthetic"', 'dataset = "fashion-mnist"\ndata_dir = "{}"')
    path.write_text(on.format(data))
    assert main([str(path)]) == 0  # epoch 1 of 2
    path.write_text(on.format(other))
    capsys.readouterr()
    assert main([str(path)]) == 2  # the run failed; the checkpoint is kept
    err = capsys.readouterr().err
    assert "not the data this run was trained on" in err and "set data_dir in the study file" in err
    assert "--data-dir" not in err
    shutil.move(data, tmp_path / "moved")
    path.write_text(on.format(tmp_path / "moved"))
    assert main([str(path)]) == 0
    assert _epochs_done(out / "dml" / "seed0") == (2, 2)


def test_a_copied_study_continues_in_its_copy(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    assert main([_one_run(tmp_path / "s.toml", a)]) == 0  # epoch 1 of 2
    shutil.copytree(a, b)
    assert main([_one_run(tmp_path / "s.toml", b)]) == 0  # epoch 2, in B
    assert _epochs_done(b / "dml" / "seed0") == (2, 2)
    assert _epochs_done(a / "dml" / "seed0") == (1, 1)


def test_report_only_leaves_unfinished_runs_out_of_the_means(tmp_path, capsys):
    path, out = tmp_path / "s.toml", tmp_path / "out"
    main([_one_run(path, out)])  # seed 0: epoch 1 of 2
    assert main([str(path), "--report-only"]) == 2
    assert "error: no run under" in capsys.readouterr().err
    main([str(path)])  # seed 0 finished
    main([_one_run(path, out, seeds="[0, 1]")])  # seed 1: epoch 1 of 2
    capsys.readouterr()
    assert main([str(path), "--report-only"]) == 0
    assert "left out: 1 unfinished" in capsys.readouterr().out
    [row] = list(csv.DictReader(open(out / "results.csv")))
    final = json.loads((out / "dml" / "seed0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (row["seeds"], row["epochs"], row["unfinished_seeds"]) == ("1", "2", "1")
    assert float(row["ensemble_top1_mean"]) == round(final["ensemble_top1"], 2)


def test_a_failed_run_is_reported_and_the_study_carries_on(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(STUDY.format(out=tmp_path / "out").replace("seeds = [0, 1]", "seeds = [0]")
                    .replace('name = "dml"', 'name = "diverges"\nlr = 1e30') + f"""
[[variant]]
name = "nodata"
dataset = "fashion-mnist"
data_dir = "{tmp_path / 'empty'}"

[[variant]]
name = "toobig"
batch_size = 256
""")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: study variant 'diverges' seed 0 failed: non-finite loss" in err
    assert "error: study variant 'nodata' seed 0 failed: " in err
    assert "error: study variant 'toobig' seed 0 failed: config 'batch_size' 256" in err
    assert ("3 run(s) failed: diverges seed 0, nodata seed 0, toobig seed 0" in err
            and "Traceback" not in err)
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert rows["metamixer-random"]["seeds"] == "1"
    for name in ("diverges", "nodata", "toobig"):
        assert (rows[name]["seeds"], rows[name]["failed_seeds"], rows[name]["ensemble_top1_mean"]) == (
            "0", "0", "")
        assert "failed" in (tmp_path / "out" / name / "seed0" / FAILED).read_text()
    assert "| diverges | 0 | — | — | — | failed: 0 |" in (tmp_path / "out" / "results.md").read_text()


def _finished_run(tmp_path, capsys):
    """A study of one run, trained to its end: (the study file, the run's directory)."""
    path = _one_run(tmp_path / "s.toml", tmp_path / "out", stop=0)
    assert main([path]) == 0
    capsys.readouterr()
    return path, tmp_path / "out" / "dml" / "seed0"


def _report_row(out):
    [row] = list(csv.DictReader(open(out / "results.csv")))
    return row


@pytest.mark.parametrize("config_json", ["kept", "deleted"])
def test_a_run_without_a_checkpoint_is_checked_against_the_study_too(tmp_path, capsys, config_json):
    """A run whose checkpoint.pt was deleted (to save space) keeps its config.json: the report
    and a rerun check it as they check a checkpoint's, and refuse a run they cannot check."""
    _, run_dir = _finished_run(tmp_path, capsys)
    (run_dir / checkpoint.NAME).unlink()
    if config_json == "deleted":
        (run_dir / "config.json").unlink()
    changed = _one_run(tmp_path / "s.toml", tmp_path / "out", lr=0.01, stop=0)
    for argv in ([changed, "--report-only"], [changed]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: study variant 'dml' seed 0") and "Traceback" not in err
        assert ("'lr'" in err and "config.json" in err) if config_json == "kept" else "cannot" in err
        assert f"move {run_dir} aside" in err
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["config.json", "metrics.jsonl"][config_json == "deleted":])


def test_a_run_without_a_checkpoint_but_with_all_its_epochs_is_finished(tmp_path, capsys):
    path, run_dir = _finished_run(tmp_path, capsys)
    (run_dir / checkpoint.NAME).unlink()
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert main([path, "--report-only"]) == 0
    assert _report_row(tmp_path / "out")["seeds"] == "1"
    assert main([path]) == 0  # skipped as finished, not trained again nor failed
    assert "finished earlier, skipped" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == metrics and not (run_dir / checkpoint.NAME).exists()


def test_a_finished_checkpoint_decides_over_a_short_metrics_file(tmp_path, capsys):
    """The checkpoint holds the run's history: the report reads the epochs from it, and a rerun
    skips the run and writes metrics.jsonl back from it (as train --resume does)."""
    path, run_dir = _finished_run(tmp_path, capsys)
    metrics = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(metrics.splitlines(keepends=True)[0])
    assert main([path, "--report-only"]) == 0
    final = json.loads(metrics.splitlines()[-1])
    row = _report_row(tmp_path / "out")
    assert (row["seeds"], row["epochs"]) == ("1", "2")
    assert float(row["ensemble_top1_mean"]) == round(final["ensemble_top1"], 2)
    assert main([path]) == 0
    assert "finished earlier, skipped" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_a_metrics_line_past_the_checkpoint_is_not_a_finished_epoch(tmp_path, capsys):
    """A kill between an epoch's metrics line and its checkpoint: that epoch runs again, so the
    run is unfinished for the report as for a rerun (which resumes it)."""
    path = _one_run(tmp_path / "s.toml", tmp_path / "out", stop=1)
    run_dir = tmp_path / "out" / "dml" / "seed0"
    assert main([path]) == 0  # epoch 1 of 2
    line = json.loads((run_dir / "metrics.jsonl").read_text())
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({**line, "epoch": 2}) + "\n")
    capsys.readouterr()
    assert main([path, "--report-only"]) == 2
    assert "error: no run under" in capsys.readouterr().err
    assert main([_one_run(tmp_path / "s.toml", tmp_path / "out", stop=0)]) == 0
    assert "resuming at epoch 2" in capsys.readouterr().out
    assert _epochs_done(run_dir) == (2, 2)


@pytest.mark.parametrize("damage", ["a file", "metrics without a checkpoint", "corrupt checkpoint"])
def test_a_run_directory_the_study_cannot_use_is_named_with_the_fix(tmp_path, capsys, damage):
    """The fix is to move OUT/VARIANT/seedS aside, not to pass --out (the study sets it)."""
    path = _one_run(tmp_path / "s.toml", tmp_path / "out", stop=1)
    run_dir = tmp_path / "out" / "dml" / "seed0"
    if damage == "a file":
        run_dir.parent.mkdir(parents=True)
        run_dir.write_text("not a run\n")
    else:
        assert main([path]) == 0  # epoch 1 of 2
        if damage == "corrupt checkpoint":
            (run_dir / checkpoint.NAME).write_bytes(b"garbage")
        else:
            (run_dir / checkpoint.NAME).unlink()
    capsys.readouterr()
    assert main([path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study variant 'dml' seed 0") and str(run_dir) in err
    assert f"move {run_dir} aside" in err and "--out" not in err and "Traceback" not in err


def test_one_seed_shows_no_spread(tmp_path, capsys):
    """A standard deviation over one seed is not a measured zero: the table says '(1 seed)' and
    the CSV leaves the std empty; two seeds show 'mean ± std'."""
    path, _ = _finished_run(tmp_path, capsys)
    assert main([path, "--report-only"]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    row = _report_row(tmp_path / "out")
    assert "(1 seed)" in md and "±" not in md.split("\n", 2)[2]  # the header may say mean ± std
    assert row["ensemble_top1_mean"] != "" and (row["peer_top1_std"], row["ensemble_top1_std"]) == ("", "")
    assert main([_one_run(tmp_path / "s.toml", tmp_path / "out", seeds="[0, 1]", stop=0)]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "(1 seed)" not in md and md.split("\n", 2)[2].count("±") == 2
    assert _report_row(tmp_path / "out")["ensemble_top1_std"] != ""


@pytest.mark.parametrize("report_only", [False, True], ids=["run", "report-only"])
def test_a_new_grid_without_a_finished_run_leaves_no_stale_report(tmp_path, capsys, report_only):
    """A new grid in the OUT of an earlier one: until one of its runs finishes, the earlier
    grid's tables and plots must not stay there looking current (its runs stay)."""
    from metamixer_fast.study_report import REPORT_FILES

    _, old_run = _finished_run(tmp_path, capsys)
    out = tmp_path / "out"
    assert all((out / name).is_file() for name in REPORT_FILES)
    path = tmp_path / "new.toml"
    path.write_text(ONE_RUN.format(out=out, seeds="[0]", lr=0.1, stop=1).replace('"dml"', '"kdcl"'))
    if report_only:
        assert main([str(path), "--report-only"]) == 2
        assert "error: no run under" in capsys.readouterr().err
    else:
        assert main([str(path)]) == 0  # kdcl: epoch 1 of 2
    md = (out / "results.md").read_text()
    assert "| dml |" not in md and "| kdcl | 0 |" in md and "No run has finished yet" in md
    assert [(r["variant"], r["seeds"]) for r in csv.DictReader(open(out / "results.csv"))] == [("kdcl", "0")]
    assert not any((out / name).exists() for name in REPORT_FILES[2:])
    assert (old_run / checkpoint.NAME).is_file()


def test_report_only_writes_nothing_where_the_study_has_no_directory(tmp_path, capsys):
    assert main([_one_run(tmp_path / "s.toml", tmp_path / "out"), "--report-only"]) == 2
    assert "error: no run under" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_ctrl_c_ends_the_study_with_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """The checkpoints are intact: no traceback, but what is kept and the command that goes on."""
    from metamixer_fast import cli, study

    path = _one_run(tmp_path / "s.toml", tmp_path / "out", stop=1)
    assert main([path]) == 0  # epoch 1 of 2 saved

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "fit", interrupted)
    capsys.readouterr()
    try:
        rc = cli.main(["study", path])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the study command as a KeyboardInterrupt (a traceback)")
    [line] = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and line.startswith("interrupted") and "checkpoint" in line
    assert f"metamixer-fast study {path}" in line
    monkeypatch.undo()
    assert main([path]) == 0 and "resuming at epoch 2" in capsys.readouterr().out


def test_missing_data_names_the_study_setting_not_a_train_option(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A study has no --data-dir option: the fix for missing data is 'data_dir' in the study file
    (as for data that differs from a run's, test_a_run_resumed_on_other_data_names_the_study_setting)."""
    path = tmp_path / "s.toml"
    _one_run(path, tmp_path / "out")
    path.write_text(path.read_text().replace('dataset = "synthetic"', 'dataset = "fashion-mnist"\n'
                                             f'data_dir = "{tmp_path / "nowhere"}"'))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: study variant 'dml' seed 0 failed: fashion-mnist: directory {tmp_path / 'nowhere'}" in err
    assert "set data_dir in the study file" in err and "--data-dir" not in err
    assert "set data_dir in the study file" in (tmp_path / "out" / "dml" / "seed0" / FAILED).read_text()


def test_a_study_file_that_is_a_directory_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: study file {tmp_path} is a directory; pass the "
                                       f"study's TOML file\n")


def test_abbreviated_study_options_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """'--report' must not pass for '--report-only' (it would train nothing without a word)."""
    path = _one_run(tmp_path / "s.toml", tmp_path / "out")
    with pytest.raises(SystemExit) as exc:
        main([path, "--report"])
    assert exc.value.code == 2 and "unrecognized arguments: --report" in capsys.readouterr().err
