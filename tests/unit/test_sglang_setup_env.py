"""tests/sglang/setup_env.sh's re-use path: a complete environment (its marker names the script's
requirement set) is not rebuilt, and the project is installed into it again WITH its dependencies,
so one added to pyproject.toml after the environment was made (peft was) reaches it. The
environment's ``bin/python`` here records how the script calls it (building a real one takes 11 GB
and minutes); the marker is the script's own requirement line."""

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
