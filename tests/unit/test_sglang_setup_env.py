"""tests/sglang/setup_env.sh re-uses a complete environment and installs the project into it with
its dependencies (a new one must reach it); a fake ``bin/python`` records the calls."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "sglang" / "setup_env.sh"


def test_a_reused_environment_gets_the_project_with_its_dependencies(tmp_path):
    reqs = re.search(r'^REQS="(.*)"$', SCRIPT.read_text(), re.M).group(1)
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / ".areal-like-sglang-env").write_text(reqs + "\n")
    calls = tmp_path / "calls"
    python = env / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncat > /dev/null\n')  # stdin: the check
    python.chmod(0o755)
    done = subprocess.run(["bash", str(SCRIPT), str(env)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "re-using the complete SGLang environment" in done.stdout
    made = calls.read_text().splitlines()
    assert f"-m pip install --quiet -e {ROOT}[gpu]" in made, made
    assert not any("--no-deps" in c for c in made), made  # would skip a newly added dependency
    assert (env / "bin" / "python").exists()  # re-used, not rebuilt
