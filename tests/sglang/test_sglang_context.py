"""The real SGLang against a request over its context: it refuses one whose input plus
``max_new_tokens`` is over the context (HTTP 400, ``_validate_one_request``), which is why an
episode asks for what the context leaves after the prompt (rollout_server/episode.py
``output_room``); the embedded engine cuts the output there instead. SGLang itself ends a request
two tokens short of the context (its scheduler's ``max_req_len``: context - 1, and one more)."""

from __future__ import annotations

import asyncio

import pytest
from sglang_kit import MODEL

from areal_like.settings.config import TaskConfig
from rollout_server.episode import generate_group, output_room
from rollout_server.sglang_client import SGLangClient, SGLangError


def test_a_prompt_with_less_room_than_max_new_tokens_is_refused_and_asked_for_the_room(
        sglang_server):
    context = MODEL["max_position_embeddings"]
    prompt = [1] + [20 + i % 50 for i in range(context - 21)]  # room for 20 output tokens
    task = TaskConfig(max_new_tokens=30)
    sampling = {"temperature": 1.0, "ignore_eos": True}

    async def run():
        async with SGLangClient(sglang_server.url, api_key=sglang_server.api_key,
                                timeout_s=120) as client:
            with pytest.raises(SGLangError) as refused:
                await client.generate(prompt, dict(sampling, max_new_tokens=30))
            budget = output_room(len(prompt), task, context)
            samples = await generate_group(client, prompt, 2, sampling, budget, lambda: 0)
        return refused.value, budget, samples

    refused, budget, samples = asyncio.run(run())
    assert refused.status == 400 and "context length" in refused.message, refused
    assert budget == 20
    assert [len(s.output_ids) for s in samples] == [18, 18]  # context - 2 - prompt
    assert {s.finish_reason for s in samples} == {"length"}
