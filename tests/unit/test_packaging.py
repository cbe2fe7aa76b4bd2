"""A non-editable install works: configs/ ships in the wheel as areal_like/configs and
config_dir() finds it there (.ci/run builds and installs the real wheel; this checks the pieces)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("areal_like", "buffer", "launch", "rollout_server", "trainer")


def test_every_package_is_listed_and_configs_ship_inside_areal_like():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for top in TOP_LEVEL for p in (ROOT / top).rglob("__init__.py")}
    assert set(tool["packages"]) == on_disk | {"areal_like.configs"}, (
        "update [tool.setuptools] packages")
    assert tool["package-dir"] == {"areal_like.configs": "configs"}
    patterns = tool["package-data"]["areal_like.configs"]
    shipped = {p for pat in patterns for p in (ROOT / "configs").glob(pat)}
    assert shipped == set((ROOT / "configs").rglob("*.yaml")), (
        "a config group is nested deeper than the patterns")


def test_an_installed_layout_finds_its_packaged_configs(tmp_path):
    """The layout a wheel installs (site/areal_like/configs/...), without the checkout's
    configs/."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "areal_like", site / "areal_like",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", site / "areal_like" / "configs")
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import areal_like, sys\n"
            "from areal_like.settings.config import config_dir, load_config\n"
            "print(areal_like.__file__)\nprint(config_dir())\n"
            "cfg = load_config(['experiment=quickstart'])\n"
            "print(cfg.experiment_name, cfg.task.name)\n")
    env = {k: v for k, v in os.environ.items() if k != "AREAL_LIKE_CONFIG_DIR"}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    module, cdir, composed = r.stdout.strip().splitlines()
    assert Path(module).parent == site / "areal_like"
    assert Path(cdir) == site / "areal_like" / "configs"
    assert composed == "quickstart reverse"


def test_the_installed_libraries_are_the_pinned_ones():
    """pyproject pins transformers and tokenizers to sglang's versions (one set for CPU, CI and
    GPU): the environment the tests run in must have exactly those, or a version skew passes
    unseen."""
    import re
    from importlib.metadata import version

    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(m.groups() for d in deps if (m := re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", d)))
    assert {"transformers", "tokenizers"} <= set(pins)
    installed = {name: version(name) for name in pins}
    assert installed == pins, "reinstall: pip install -e '.[test]' (pyproject.toml's pins changed)"
