"""The package import graph points one way: process packages import ``areal_like``, never each other.

``buffer``, ``rollout_server`` and ``trainer`` run as separate processes; an import between
them would drag one process's dependencies (and state) into another. ``launch`` orchestrates
and may import anything; tests may import anything. ``areal_like`` imports no process package.

Besides import statements, the walker counts the imports that hide in strings:
``importlib.import_module("x.y")`` and ``__import__("x")`` with a literal name, in every checked
package, and in ``areal_like`` any string literal that names a module of an upper package
(``"launch.job"``, ``"trainer.export"`` for ``python -m``, ``"rollout_server.rewards:fn"``, a
dotted path something will import): the shared core must not know them at all. A process package
may start another one's module as a process of its own (``python -m trainer.export``). Dotted
paths computed at run time (a user's reward function, ``areal_like/callables.py``) are not the
project's own and are not counted.
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
ALL_PACKAGES = (*CHECKED, "launch")
FORBIDDEN = {pkg: {p for p in (*PROCESS_PACKAGES, "launch") if p != pkg} for pkg in CHECKED}


IMPORT_CALLS = {"import_module", "__import__"}  # importlib.import_module(...), import_module(...), __import__(...)


def names_project_module(text: str) -> str | None:
    """The top-level package of ``text`` when it is a dotted path to a module of this repository
    (``pkg.mod`` or ``pkg.mod:attr``), else None. A bare package name is not counted (``"trainer"``
    is also a daemon's name), nor a config key (``"trainer.lr"``, ``"trainer.weight_sync.backend"``)."""
    parts = text.partition(":")[0].split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts) or parts[0] not in ALL_PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    return parts[0] if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() else None


def _string_imports(node: ast.AST, package: str) -> list[tuple[int, str]]:
    """Imports hiding in strings: a literal passed to an import call; in areal_like also a literal
    naming a project module."""
    if isinstance(node, ast.Call):
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
        arg = node.args[0] if node.args else None
        if name in IMPORT_CALLS and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return [(node.lineno, arg.value.split(".")[0])]
    if package == "areal_like" and isinstance(node, ast.Constant) and isinstance(node.value, str):
        target = names_project_module(node.value)
        if target is not None:
            return [(node.lineno, target)]
    return []


def imported_top_levels(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, top-level package) for every import in ``path``, relative imports resolved, and the
    imports that hide in strings."""
    tree = ast.parse(path.read_text(), filename=str(path))
    depth_of_file = len(path.relative_to(ROOT / package).parts) - 1  # 0 for package/x.py
    out = []
    for node in ast.walk(tree):
        out += _string_imports(node, package)
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.lineno, (node.module or "").split(".")[0]))
            elif node.level > depth_of_file + 1:  # `from ...x` climbing out of the package
                out.append((node.lineno, node.module.split(".")[0] if node.module else "<parent>"))
            else:
                out.append((node.lineno, package))
    return sorted(set(out))  # a literal passed to an import call is also a string naming the module


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


def test_walker_sees_imports_hidden_in_strings(tmp_path, monkeypatch):
    """The check can fail: each upward reach below is reported, the legitimate strings are not."""
    for module in ("launch/job.py", "trainer/export.py", "rollout_server/rewards.py", "areal_like/cli.py"):
        (tmp_path / module).parent.mkdir(exist_ok=True)
        (tmp_path / module).write_text("")
    src = tmp_path / "areal_like" / "cli.py"
    src.write_text(
        "import importlib\nfrom importlib import import_module\n"
        "job = importlib.import_module('launch.job')\n"  # 3
        "exp = import_module('trainer.export')\n"  # 4
        "buf = __import__('buffer')\n"  # 5
        "REWARD = 'rollout_server.rewards:math_reward'\n"  # 6: a dotted path something will import
        "TOOL = ['-m', 'trainer.export']\n"  # 7: a module something will start
        "user = importlib.import_module(path)\n"  # a path computed at run time: a user's, not counted
        "keys = ('trainer.lr', 'trainer.export.shard_mb', 'trainer', 'launch.nope')\n"  # config keys, names
        "own = 'areal_like.cli:main'\n")  # its own package: allowed
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = sorted(imported_top_levels(src, "areal_like"))
    assert [(line, t) for line, t in found if t != "areal_like" and t != "importlib"] == [
        (3, "launch"), (4, "trainer"), (5, "buffer"), (6, "rollout_server"), (7, "trainer")]
    violations = [t for _, t in found if t in FORBIDDEN["areal_like"]]
    assert violations == ["launch", "trainer", "buffer", "rollout_server", "trainer"]
    exec_only = tmp_path / "rollout_server" / "rewards.py"  # a process package may start another as a process
    exec_only.write_text("import sys\nargv = [sys.executable, '-m', 'trainer.export']\n"
                         "m = __import__('trainer.export')\n")
    assert [(line, t) for line, t in imported_top_levels(exec_only, "rollout_server") if t != "sys"] == [(3, "trainer")]


def test_config_module_does_not_import_torch():
    code = ("import sys; import areal_like.config, areal_like.protocol, areal_like.transport, "
            "areal_like.daemon, areal_like.metrics; "
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
