"""The README's two install commands and CI's take torch's CPU build from PyTorch's index (PyPI's
pinned torch is the CUDA build); the install itself runs in CI."""

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
