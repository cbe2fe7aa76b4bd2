"""``trainer.routing_replay=true`` through a whole job (``areal-like run``: buffer, a rollout
server with its embedded engine, the trainer) on a tiny Qwen3-MoE: every trajectory reaches the
trainer with its routes (no group dropped for lacking them) and the job completes its steps,
single-turn and multi-turn (``task.env``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_env
from tests.families import save_family

pytestmark = pytest.mark.slow
ENVS = str(Path(__file__).resolve().parents[1] / "unit")  # tests/unit/agent_envs.py


@pytest.mark.parametrize("steps, overrides", [
    (3, ["experiment=quickstart"]),
    # agent_envs.Chat: three turns an episode, 0.25 + 0.25 + 1 of reward
    (2, ["experiment=guess_env", "task.env=agent_envs:Chat", "task.max_turns=3",
         "task.group_size=2", "buffer.groups_per_step=2", "launch.trainer_ranks=1",
         "launch.num_rollout_servers=1"]),
], ids=["single_turn", "multi_turn"])
def test_a_job_with_routing_replay_trains_on_every_trajectory(tmp_path: Path, steps, overrides):
    moe = save_family("qwen3_moe", tmp_path / "moe")
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "launch.cli", "run", *overrides, "warm_start.steps=0",
         f"model.path={moe}", "model.attn_implementation=sdpa", "trainer.routing_replay=true",
         f"trainer.steps={steps}", f"run_dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=540,
        env=child_env({"PYTHONPATH": os.pathsep.join([ENVS, child_env()["PYTHONPATH"]])}))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_trained"] == steps
    if "task.env=agent_envs:Chat" in overrides:
        assert summary["reward_first"] == 1.5  # three turns each
    records = [json.loads(line) for line in (run_dir / "metrics" / "trainer.jsonl").open()
               if '"groups_dropped_bad_data"' in line]
    assert records and all(r["groups_dropped_bad_data"] == 0 for r in records)
