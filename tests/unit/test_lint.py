"""The linter runs with the tests, so CI checks it (the rules that keep the package budgets honest).

* ``ruff check`` passes over the repository with the settings in pyproject.toml (pyflakes and
  import order).
* Line length: the goal is no line over ``MAX_COLUMNS`` in the product packages. Code written or
  reworked since the rule meets it; older files are wrapped when they are reworked, not by a
  formatter pass that would only add lines. Until then each package may hold at most the long lines
  it holds now (``CEILING``): the count can only go down, and lowering a ceiling is part of the
  change that shortens lines.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_COLUMNS = 100
CEILING = {"areal_like": 278, "buffer": 132, "trainer": 221, "rollout_server": 404, "launch": 262}


def ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: it is in the test extra (pip install -e '.[test]')")
    return [exe]


def test_ruff_passes():
    out = subprocess.run([*ruff(), "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def long_lines(package: str) -> list[str]:
    """``path:line`` of every line of ``package``'s Python files over MAX_COLUMNS."""
    return [f"{path.relative_to(ROOT)}:{i}" for path in sorted((ROOT / package).rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_COLUMNS]


@pytest.mark.parametrize("package", sorted(CEILING))
def test_long_lines_only_go_down(package):
    found = long_lines(package)
    assert len(found) <= CEILING[package], (
        f"{package} has {len(found)} lines over {MAX_COLUMNS} columns, more than its ceiling of "
        f"{CEILING[package]}: wrap the new ones (the last few: {found[-5:]})")


def test_the_ceiling_check_can_fail(tmp_path, monkeypatch):
    pkg = tmp_path / "buffer"
    pkg.mkdir()
    (pkg / "m.py").write_text("x = 1\n" + "y = '" + "a" * MAX_COLUMNS + "'\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert long_lines("buffer") == ["buffer/m.py:2"]
