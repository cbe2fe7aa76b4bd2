"""The import graph points one way: process packages import ``areal_like``, never each other.

buffer, rollout_server and trainer are separate processes; launch and tests may import anything;
areal_like imports no process package. Imports hiding in strings count: import_module/__import__
literals everywhere, and in areal_like any literal naming an upper package's module ("launch.job",
"rollout_server.rewards:fn"); ``python -m`` of another package is allowed; run-time dotted paths
(users' reward functions) are not counted. Also (each check shown to fail on a synthetic tree): no
import circle in a package, no import up areal_like's WINGS, no touching another module's
_private names, no function over 60 lines.
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


# importlib.import_module(...), import_module(...), __import__(...)
IMPORT_CALLS = {"import_module", "__import__"}


def names_project_module(text: str) -> str | None:
    """Top-level package of text if it is a dotted path to a project module (not a key)."""
    parts = text.partition(":")[0].split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts) or parts[0] not in ALL_PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    return (parts[0] if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
            else None)


def _string_imports(node: ast.AST, package: str) -> list[tuple[int, str]]:
    """Imports in strings: import-call literals; in areal_like also project module names."""
    if isinstance(node, ast.Call):
        fn = node.func
        name = (fn.attr if isinstance(fn, ast.Attribute)
                else fn.id if isinstance(fn, ast.Name) else "")
        arg = node.args[0] if node.args else None
        if name in IMPORT_CALLS and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return [(node.lineno, arg.value.split(".")[0])]
    if package == "areal_like" and isinstance(node, ast.Constant) and isinstance(node.value, str):
        target = names_project_module(node.value)
        if target is not None:
            return [(node.lineno, target)]
    return []


def imported_top_levels(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in path, string imports included."""
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


@pytest.fixture()
def tree(tmp_path, monkeypatch):
    """A synthetic repository the checks read instead of ROOT: write({path: text})."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)

    def write(files: dict[str, str]) -> None:
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
    return write


@pytest.mark.parametrize("package", CHECKED)
def test_no_imports_between_process_packages(package):
    assert (ROOT / package / "__init__.py").is_file(), package  # else nothing would be checked
    violations = [f"{path.relative_to(ROOT)}:{line} imports {target}"
                  for path in python_files(package)
                  for line, target in imported_top_levels(path, package)
                  if target in FORBIDDEN[package] or target == "<parent>"]
    assert not violations, "process packages may import only areal_like:\n" + "\n".join(violations)


def test_walker_sees_every_import_form(tmp_path, tree):
    tree({"buffer/sub/m.py": "import trainer.loop\nfrom rollout_server import x\n"
                             "from .. import y\nfrom ... import z\n"
                             "def f():\n    import launch\n"})
    targets = [t for _, t in imported_top_levels(tmp_path / "buffer/sub/m.py", "buffer")]
    assert sorted(targets) == sorted(["trainer", "rollout_server", "buffer", "<parent>", "launch"])


def test_walker_sees_imports_hidden_in_strings(tmp_path, tree):
    """The check can fail: each upward reach below is reported, the legitimate strings are not."""
    tree({"launch/job.py": "", "trainer/export.py": "", "rollout_server/rewards.py": ""})
    src = tmp_path / "areal_like" / "cli.py"
    tree({"areal_like/cli.py": (
        "import importlib\nfrom importlib import import_module\n"
        "job = importlib.import_module('launch.job')\n"  # 3
        "exp = import_module('trainer.export')\n"  # 4
        "buf = __import__('buffer')\n"  # 5
        "REWARD = 'rollout_server.rewards:math_reward'\n"  # 6: a dotted path something will import
        "TOOL = ['-m', 'trainer.export']\n"  # 7: a module something will start
        # a path computed at run time: a user's, not counted
        "user = importlib.import_module(path)\n"
        # config keys, names
        "keys = ('trainer.lr', 'trainer.export.shard_mb', 'trainer', 'launch.nope')\n"
        "own = 'areal_like.cli:main'\n")})  # its own package: allowed
    found = sorted(imported_top_levels(src, "areal_like"))
    assert [(line, t) for line, t in found if t != "areal_like" and t != "importlib"] == [
        (3, "launch"), (4, "trainer"), (5, "buffer"), (6, "rollout_server"), (7, "trainer")]
    violations = [t for _, t in found if t in FORBIDDEN["areal_like"]]
    assert violations == ["launch", "trainer", "buffer", "rollout_server", "trainer"]
    # a process package may start another as a process
    exec_only = tmp_path / "rollout_server" / "rewards.py"
    exec_only.write_text("import sys\nargv = [sys.executable, '-m', 'trainer.export']\n"
                         "m = __import__('trainer.export')\n")
    assert [(line, t) for line, t in imported_top_levels(exec_only, "rollout_server")
            if t != "sys"] == [(3, "trainer")]


def test_config_module_does_not_import_torch():
    code = ("import sys; import areal_like.settings.config, areal_like.wire.protocol, "
            "areal_like.net.transport, areal_like.daemon, areal_like.net.metrics; "
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------- no import circle inside a package
# Every import statement counts, those inside functions (lazy ones) too: a lazy import hides a
# circle from the interpreter, not from the reader. ``from pkg import name`` is an import of the
# module ``pkg.name`` when there is one, else of ``pkg``.

def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """The project modules ``path`` imports anywhere in it, relative imports resolved."""
    me = module_name(path).split(".")
    here = me if path.name == "__init__.py" else me[:-1]  # the package a relative import starts in
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out |= {f"{module}.{a.name}" if is_module(f"{module}.{a.name}") else module
                    for a in node.names}
    return {m for m in out if is_module(m)}


def package_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    graph = {}
    for path in python_files(package):
        name = module_name(path)
        graph[name] = {m for m in imported_modules(path)
                       if m.split(".")[0] == package and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The import circles of ``graph``: each a set of modules that all reach one another."""
    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            if (m := todo.pop()) not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return seen

    reach = {m: reachable(m) for m in graph}
    return {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph if m in reach[m]}


@pytest.mark.parametrize("package", ALL_PACKAGES)
def test_no_import_circle_inside_a_package(package):
    found = [sorted(c) for c in circles(package_graph(package))]
    assert not found, f"import circles in {package} (lazy imports included): {found}"


def test_circle_check_sees_a_circle_through_a_lazy_import(tree):
    tree({"buffer/__init__.py": "", "buffer/a.py": "from buffer import b\n",
          "buffer/b.py": "def f():\n    from .sub.c import X\n", "buffer/sub/__init__.py": "",
          "buffer/sub/c.py": "from ..a import Y\nimport buffer.d\n",
          "buffer/d.py": "import buffer.a\n", "buffer/e.py": "from buffer import a\n"})
    graph = package_graph("buffer")
    assert graph["buffer.b"] == {"buffer.sub.c"}
    assert graph["buffer.sub.c"] == {"buffer.a", "buffer.d"}
    assert circles(graph) == {frozenset({"buffer.a", "buffer.b", "buffer.sub.c", "buffer.d"})}


# ---------------------------------------------------------------- areal_like's wings point down
# ``areal_like`` is a floor of wings, lowest first; a module imports only from its own wing or a
# lower one (lazy imports and dotted paths in strings included). The modules at the top
# (``TOP_MODULES``) sit above every wing and may import any.

WINGS = ("wire", "net", "engines", "settings", "tasks", "weights")
# tied: a script run before anything else in a child (areal_like/daemon.py popen_tied), no import
TOP_MODULES = {"areal_like", "areal_like.daemon", "areal_like.job_facts", "areal_like.tied"}


def wing_rank(module: str) -> int:
    """An areal_like module's floor: its wing's place in WINGS, top above them all."""
    parts = module.split(".")
    return WINGS.index(parts[1]) if len(parts) > 1 and parts[1] in WINGS else len(WINGS)


def named_modules(path: Path) -> set[str]:
    """The project modules ``path`` imports, and those its string literals name as dotted paths."""
    strings = {n.value.partition(":")[0] for n in ast.walk(ast.parse(path.read_text()))
               if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    dotted = {s for s in strings if all(part.isidentifier() for part in s.split("."))}
    named = {s for s in dotted if s.startswith("areal_like") and is_module(s)}
    return imported_modules(path) | named


def upward_imports() -> list[str]:
    found = []
    for path in python_files("areal_like"):
        me = module_name(path)
        found += [f"{me} -> {m}" for m in sorted(named_modules(path))
                  if m.split(".")[0] == "areal_like" and wing_rank(m) > wing_rank(me)]
    return found


def test_areal_like_wings_import_only_downward():
    assert not upward_imports(), "an import that runs up the wings:\n" + "\n".join(upward_imports())


def test_the_top_of_areal_like_holds_only_its_named_modules():
    top = {m for m in map(module_name, python_files("areal_like")) if wing_rank(m) == len(WINGS)}
    assert top == TOP_MODULES, "a new module belongs in a wing (or in TOP_MODULES, with a reason)"


def test_wing_check_sees_lazy_relative_and_string_imports(tree):
    sources = {"__init__.py": "", "job_facts.py": "",
               "wire/a.py": "def f():\n    from areal_like.settings import c\n",  # lazy, up
               "net/b.py": "from ..wire import a\nP = 'areal_like.tasks.t:fn'\n",  # a string up
               "settings/c.py": "import areal_like.job_facts\nfrom . import c\n",  # up to the top
               "tasks/t.py": "from areal_like.net import b\n"}  # down
    sources.update({f"{wing}/__init__.py": "" for wing in ("wire", "net", "settings", "tasks")})
    tree({f"areal_like/{name}": text for name, text in sources.items()})
    assert upward_imports() == ["areal_like.net.b -> areal_like.tasks.t",
                                "areal_like.settings.c -> areal_like.job_facts",
                                "areal_like.wire.a -> areal_like.settings.c"]


# ---------------------------------------------------------------- no touching another's privates
# ``from x import _y``, and ``obj._y`` where ``obj`` is not ``self`` or ``cls`` (dunders are not
# private). What is left are other libraries' privates, each for a reason.

ALLOWED_PRIVATES = {
    "areal_like/settings/config.py": {"_get_node"},  # OmegaConf: a key's node without resolving it
    # verifiers: the serving env's interception server, whose per-episode model client run() closes
    "areal_like/tasks/verifiers_env.py": {"_interception"},
    # os._exit: leave at once after the logs are flushed; a marker of ours on logging's root
    "areal_like/daemon.py": {"_exit", "_areal_like_configured"},
    # torch.distributed: a process group over a store we connected, and an NCCL timeout option
    "areal_like/net/distributed.py": {"_new_process_group_helper", "_world", "_timeout"},
    "launch/preflight.py": {"_compile_jinja_template"},  # transformers: how it compiles templates
    "rollout_server/engine/fastpath.py": {"_forward_hooks", "_forward_pre_hooks"},  # torch.nn
    "trainer/model.py": {"_attn_implementation"},  # transformers' attention choice
    # torch op replay; which buffers torch keeps out of a state dict; transformers' buffer
    # initialisation (a model's _init_weights, skipping tensors marked _is_hf_initialized)
    "trainer/sharded_init.py": {"_ops", "_schema", "_base", "_is_view",
                                "_non_persistent_buffers_set", "_init_weights",
                                "_is_hf_initialized"},
    "trainer/step.py": {"_replace"},  # a namedtuple's public method
}


def private_uses(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every private name of another module or object that ``path`` touches."""
    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            out += [(node.lineno, a.name) for a in node.names if private(a.name)]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                out.append((node.lineno, node.attr))
    return sorted(out)


@pytest.mark.parametrize("package", ALL_PACKAGES)
def test_no_module_touches_another_modules_private_names(package):
    violations = []
    for path in python_files(package):
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED_PRIVATES.get(rel, set())
        violations += [f"{rel}:{line} {name}" for line, name in private_uses(path)
                       if name not in allowed]
    assert not violations, "private names of another module or object:\n" + "\n".join(violations)


def test_private_check_sees_both_forms(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from buffer.wal_format import _crc_ok, HEADER\n"
                   "class A:\n    def f(self, other):\n"
                   "        return self._x, cls._y, other._z, self.wal._fd, self.__dict__,"
                   " _local\n")
    assert private_uses(src) == [(1, "_crc_ok"), (4, "_fd"), (4, "_z")]


# ---------------------------------------------------------------- functions at most 60 lines

MAX_FUNCTION_LINES = 60


def long_functions(path: Path) -> list[tuple[int, str, int]]:
    """(line, name, length) of each function over MAX_FUNCTION_LINES (nested ones too)."""
    return [(node.lineno, node.name, node.end_lineno - node.lineno + 1)
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


@pytest.mark.parametrize("package", ALL_PACKAGES)
def test_functions_are_at_most_60_lines(package):
    found = [f"{path.relative_to(ROOT)}:{line} {name} is {n} lines"
             for path in python_files(package) for line, name, n in long_functions(path)]
    assert not found, "\n".join(found)


def test_length_check_sees_a_long_function(tmp_path):
    src = tmp_path / "m.py"
    body = "    x = 1\n" * (MAX_FUNCTION_LINES - 1)
    src.write_text(f"def ok():\n{body}\n@decorated\nasync def long():\n{body}    return x\n")
    assert long_functions(src) == [(63, "long", MAX_FUNCTION_LINES + 1)]
