"""Collect the benchmark modules (bench_*.py) when pytest is pointed at bench/ (``make bench``)."""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
