"""The package ships its annotations (py.typed, PEP 561), and they serve a user's type checker:
mypy accepts typical uses of the public API (tests/typecheck/public_api.py) and reports each
wrong use in tests/typecheck/misuse.py, on the line marked ``# error``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "typecheck"


def test_mypy_accepts_the_public_api_and_reports_its_misuse(tmp_path: Path) -> None:
    # --follow-imports=silent: the package's own modules are read for their signatures, and
    # only the two files are checked
    command = [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
               "--no-error-summary", "--no-color-output", "--cache-dir", str(tmp_path),
               "public_api.py", "misuse.py"]
    proc = subprocess.run(command, cwd=CASES, capture_output=True, text=True, timeout=600,
                          env={"MYPYPATH": str(ROOT), "PATH": ""})
    reported = set(re.findall(r"^(\w+\.py):(\d+): error:", proc.stdout, flags=re.MULTILINE))
    marked = {("misuse.py", str(number)) for number, line
              in enumerate((CASES / "misuse.py").read_text().splitlines(), 1) if line.endswith("# error")}
    assert len(marked) == 4
    assert reported == marked, proc.stdout + proc.stderr
