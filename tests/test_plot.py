"""The plot command on metrics it cannot draw and on an --out it cannot write: an `error: ...`
naming the file and what is wrong, status 2, no traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from metamixer_fast import plot

RECORD = {"epoch": 1, "step": 4, "lr": 0.1, "train_loss": 4.5, "train_ce": [2.3, 2.2],
          "train_kd": [0.01, 0.02], "top1": [12.5, 10.0], "ensemble_top1": 12.5}


def _run(tmp_path: Path, *records: dict | str) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = (r if isinstance(r, str) else json.dumps(r) for r in records)
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run_dir


def test_plot_writes_the_pngs_of_good_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run(tmp_path, RECORD, {**RECORD, "epoch": 2})
    assert plot.main([str(run_dir)]) == 0
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_epoch_axes_tick_whole_epochs_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    save = plot._save
    monkeypatch.setattr(plot, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    plot.plot_run(_run(tmp_path, *({**RECORD, "epoch": e} for e in (1, 2, 3))))
    axes = [ax for fig in figures for ax in fig.axes]
    assert len(axes) == 3
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_metrics_that_are_not_utf8_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_bytes(b"\xff")
    assert plot.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir / 'metrics.jsonl'} is not a metrics file of a training "
                          f"run: it is not UTF-8 text"), err


@pytest.mark.parametrize("change, line, match", [
    ({"train_ce": [2.3]}, 1, "'train_ce' is [2.3], not a list of 2 numbers (one per peer"),
    ({"train_kd": [0.1, 0.2, 0.3]}, 1, "'train_kd' is [0.1, 0.2, 0.3], not a list of 2 numbers"),
    ({"top1": []}, 1, "'top1' is [], not a list of one number per peer"),
    ({"top1": [1.0, "x"]}, 1, "'top1' is [1.0, 'x'], not a list of 2 numbers"),
    ({"train_loss": None}, 1, "'train_loss' is None, not a number"),
    ({"epoch": "1"}, 1, "'epoch' is '1', not an integer"),
])
def test_a_record_the_plots_cannot_draw_names_the_line_and_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], line: int,
        match: str) -> None:
    """A short 'train_ce' (fewer entries than peers) was an IndexError traceback half way through
    the plot."""
    run_dir = _run(tmp_path, {**RECORD, **change}, {**RECORD, "epoch": 2})
    assert plot.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir / 'metrics.jsonl'}:{line} is not an epoch record of a "
                          f"training run: ") and match in err and "Traceback" not in err, err
    assert not (run_dir / "loss.png").exists()


def test_a_later_record_with_another_number_of_peers_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run(tmp_path, RECORD, {**RECORD, "epoch": 2, "top1": [1.0, 2.0, 3.0]})
    assert plot.main([str(run_dir)]) == 2
    assert "metrics.jsonl:2 is not an epoch record" in capsys.readouterr().err


def test_an_out_that_cannot_be_created_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`plot RUN --out afile/x` was a NotADirectoryError traceback (only FileNotFoundError and
    ValueError were caught)."""
    run_dir = _run(tmp_path, RECORD)
    (tmp_path / "afile").write_text("precious\n")
    out = tmp_path / "afile" / "x"
    assert plot.main([str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {out} cannot be created: {tmp_path / 'afile'} is a file, not a "
                   f"directory; choose a writable directory\n")
    assert (tmp_path / "afile").read_text() == "precious\n"


def test_abbreviated_plot_options_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run(tmp_path, RECORD)
    with pytest.raises(SystemExit) as exc:
        plot.main([str(run_dir), "--o", str(tmp_path / "pngs")])
    assert exc.value.code == 2 and "unrecognized arguments: --o" in capsys.readouterr().err
    assert not (tmp_path / "pngs").exists()
