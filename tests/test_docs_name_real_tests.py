"""Every test the README and docs/ name exists where they say: the bad-input table says each
row "is checked by the test named in its last column", so a renamed or moved test must take
its citation along."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# test_-names the docs use that are not pytest tests
NOT_PYTEST = {
    "test_batch": "CIFAR-10's test file",
    **{p.stem: "a C++ test (ctest)" for p in (ROOT / "csrc" / "tests").glob("test_*.cpp")},
}


def _defined() -> dict[str, set[str]]:
    """Test function name -> the files (tests/ and bench/) that define it."""
    where: dict[str, set[str]] = {}
    for path in [*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]:
        for name in re.findall(r"^\s*def (test_\w+)", path.read_text(), flags=re.MULTILINE):
            where.setdefault(name, set()).add(path.name)
    return where


def _citations(line: str):
    """(file or None, test name) for each test a line names: ``file.py::name``, ``::name`` (in the
    file named last on the line) or a bare ``name``."""
    last_file = None
    for m in re.finditer(r"(test_\w+\.py)(?:::(test_\w+))?|(::)?(test_\w+)", line):
        if m.group(1):
            last_file = m.group(1)
            if m.group(2):
                yield last_file, m.group(2)
        elif m.group(3):
            yield last_file, m.group(4)
        else:
            yield None, m.group(4)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_tests_a_doc_names_exist(doc: Path) -> None:
    defined = _defined()
    wrong = []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for file, name in _citations(line):
            if name in NOT_PYTEST and file is None:
                continue
            if name not in defined:
                wrong.append(f"line {number}: no test {name}")
            elif file is not None and file not in defined[name]:
                wrong.append(f"line {number}: {name} is in {sorted(defined[name])}, not {file}")
    assert not wrong, f"{doc.name}: " + "; ".join(wrong)
