"""Single-turn episodes and evals ask for at most what the context leaves (output_room)."""

from __future__ import annotations

import asyncio

import pytest

from areal_like.engines.client import EngineError, GenerateOutput
from areal_like.settings.config import EvalConfig, RunConfig, TaskConfig
from areal_like.tasks.task import encode_prompt, make_task
from areal_like.tasks.tokenizer import char_tokenizer
from areal_like.wire.group_checks import content_problem
from areal_like.wire.protocol import Credit
from rollout_server.episode import EpisodeContext, run_episode
from rollout_server.evaluate import evaluate
from rollout_server.facts import RolloutFacts
from rollout_server.server import RolloutServer

TOK = char_tokenizer()


class ContextEngine:
    """Refuses what SGLang refuses over ``context``; answers token 5 ``max_new_tokens`` times."""

    def __init__(self, context: int):
        self.context, self.asked = context, []

    async def generate(self, input_ids, params):
        n, new = len(input_ids), params["max_new_tokens"]
        self.asked.append((n, new))
        if n >= self.context or n + new > self.context:
            raise EngineError("/generate", 400, f"{n} input + {new} new tokens exceed the "
                              f"model's context length ({self.context} tokens)")
        return GenerateOutput(rid="r", output_ids=[5] * new, logprobs=[-0.5] * new,
                              finish_reason="length", finish_message="", abort_status=None,
                              weight_version="0")

    async def generate_batch(self, inputs, params):
        return [await self.generate(i, p) for i, p in zip(inputs, params)]


class Rewards:
    """RewardPool's scoring calls: every sample scores 0, no reward function reported."""

    async def score_group(self, prompt, texts, example):
        return [(0.0, None)] * len(texts)

    async def score_terms(self, prompt, texts, example):
        return await self.score_group(prompt, texts, example), {}


def episode(prompt_room: int, over: int | None = None):
    """One group of 2 on an engine leaving prompt_room after the prompt and, unless over is None,
    refusing inputs of prompt + over tokens or more (SGLang's max_req_input_len)."""
    cfg = TaskConfig(name="reverse", group_size=2, max_new_tokens=8)
    task = make_task(cfg)
    prompt = len(encode_prompt(TOK, task.example(0), cfg))
    engine = ContextEngine(prompt + prompt_room)
    ctx = EpisodeContext(client=engine, task=task, tokenizer=TOK, rewards=Rewards(),
                         task_cfg=cfg, server_id="s", current_version_fn=lambda: 0,
                         context=engine.context, max_input=0 if over is None else prompt + over)
    group = asyncio.run(run_episode(ctx, Credit(lease_id="L", prompt_index=0, epoch=0,
                                                deadline_s=60.0)))
    return group, engine, prompt


@pytest.mark.parametrize("room, over, asked", [
    (5, None, 5),  # what the context leaves after the prompt
    (50, None, 8),  # room to spare: the task's budget
    (0, None, 0),  # no room: not sent, refused as no_room
    (5, 0, 0),  # the engine refuses an input this long: not sent either
    (5, 1, 5),  # one token shorter: sent
])
def test_an_episode_asks_for_what_the_context_leaves_and_sends_no_prompt_without_room(
        room, over, asked):
    group, engine, prompt = episode(prompt_room=room, over=over)
    why = content_problem(group, TOK.vocab_size, engine.context, 2)
    if asked:
        assert engine.asked == [(prompt, asked)] * 2
        assert [t.n_tokens for t in group.trajectories] == [asked] * 2
        assert {t.finish_reason for t in group.trajectories} == {"length"} and why is None
    else:
        assert engine.asked == []
        assert {t.finish_reason for t in group.trajectories} == {"no_room"}
        assert why is not None and why.startswith("no_room:")


def test_an_evaluation_asks_for_what_the_context_leaves_and_skips_a_prompt_without_room():
    cfg = TaskConfig(name="reverse", max_new_tokens=8)
    examples = [make_task(cfg).example(i) for i in range(4)]
    engine = ContextEngine(10)
    lengths = iter([4, 12, 7, 6])  # room for 6, none, and on SGLang (max_input 7) none, then 4

    async def run():
        return await evaluate(engine, examples, lambda ex: [1] * next(lengths), str, Rewards(),
                              EvalConfig(k=1), cfg, [], lambda: 0, context=engine.context,
                              max_input=7, concurrency=1)

    figures = asyncio.run(run())
    assert engine.asked == [(4, 6), (4, 6), (6, 4), (6, 4)]  # greedy and one sample each
    assert (figures["n"], figures["no_room"], "errors" in figures) == (2, 2, False)


def test_the_rollout_server_knows_the_context_it_serves():
    facts = RolloutFacts.from_run(RunConfig(run_dir="/nonexistent"))
    assert facts.context == 256 == facts.model.max_position_embeddings


def test_the_rollout_server_reads_the_input_limit_sglang_reports():
    """/server_info's max_req_input_len reaches every episode and eval; none: no limit."""
    class Engine:
        def __init__(self, info: dict):
            self.info = info

        async def weight_version(self):
            return "default"

        async def server_info(self):
            return self.info

    for info, limit in (({"max_req_input_len": 4090, "tp_size": 1}, 4090), ({}, 0)):
        server = RolloutServer.from_run(RunConfig(run_dir="/nonexistent"))
        server.rcfg.engine.kind = "url"
        server.client, server.tokenizer, server.task, server.rewards = Engine(info), TOK, None, None
        asyncio.run(server.meet_engine())
        assert server.episode_context().max_input == limit == server.max_input
