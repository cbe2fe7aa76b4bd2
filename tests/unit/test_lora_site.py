"""SGLang-on-CPU LoRA's ``sitecustomize`` unpins once and runs the one it shadows (a fresh
interpreter each: unpinning changes torch process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from areal_like.settings.config import EngineConfig
from rollout_server.launch_sglang import sglang_env
from rollout_server.sglang_cpu import SITE_DIR, STANDIN_DIR, UNPINNED_ENV

CHECK = """
import sys, torch
import rollout_server.sglang_cpu  # the stand-in's import of the package, as in SGLang's process
from rollout_server.sglang_cpu.lora_site import unpin
unpin()
zeros = torch.zeros
print("unpinned", getattr(zeros, "unpinned", False), hasattr(zeros.__wrapped__, "__wrapped__"))
print("pinned ok", torch.zeros(2, pin_memory=True).sum().item(), torch.ones(1).pin_memory().item())
"""


def run(env: dict[str, str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(sys.executable))
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_lora_sitecustomize_unpins_once_and_runs_the_one_it_shadows(tmp_path: Path):
    other = tmp_path / "site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("print('other sitecustomize ran')\n")
    engine = EngineConfig(kind="sglang", sglang={"device": "cpu"})
    env = sglang_env(engine, {**os.environ, "PYTHONPATH": str(other)}, lora=True)
    path = env["PYTHONPATH"].split(os.pathsep)
    assert path[:2] == [str(STANDIN_DIR), str(SITE_DIR)] and path[-1] == str(other)
    assert env[UNPINNED_ENV] == "1"
    lines = run(env)
    assert lines[0] == "other sitecustomize ran"
    assert lines[1:] == ["unpinned True False", "pinned ok 0.0 1.0"]


def test_without_lora_no_sitecustomize_of_this_project_runs(tmp_path: Path):
    engine = EngineConfig(kind="sglang", sglang={"device": "cpu"})
    env = sglang_env(engine, dict(os.environ), lora=False)
    assert str(SITE_DIR) not in env["PYTHONPATH"].split(os.pathsep) and UNPINNED_ENV not in env
    done = subprocess.run([sys.executable, "-c",
                           "import torch; print(hasattr(torch.zeros, 'unpinned'))"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False", done.stderr
