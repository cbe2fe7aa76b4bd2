"""A real job distilled from a teacher (``distill.teachers``: a saved tiny model the job serves
with its ``teacher`` engine process): every step's loss saw the teacher on every row and reports
the sampled reverse KL. Its teacher-0 killed -9: the supervisor restarts it, the rollout server
counts the failed groups and drops them (distill.on_teacher_failure=drop) without restarting, the
job completes, nothing is left, and the engine key never was on the teacher's argv.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from areal_like.net.auth import engine_api_key
from tests.conftest import REPO_ROOT, child_env, live_children, stop_process, wait_until
from tests.engine_kit import save_model

pytestmark = pytest.mark.slow
STEPS, GROUPS, GROUP_SIZE = 8, 2, 4
STARTED = re.compile(r"\[supervisor\] started teacher-0 pid=(\d+)")


def _teachers(err: Path) -> list[int]:
    """The teacher PIDs the supervisor reported starting, in order."""
    return [int(pid) for pid in STARTED.findall(err.read_text())]


@pytest.mark.timeout(600)
def test_a_killed_teacher_is_restarted_and_the_job_finishes(tmp_path):
    teacher = save_model(tmp_path / "teacher", init_seed=7)
    run_dir, err = tmp_path / "run", tmp_path / "stderr.txt"
    before = live_children()
    with err.open("w") as sink:  # -q: the summary line alone on stdout
        job = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "run", "-q", "warm_start.steps=0",
             f"run_dir={run_dir}", "launch.num_rollout_servers=1", "launch.trainer_ranks=1",
             f"trainer.steps={STEPS}", f"buffer.groups_per_step={GROUPS}",
             f"task.group_size={GROUP_SIZE}", "task.temperature=1.0", "eval.at_end=false",
             f"distill.teachers=[{teacher}]", "distill.on_teacher_failure=drop",
             "distill.teacher_timeout_s=20", "distill.task_reward_weight=0.5",
             # a dropped group's prompt is issued again when its lease expires
             "buffer.lease_timeout_s=15"],
            stdout=subprocess.PIPE, stderr=sink, text=True, cwd=REPO_ROOT, env=child_env())
    try:
        first = wait_until(lambda: _teachers(err), 180, what="teacher-0's start")[0]
        # mid-job: a step trained, the teacher answering
        jsonl = run_dir / "metrics" / "trainer.jsonl"
        wait_until(lambda: jsonl.is_file() and '"distill_rows"' in jsonl.read_text(), 240,
                   what="the first step")
        assert psutil.Process(first) in psutil.Process(job.pid).children(recursive=True)
        # it requires the job's engine key, which reached it by the environment, not its argv
        key = engine_api_key(run_dir)
        assert key and key not in " ".join(psutil.Process(first).cmdline())
        os.kill(first, signal.SIGKILL)
        second = wait_until(lambda: _teachers(err)[1:], 120, what="teacher-0's restart")[0]
        assert second != first
        out, _ = job.communicate(timeout=420)
    finally:
        stop_process(job)
    log = err.read_text()
    assert job.returncode == 0, log[-3000:]
    assert re.search(r"\[supervisor\] teacher-0 exited with -9; restart 1/", log), log[-3000:]
    assert "[supervisor] rollout-0 exited" not in log, log[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ok"] and summary["steps"] == STEPS
    # counted by the server (Teacher._failed logs each kind at once), and its group dropped:
    # every step trained on rows the teacher scored
    rollout_log = (run_dir / "logs" / "rollout-0.log").read_text()
    assert "failed on a group (error)" in rollout_log, rollout_log[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics" / "trainer.jsonl").read_text()
             .splitlines() if '"distill_rows"' in line]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for s in (step["stats"] for step in steps):
        assert s["distill_rows"] == GROUPS * GROUP_SIZE
        # a sampled estimate of the reverse KL: its sign may go either way between two random
        # models; 0 would mean the teacher's log-probs were the student's own
        assert math.isfinite(s["distill_reverse_kl"]) and s["distill_reverse_kl"] != 0
    assert live_children() <= before
    assert Path(run_dir / "logs" / "teacher-0.log").read_text().count("---- start ") == 2
