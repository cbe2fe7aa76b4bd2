"""A real job scored by a tiny process reward model (PPO with a critic): each consumed sample's
reward is the sum of its steps' scores recomputed here; reward_mean matches; nothing left running.
"""

from __future__ import annotations

import json

import psutil
import pytest
import torch
from system_harness import warm_model
from test_eval_export import WARM_CACHE

from areal_like.settings.reward_model_schema import RewardModelConfig
from areal_like.weights.hf import save_tokenizer
from benchmarks import reward_model_demo
from rollout_server.reward_model import RewardModel, step_ends
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
STEPS, GROUPS, GROUP_SIZE = 3, 2, 4


@pytest.mark.timeout(600)
def test_a_job_is_rewarded_by_a_saved_process_reward_model_step_by_step(tmp_path):
    torch.manual_seed(0)
    model, tok = reward_model_demo.build("random")
    rm = tmp_path / "rm"
    model.save_pretrained(rm)
    save_tokenizer(tok, rm)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    run_dir = tmp_path / "run"
    r = run_cli("run", "-q", "experiment=quickstart", "loss=ppo_critic", "warm_start.steps=0",
             f"model.path={warm_model(WARM_CACHE)}", f"run_dir={run_dir}",
             "launch.num_rollout_servers=1", "launch.trainer_ranks=1",
             f"trainer.steps={STEPS}", f"buffer.groups_per_step={GROUPS}",
             f"task.group_size={GROUP_SIZE}", "eval.at_end=false",
             "tracking.sample_every=1", f"tracking.sample_k={GROUPS * GROUP_SIZE}",
             f"task.reward_model.path={rm}", "task.reward_model.process=true",
             "task.reward_model.step_delimiter=a")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["steps"] == STEPS

    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in rows}) == list(range(1, STEPS + 1))
    assert len(rows) == STEPS * GROUPS * GROUP_SIZE
    scorer = RewardModel(RewardModelConfig(path=str(rm), process=True, step_delimiter="a"), 60.0)
    try:
        for row in rows:
            ends = step_ends(row["response"], "a")
            want = scorer.scores([row["prompt"] + row["response"][:e] for e in ends])
            tokens = [t for t, _ in row["process_rewards"]]
            assert [v for _, v in row["process_rewards"]] == pytest.approx(want, abs=1e-4), row
            assert tokens == sorted(tokens) and len(tokens) == len(ends), row
            assert row["reward"] == pytest.approx(sum(want), abs=1e-4), row
            assert row["rule_reward"] in (0.0, 1.0)
    finally:
        scorer.close()
    # a warm-started policy answers with letters a-j: some answers have several steps
    assert any(len(row["process_rewards"]) > 1 for row in rows)

    steps = [json.loads(line) for line in (run_dir / "metrics" / "trainer.jsonl").read_text()
             .splitlines() if '"reward_mean"' in line]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for s in steps:
        rewards = [row["reward"] for row in rows if row["step"] == s["step"]]
        assert s["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-4)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
