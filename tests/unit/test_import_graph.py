"""The package import graph points one way: process packages import ``areal_like``, never each other.

``buffer``, ``rollout_server`` and ``trainer`` run as separate processes; an import between
them would drag one process's dependencies (and state) into another. ``launch`` orchestrates
and may import anything; tests may import anything. ``areal_like`` imports no process package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROCESS_PACKAGES = ("buffer", "rollout_server", "trainer")
CHECKED = (*PROCESS_PACKAGES, "areal_like")
FORBIDDEN = {pkg: {p for p in (*PROCESS_PACKAGES, "launch") if p != pkg} for pkg in CHECKED}


def imported_top_levels(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, top-level package) for every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    depth_of_file = len(path.relative_to(ROOT / package).parts) - 1  # 0 for package/x.py
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.lineno, (node.module or "").split(".")[0]))
            elif node.level > depth_of_file + 1:  # `from ...x` climbing out of the package
                out.append((node.lineno, node.module.split(".")[0] if node.module else "<parent>"))
            else:
                out.append((node.lineno, package))
    return out


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


def test_checked_packages_exist():
    for pkg in CHECKED:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg


@pytest.mark.parametrize("package", CHECKED)
def test_no_imports_between_process_packages(package):
    violations = [f"{path.relative_to(ROOT)}:{line} imports {target}"
                  for path in python_files(package)
                  for line, target in imported_top_levels(path, package)
                  if target in FORBIDDEN[package] or target == "<parent>"]
    assert not violations, "process packages may import only areal_like:\n" + "\n".join(violations)


def test_walker_sees_every_import_form(tmp_path, monkeypatch):
    pkg = tmp_path / "buffer" / "sub"
    pkg.mkdir(parents=True)
    src = pkg / "m.py"
    src.write_text("import trainer.loop\nfrom rollout_server import x\nfrom .. import y\nfrom ... import z\n"
                   "def f():\n    import launch\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    targets = [t for _, t in imported_top_levels(src, "buffer")]
    assert sorted(targets) == sorted(["trainer", "rollout_server", "buffer", "<parent>", "launch"])


def test_config_module_does_not_import_torch():
    code = ("import sys; import areal_like.config, areal_like.protocol, areal_like.transport, "
            "areal_like.daemon, areal_like.metrics; "
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
