"""The benchmark tables of the README and docs/ are the stored runs they cite, rendered by the
benchmark's own formatter (a figure edited by hand, or rounded from the rounded milliseconds,
fails here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_call_routes  # noqa: E402  (bench/ is not a package)
import bench_cuda  # noqa: E402
import bench_mix  # noqa: E402
import report  # noqa: E402
import triton_mix_sass  # noqa: E402

DOCS = {name: (ROOT / name).read_text() for name in
        ("README.md", "docs/mixing-performance.md", "docs/gpu.md")}


def _rows(markdown: str) -> list[str]:
    """A table's data rows (not its header or separator)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [line for line in lines[1:] if not line.startswith("|---")]


def _mix_sass(result: dict) -> str:
    before = (ROOT / "bench" / "results" / "52450f1" / "mix_sass_a3819e1.json").read_text()
    return triton_mix_sass.markdown(result, json.loads(before))


@pytest.mark.parametrize("doc, record, render", [
    ("README.md", "8c7dcdf/mixed_kd_loss_off_4.json", report.loss_markdown),
    ("README.md", "8c7dcdf/mixed_kd_loss_on_4.json", report.loss_markdown),
    ("README.md", "f1f8a60/std2_usual_1.json", bench_mix.markdown),
    ("README.md", "2d96dc0/call_routes2_2.json", bench_call_routes.markdown),
    ("docs/mixing-performance.md", "f1f8a60/std2_usual_1.json", bench_mix.markdown),
    ("docs/mixing-performance.md", "b6926bd/std1_usual_2.json", bench_mix.markdown),
    ("docs/mixing-performance.md", "b6926bd/alone2_usual_1.json", bench_mix.markdown),
    ("docs/mixing-performance.md", "72bf4bd/alone2_xeon_1.json", bench_mix.markdown),
    ("docs/gpu.md", "a3819e1/cuda.json", bench_cuda.markdown),
    ("docs/gpu.md", "52450f1/mix_sass.json", _mix_sass),
])
def test_table_is_the_cited_record(doc: str, record: str, render) -> None:
    rows = _rows(render(json.loads((ROOT / "bench" / "results" / record).read_text())))
    assert rows
    missing = [row for row in rows if row not in DOCS[doc]]
    assert not missing, f"{doc} rows differ from {record}: {missing}"
