"""A job says when it is not learning, and its models evaluate with the run's settings
(two real jobs with learning_watch_steps=3)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
from system_harness import BASE_OVERRIDES, warm_model

from tests.conftest import run_cli

WARM_CACHE = Path(tempfile.gettempdir()) / "areal-like-test-warmstart"  # shared with test_e2e.py

pytestmark = pytest.mark.slow


def _run(run_dir: Path, reward: str) -> tuple[subprocess.CompletedProcess, dict]:
    r = run_cli("run", "-q", *BASE_OVERRIDES, f"model.path={warm_model(WARM_CACHE)}",
             "warm_start.steps=0", f"run_dir={run_dir}", "trainer.steps=5",
             "launch.num_rollout_servers=1", "launch.trainer_ranks=1",
             "trainer.learning_watch_steps=3", f"task.reward_fn=tests.learning_reward:{reward}")
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_a_run_whose_rewards_are_all_equal_says_it_did_not_learn(tmp_path):
    run_dir = tmp_path / "run"
    r, summary = _run(run_dir, "zero")
    assert summary["ok"] and summary["steps"] == 5  # it ran: the exit code and ok stay
    learning = summary["learning"]
    assert learning["ok"] is False, learning
    assert learning["steps_without_signal"] == learning["longest_run"] == 5, learning
    assert "equal rewards" in learning["reason"] and "OWN_MODEL.md" in learning["what_to_try"]
    assert json.loads((run_dir / "summary.json").read_text())["learning"] == learning
    assert "[run] not learning: no learning signal in 5 of 5 steps" in r.stderr, r.stderr[-3000:]
    log = (run_dir / "logs" / "trainer.log").read_text()
    assert "WARNING" in log and "no learning signal for 3 steps in a row" in log, log[-3000:]


@pytest.mark.timeout(900)
def test_a_learning_run_is_not_flagged_and_its_export_evaluates_with_the_runs_settings(tmp_path):
    run_dir = tmp_path / "run"
    r, summary = _run(run_dir, "reversed_exact")
    assert summary["ok"] and summary["learning"]["ok"] is True, summary
    assert "not learning" not in r.stderr

    checkpoints = run_dir / "checkpoints"
    mine, samples = tmp_path / "mine", tmp_path / "samples.jsonl"
    exported = run_cli("export", str(checkpoints / "v00000005"), str(mine))
    assert exported.returncode == 0, exported.stderr[-3000:]
    # the recorded config chooses settings, not code: the user's reward is named here
    refused = run_cli("eval", str(mine), "eval.max_examples=6")
    assert refused.returncode == 2 and "task.reward_fn=tests.learning_reward:reversed_exact" in (
        refused.stderr), refused.stderr[-3000:]
    e = run_cli("eval", str(mine), "eval.max_examples=6", "eval.k=2", "--samples", str(samples),
             "task.reward_fn=tests.learning_reward:reversed_exact")
    assert e.returncode == 0, e.stderr[-3000:]
    record = json.loads(e.stdout.strip().splitlines()[-1])
    # the run's task and sampling (temperature 2, the quickstart's), from the run's config.yaml
    assert record["policy_version"] == 5 and record["n"] == 6, record
    assert record["sampling"] == {"temperature": 2.0, "top_p": 1.0, "top_k": -1,
                                  "max_new_tokens": 8, "samples_per_prompt": 2,
                                  "from": f"the run's {run_dir / 'config.yaml'}"}, record
    assert "[eval] sampling at temperature 2, top_p 1, top_k -1, at most 8 new tokens" in e.stderr
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(6))
    for row in rows:
        assert row["prompt"] and row["answer"] and len(row["sampled"]) == 2, row
        assert row["greedy"]["reward"] == float(row["greedy"]["response"].strip() == row["answer"])
    assert sum(row["greedy"]["reward"] for row in rows) / 6 == record["greedy_accuracy"]
