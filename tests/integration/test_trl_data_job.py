"""A TRL conversational dataset and TRL-style rewards (batched, per-sample, weighted) in a job;
ambiguous data is refused before start, naming the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from areal_like.tasks.tokenizer import char_tokenizer
from tests.conftest import child_env

pytestmark = pytest.mark.slow

SUMS = [(12, 34), (90, 11), (5, 7), (40, 2)]
ROWS = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}
        for a, b in SUMS]
REWARDS = "tests.unit.trl_reward_fns"  # on the job's PYTHONPATH (child_env), readable by workers
SHORT = ["experiment=quickstart", "warm_start.steps=0", "task=dataset", "trainer.steps=2",
         "task.max_new_tokens=8", "task.group_size=4", "buffer.groups_per_step=2",
         "launch.num_rollout_servers=1", "launch.trainer_ranks=1", "eval.at_end=false",
         "tracking.sample_every=1", "launch.health_timeout_s=180"]


def _run(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "run", "-q", *args], cwd=cwd,
                          env=child_env(), capture_output=True, text=True, timeout=timeout)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(900)
def test_a_trl_conversational_dataset_trains_with_weighted_trl_rewards(tmp_path):
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_dir = tmp_path / "run"
    done = _run(tmp_path, *SHORT, f"task.dataset_path={data}", f"run_dir={run_dir}",
                f"task.reward_fn=[{REWARDS}:length_parity,{REWARDS}:exact]",
                "task.reward_weights=[0.5,2.0]")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps_trained"] == 2

    templated = {char_tokenizer().apply_chat_template(r["prompt"], add_generation_prompt=True,
                                                      tokenize=False) for r in ROWS}
    assert templated == {f"user: {a}+{b}=\nassistant: " for a, b in SUMS}
    samples = _jsonl(run_dir / "samples.jsonl")
    assert samples and {s["prompt"] for s in samples} <= templated
    for s in samples:
        parity, exact = s["rewards"]["length_parity"], s["rewards"]["exact"]
        assert parity in (0.0, 1.0) and exact in (0.0, 1.0), s  # -10: TRL's shapes were not met
        assert s["reward"] == pytest.approx(0.5 * parity + 2.0 * exact), s

    steps = [r for r in _jsonl(run_dir / "metrics" / "trainer.jsonl") if "stats" in r]
    assert len(steps) == 2
    for r in steps:
        assert set(r["rewards"]) == {"length_parity", "exact"}
        assert all(0.0 <= v <= 1.0 for v in r["rewards"].values())


def test_ambiguous_data_is_refused_before_start(tmp_path):
    both = tmp_path / "both.jsonl"
    both.write_text("".join(json.dumps({**r, "messages": r["prompt"]}) + "\n" for r in ROWS))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n"
                     + json.dumps(ROWS[0]) + "\n")
    for data, says in ((both, "error: task.messages_key: "), (mixed, "error: task.prompt_key=")):
        run_dir = tmp_path / f"run-{data.stem}"
        done = _run(tmp_path, *SHORT, f"task.dataset_path={data}", f"run_dir={run_dir}",
                    timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.startswith(says), done.stderr
        assert not (run_dir / "logs").exists()  # no daemon started
