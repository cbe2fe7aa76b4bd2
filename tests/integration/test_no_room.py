"""A prompt that leaves the engine no room to generate is the prompt's fault: the buffer refuses
its group as ``no_room`` and skips the prompt this epoch at the first refusal, where before it
was ``empty_output``, an engine fault, and the prompt was leased ``MAX_ENGINE_RETRIES`` (3) times
an epoch. An engine that answers no token for a prompt that had room is still asked again.

The groups are made by the real single-turn episode (``rollout_server/episode.py``) and sent over
a real ZMQ socket to a running BufferService (``test_buffer_service.py``).

Mutation checked: with ``no_room`` left out of ``group_checks.REASONS`` the skip test fails (the
prompt comes back), and with every empty trajectory read as ``no_room`` the retry test fails.
"""

from __future__ import annotations

import asyncio

from test_buffer_service import make_cfg, register, running

from areal_like.settings.config import TaskConfig
from areal_like.tasks.task import encode_prompt, make_task
from areal_like.tasks.tokenizer import char_tokenizer
from areal_like.wire import protocol as P
from rollout_server.episode import EpisodeContext, run_episode
from rollout_server.sglang_client import GenerateOutput

TOK = char_tokenizer()
CFG = TaskConfig(name="reverse", group_size=2, max_new_tokens=8)


class SilentEngine:
    """An engine that ends every request at once without a token (a broken engine)."""

    def __init__(self):
        self.asked = 0

    async def generate_batch(self, inputs, params):
        self.asked += len(inputs)
        return [GenerateOutput(rid="r", output_ids=[], logprobs=[], finish_reason="stop",
                               finish_message="", abort_status=None, weight_version="0")
                for _ in inputs]


class Rewards:
    async def score_group(self, prompt, texts, example):
        return [(0.0, None)] * len(texts)


def group_for(credit: P.Credit, room: int, engine: SilentEngine) -> P.TrajectoryGroup:
    """The episode of ``credit`` on an engine whose context leaves ``room`` after the prompt."""
    task = make_task(CFG)
    prompt = len(encode_prompt(TOK, task.example(credit.prompt_index, credit.epoch), CFG))
    ctx = EpisodeContext(client=engine, task=task, tokenizer=TOK, rewards=Rewards(),
                         task_cfg=CFG, server_id="s0", current_version_fn=lambda: 0,
                         context=prompt + room)
    return asyncio.run(run_episode(ctx, credit))


def next_credit(client) -> P.Credit:
    return client.request(P.CreditRequest(server_id="s0", max_credits=1)).credits[0]


def test_a_prompt_that_leaves_no_room_is_skipped_at_its_first_refusal(tmp_path):
    with running(make_cfg(tmp_path, max_staleness=3)) as (_, c):
        register(c)
        first, engine = next_credit(c), SilentEngine()
        ack = c.request(group_for(first, 0, engine))
        assert engine.asked == 0  # never sent
        assert ack.status == "rejected" and ack.reason.startswith(
            "no_room: trajectory 0 has no output tokens: its prompt of "), ack.reason
        assert next_credit(c).prompt_index != first.prompt_index  # skipped: the cursor moves on
        s = c.request(P.StatsRequest()).values
        assert (s["rejected_no_room"], s.get("rejected_empty_output"), s["reissue_queue"]) == (
            1, None, 0)


def test_an_engine_that_answers_no_token_for_a_prompt_with_room_is_asked_again(tmp_path):
    with running(make_cfg(tmp_path, max_staleness=3)) as (_, c):
        register(c)
        first, engine = next_credit(c), SilentEngine()
        ack = c.request(group_for(first, 5, engine))
        assert engine.asked == 2
        assert ack.status == "rejected" and ack.reason.startswith("empty_output:"), ack.reason
        assert next_credit(c).prompt_index == first.prompt_index  # re-issued: the engine's fault
        assert c.request(P.StatsRequest()).values["rejected_empty_output"] == 1
