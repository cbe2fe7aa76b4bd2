"""The install lines: the README's two commands and CI's script get PyTorch's CPU build of torch
the way PyTorch documents it for pip (its CPU index); from PyPI, a pinned torch is the CUDA build.

The install itself needs a network (or a configured mirror) and minutes, so it runs in CI
(``.ci/run``); this test holds the three lines to one text, so that the README's "exactly what CI
runs" stays true and no line falls back to PyPI's CUDA build."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CPU_TORCH = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def test_every_torch_install_line_takes_the_cpu_build_from_pytorchs_index():
    readme = (ROOT / "README.md").read_text()
    commands = [ln for ln in readme.splitlines()
                if ln.startswith("python3 -m venv .venv") and "torch==" in ln]
    assert len(commands) == 2, commands  # the quickstart and the tests
    for command in commands:
        assert f"&& {CPU_TORCH} &&" in command, command
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if re.search(r"pip install\b.*torch", ln)]
    assert (len(ci) == 1
            and ci[0].endswith(CPU_TORCH.replace("pip install", "pip install --quiet"))), ci
