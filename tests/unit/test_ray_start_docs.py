"""Every documented way to start Ray turns its token authentication on (areal_like/SECURITY.md,
"Ray"): the ``ray start`` lines of launch/RAY.md run after ``export RAY_AUTH_MODE=token`` with the
token in a file, never on a command line, the head's dashboard on loopback; the KubeRay example
sets ``authOptions: {mode: token}`` and declares no Ray Client port. The live check, a client
without the token refused on a cluster started so: tests/integration/test_ray.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def _shell_blocks(text: str) -> list[list[str]]:
    """The commands of each shell block, continuation lines joined."""
    return [block.replace("\\\n", " ").splitlines()
            for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_each_ray_start_of_ray_md_runs_with_a_token_from_a_file():
    starts = 0
    for block in _shell_blocks((LAUNCH / "RAY.md").read_text()):
        exported: dict[str, str] = {}
        for line in block:
            words = shlex.split(line, comments=True)
            if words[:1] == ["export"]:
                exported.update(w.split("=", 1) for w in words[1:])
            if words[:2] == ["ray", "start"]:
                starts += 1
                assert exported.get("RAY_AUTH_MODE") == "token", line
                assert exported.get("RAY_AUTH_TOKEN_PATH"), line
                assert not any("TOKEN" in w for w in words), line  # never on a command line
                if "--head" in words:
                    assert "--dashboard-host=127.0.0.1" in words, line
    assert starts >= 2  # the head and the other nodes


def test_the_kuberay_example_turns_token_authentication_on():
    cluster = yaml.safe_load((LAUNCH / "kuberay" / "rayjob.yaml").read_text())["spec"][
        "rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 10001 not in [p["containerPort"] for p in head["ports"]]  # Ray Client: not served
    for pod in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        env = pod["template"]["spec"]["containers"][0].get("env", [])
        assert not [e for e in env if e["name"].startswith("RAY_AUTH")], env  # KubeRay's to set
