"""The linter runs with the tests, so CI checks it (the rules that keep the package budgets honest).

``ruff check`` passes over the repository with the settings in pyproject.toml: pyflakes, import
order, and no line over 100 columns (E501) in every Python file: packages, benchmarks and tests.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_COLUMNS = 100


def ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: it is in the test extra (pip install -e '.[test]')")
    return [exe]


def check(*paths: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*ruff(), "check", "--no-cache", "--output-format", "concise", *paths],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_ruff_passes():
    out = check(".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_the_line_length_rule_bites_everywhere(tmp_path):
    """The repository's own settings, on a copy: a line of MAX_COLUMNS + 1 columns is an E501 in a
    package, a benchmark and a test; one of MAX_COLUMNS columns is allowed."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for folder in ("trainer", "benchmarks", "tests/unit"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "m.py").write_text(
            "x = '" + "a" * (MAX_COLUMNS - 6) + "'\n" + "y = '" + "b" * (MAX_COLUMNS - 5) + "'\n")
    out = check(".", cwd=tmp_path)
    flagged = sorted(line.split(":")[0] + ":" + line.split(":")[1]
                     for line in out.stdout.splitlines() if "E501" in line)
    assert flagged == ["benchmarks/m.py:2", "tests/unit/m.py:2", "trainer/m.py:2"], out.stdout
