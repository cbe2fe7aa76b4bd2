"""A learned reward model (``task.reward_model``): the demo trains one that ranks right above
wrong; episodes are scored by it with the rule; timeouts and non-scalar heads."""

from __future__ import annotations

import asyncio

import pytest

from areal_like.engines.client import GenerateOutput
from areal_like.net.metrics import Metrics
from areal_like.settings.config import TaskConfig, load_config
from areal_like.settings.reward_model_schema import RewardModelConfig
from areal_like.tasks.task import encode_prompt, make_task
from areal_like.tasks.tokenizer import char_tokenizer
from areal_like.weights.hf import save_tokenizer
from areal_like.wire.protocol import Credit
from benchmarks import reward_model_demo
from launch.preflight import check_reward_model
from rollout_server.episode import EpisodeContext, run_episode
from rollout_server.reward_model import RewardModel
from rollout_server.reward_pool import RewardPool

TOK = char_tokenizer()


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A reward model trained from random weights for a few seconds, saved as the demo saves it."""
    model, tok, acc = reward_model_demo.train(200, lr=1e-3, init="random", log=lambda _: None)
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return str(out), acc


def test_a_tiny_bradley_terry_model_ranks_right_answers_above_wrong_ones_held_out(rm_dir):
    _, acc = rm_dir  # on 512 held-out pairs (chance: 0.5)
    assert acc >= 0.7


class Engine:
    """Answers sample i with ``answers[i]`` and <eos> (an SGLang stand-in)."""

    def __init__(self, answers: list[str]):
        self.answers = answers

    async def generate_batch(self, inputs, params):
        return [GenerateOutput(rid="r", output_ids=TOK(a, add_special_tokens=False)["input_ids"]
                               + [TOK.eos_token_id], logprobs=[-0.5] * (len(a) + 1),
                               finish_reason="stop", finish_message="", abort_status=None,
                               weight_version="0") for a in self.answers]


def episode(path: str, answers: list[str], timeout_s: float = 30.0, **weights):
    rm_cfg = RewardModelConfig(path=path, **weights)
    cfg = TaskConfig(name="reverse", digits=4, group_size=len(answers), reward_workers=0,
                     reward_timeout_s=timeout_s, reward_model=rm_cfg)
    task, metrics = make_task(cfg), Metrics()
    model = RewardModel(rm_cfg, timeout_s, metrics)
    rewards = RewardPool(cfg, task.reward_path)
    ctx = EpisodeContext(client=Engine(answers), task=task, tokenizer=TOK, rewards=rewards,
                         task_cfg=cfg, server_id="s", current_version_fn=lambda: 0,
                         metrics=metrics, reward_model=model)
    try:
        group = asyncio.run(run_episode(ctx, Credit(lease_id="L", prompt_index=0, epoch=0,
                                                    deadline_s=60.0)))
    finally:
        model.close()
        rewards.close()
    example = task.example(0)
    assert encode_prompt(TOK, example, cfg)  # the prompt the engine was given
    return group, model, metrics, example


def test_an_episode_is_scored_by_the_reward_model_with_the_rule_by_their_weights(rm_dir):
    path, _ = rm_dir
    example = make_task(TaskConfig(name="reverse", digits=4)).example(0)
    right = example.answer
    wrong = right[1:] + right[0]  # rotated: every letter in a wrong place
    group, model, _, _ = episode(path, [right, wrong], weight=2.0, rule_weight=0.5)
    raw = model.scores([example.prompt + right, example.prompt + wrong])
    got = [t.reward for t in group.trajectories]
    assert got == pytest.approx([2 * raw[0] + 0.5, 2 * raw[1]], abs=1e-5)
    assert [t.metadata["rule_reward"] for t in group.trajectories] == [1.0, 0.0]
    assert got[0] > got[1]
    assert all("reward_error" not in t.metadata for t in group.trajectories)


def test_a_reward_model_past_its_timeout_marks_its_samples_as_reward_failures(rm_dir):
    path, _ = rm_dir
    # two forward passes over 3000 tokens each: far past a timeout of a microsecond
    group, _, metrics, _ = episode(path, ["abc" * 1000, "def" * 1000], timeout_s=1e-6,
                                   batch_size=1)
    assert [t.reward for t in group.trajectories] == [0.0, 0.0]
    assert all("task.reward_timeout_s" in t.metadata["reward_error"] for t in group.trajectories)
    assert 'rollout_reward_failures_total{kind="model_timeout"} 2.0' in metrics.render().decode()


@pytest.mark.parametrize("process", [[], ["task.reward_model.process=true",
                                          "task.reward_model.step_delimiter=|"]])
def test_a_reward_model_whose_head_is_not_scalar_is_refused_before_start(tmp_path, process):
    model, tok = reward_model_demo.build("random")
    model.config.num_labels = 2
    model.save_pretrained(tmp_path)
    save_tokenizer(tok, tmp_path)
    cfg = load_config([f"task.reward_model.path={tmp_path}", *process])
    [line] = check_reward_model(cfg)
    assert "num_labels=2" in line and "must be scalar (num_labels=1)" in line
    assert check_reward_model(load_config([])) == []


class LetterChecker:
    """Scores 1 per answer letter mirroring the prompt's (``every``), or the last letter's only."""

    def __init__(self, every: bool):
        self.every = every

    def __call__(self, input_ids, attention_mask):
        # <bos> "rev:" s "=" answer, 6 letters each
        s, answer = input_ids[:, 5:11], input_ids[:, 12:18]
        hits = answer == s.flip(1)
        score = hits.sum(1) if self.every else hits[:, -1]
        return type("Out", (), {"logits": score.float()[:, None]})()


def test_substitution_accuracy_finds_a_model_that_reads_only_the_last_letter():
    assert reward_model_demo.substitution_accuracy(LetterChecker(True), TOK, n=32) == [1.0] * 6
    assert reward_model_demo.substitution_accuracy(LetterChecker(False), TOK, n=32) == \
        [0.0] * 5 + [1.0]


def test_the_demo_reward_model_takes_more_decoder_blocks():
    model, _ = reward_model_demo.build("random", layers=3)
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
