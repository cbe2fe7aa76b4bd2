"""A real job distilled from a teacher: `areal-like run -q` (the real CLI, supervisor and daemons
on loopback; the tiny model from config, no warm start) with ``distill.teachers`` a saved tiny
model directory, which the job serves with its `teacher` engine process. Shown:

* every step's loss saw the teacher on every row (``distill_rows``) and reports the sampled
  reverse KL (``distill_reverse_kl``) among its ``stats``, finite and positive (student and
  teacher are different random models);
* the job completes every step, and nothing is left running (the teacher process included).
"""

from __future__ import annotations

import json
import math

import psutil
import pytest

from tests.conftest import run_cli
from tests.engine_kit import save_model

pytestmark = pytest.mark.slow
STEPS, GROUPS, GROUP_SIZE = 3, 2, 4


@pytest.mark.timeout(600)
def test_a_job_trains_on_its_teachers_logprobs(tmp_path):
    teacher = save_model(tmp_path / "teacher", init_seed=7)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    run_dir = tmp_path / "run"
    r = run_cli("run", "-q", "warm_start.steps=0", f"run_dir={run_dir}",
             "launch.num_rollout_servers=1", "launch.trainer_ranks=1",
             f"trainer.steps={STEPS}", f"buffer.groups_per_step={GROUPS}",
             f"task.group_size={GROUP_SIZE}", "task.temperature=1.0", "eval.at_end=false",
             f"distill.teachers=[{teacher}]", "distill.task_reward_weight=0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["steps"] == STEPS
    steps = [json.loads(line) for line in (run_dir / "metrics" / "trainer.jsonl").read_text()
             .splitlines() if '"distill_rows"' in line]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for s in (step["stats"] for step in steps):
        assert s["distill_rows"] == GROUPS * GROUP_SIZE
        # a sampled estimate of the reverse KL: its sign may go either way between two random
        # models; 0 would mean the teacher's log-probs were the student's own
        assert math.isfinite(s["distill_reverse_kl"]) and s["distill_reverse_kl"] != 0
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
