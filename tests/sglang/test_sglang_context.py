"""The real SGLang against a request over its context: it refuses one whose input plus
``max_new_tokens`` is over the context (HTTP 400, ``_validate_one_request``), which is why an
episode asks for what the context leaves after the prompt (rollout_server/episode.py
``output_room``); the embedded engine cuts the output there instead. SGLang itself ends a request
two tokens short of the context (its scheduler's ``max_req_len``: context - 1, and one more), and
refuses a prompt of ``max_req_input_len`` (``max_req_len`` - 5) tokens or more, which its
``/server_info`` reports: the rollout server reads it and sends no such prompt."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from sglang_kit import MODEL

from areal_like.engines.client import EngineError
from areal_like.engines.sglang import SGLangClient
from areal_like.settings.config import TaskConfig, load_config
from areal_like.tasks.datasets import Example
from areal_like.tasks.task import encode_prompt
from areal_like.tasks.tokenizer import char_tokenizer
from areal_like.wire.group_checks import content_problem
from areal_like.wire.protocol import Credit
from rollout_server.episode import generate_group, output_room, run_episode
from rollout_server.server import RolloutServer


def test_a_prompt_with_less_room_than_max_new_tokens_is_refused_and_asked_for_the_room(
        sglang_server):
    context = MODEL["max_position_embeddings"]
    prompt = [1] + [20 + i % 50 for i in range(context - 21)]  # room for 20 output tokens
    task = TaskConfig(max_new_tokens=30)
    sampling = {"temperature": 1.0, "ignore_eos": True}

    async def run():
        async with SGLangClient(sglang_server.url, api_key=sglang_server.api_key,
                                timeout_s=120) as client:
            with pytest.raises(EngineError) as refused:
                await client.generate(prompt, dict(sampling, max_new_tokens=30))
            budget = output_room(len(prompt), task, context)
            samples = await generate_group(client, prompt, 2, sampling, budget, lambda: 0)
        return refused.value, budget, samples

    refused, budget, samples = asyncio.run(run())
    assert refused.status == 400 and "context length" in refused.message, refused
    assert budget == 20
    assert [len(s.output_ids) for s in samples] == [18, 18]  # context - 2 - prompt
    assert {s.finish_reason for s in samples} == {"length"}


class PromptOf:
    """A task whose every prompt is ``n`` tokens long (the char tokenizer's)."""

    def __init__(self, n: int, cfg: TaskConfig):
        bare = len(encode_prompt(char_tokenizer(), Example(prompt="", answer=""), cfg))
        self.example_ = Example(prompt="a" * (n - bare), answer="")

    def example(self, index, epoch=0):
        return self.example_


class Rewards:
    """RewardPool's scoring calls: every sample scores 0, no reward function reported."""

    async def score_group(self, prompt, texts, example):
        return [(0.0, None)] * len(texts)

    async def score_terms(self, prompt, texts, example):
        return await self.score_group(prompt, texts, example), {}


def test_a_prompt_sglang_refuses_for_its_length_is_not_sent_and_skipped_as_no_room(
        sglang_server, tmp_path):
    """A prompt of context - 6 tokens leaves room by the context, but SGLang refuses it (HTTP
    400): its episode failed, five in a row stopped the rollout server, and its lease, never
    fulfilled, was re-issued at each expiry. The server now reads the engine's limit and the
    prompt's group is refused as ``no_room``, skipped this epoch; one token shorter is served."""
    context = MODEL["max_position_embeddings"]
    server = RolloutServer.from_run(load_config([
        f"run_dir={tmp_path}", f"model.path={sglang_server.model_dir}", "task.name=reverse",
        "task.group_size=2", "rollout.engine.kind=url", f"rollout.engine.url={sglang_server.url}",
        "security.curve=false"]))
    server.tokenizer, server.task, server.rewards = char_tokenizer(), None, Rewards()
    credit = Credit(lease_id="L", prompt_index=0, epoch=0, deadline_s=60.0)

    async def run():
        async with SGLangClient(sglang_server.url, api_key=sglang_server.api_key,
                                timeout_s=120) as client:
            server.client = client
            await server.meet_engine()
            ctx = server.episode_context()
            at = {n: dataclasses.replace(ctx, task=PromptOf(n, ctx.task_cfg))
                  for n in (context - 7, context - 6)}
            with pytest.raises(EngineError) as refused:  # what the server did before
                await run_episode(dataclasses.replace(at[context - 6], max_input=0), credit)
            return (refused.value, await run_episode(at[context - 7], credit),
                    await run_episode(at[context - 6], credit))

    refused, served, skipped = asyncio.run(run())
    assert server.max_input == context - 6
    assert refused.status == 400, refused
    assert content_problem(served, MODEL["vocab_size"], context, 2) is None
    assert {t.finish_reason for t in skipped.trajectories} == {"no_room"}
    assert content_problem(skipped, MODEL["vocab_size"], context, 2) == (
        f"no_room: trajectory 0 has no output tokens: its prompt of {context - 6} tokens "
        "leaves the engine no room to generate")
