"""A prompt leaving the engine no room is the prompt's fault: refused as no_room, skipped.

Real single-turn episodes over ZMQ to a BufferService. An empty answer with room is still retried.
The engine's context is min(positions, max_total_tokens).
"""

from __future__ import annotations

import asyncio
import dataclasses

from test_buffer_service import make_cfg, register, running

from areal_like.engines.client import GenerateOutput
from areal_like.engines.sglang import SGLangClient
from areal_like.settings.config import RunConfig, TaskConfig
from areal_like.tasks.task import encode_prompt, make_task
from areal_like.tasks.tokenizer import char_tokenizer
from areal_like.wire import protocol as P
from rollout_server.episode import EpisodeContext, run_episode

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
    """RewardPool's scoring calls: every sample scores 0, no reward function reported."""

    async def score_group(self, prompt, texts, example):
        return [(0.0, None)] * len(texts)

    async def score_terms(self, prompt, texts, example):
        return await self.score_group(prompt, texts, example), {}


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


def test_no_room_is_skipped_at_its_first_refusal_and_no_token_with_room_is_asked_again(
        tmp_path):
    with running(make_cfg(tmp_path, max_staleness=3)) as (_, c):
        register(c)
        first, engine = next_credit(c), SilentEngine()
        ack = c.request(group_for(first, 0, engine))
        assert engine.asked == 0  # never sent
        assert ack.status == "rejected" and ack.reason.startswith(
            "no_room: trajectory 0 has no output tokens: its prompt of "), ack.reason
        s = c.request(P.StatsRequest()).values
        assert (s["rejected_no_room"], s.get("rejected_empty_output"), s["reissue_queue"]) == (
            1, None, 0)
        second = next_credit(c)
        assert second.prompt_index != first.prompt_index  # skipped: the cursor moves on
        ack = c.request(group_for(second, 5, engine))  # room, but the engine answers no token
        assert engine.asked == 2
        assert ack.status == "rejected" and ack.reason.startswith("empty_output:"), ack.reason
        assert next_credit(c).prompt_index == second.prompt_index  # re-issued: the engine's fault
        assert c.request(P.StatsRequest()).values["rejected_empty_output"] == 1


def meet(cfg: RunConfig, engine, kind: str):
    """A rollout server of cfg that met engine as kind (embedded in-process, or by HTTP URL)."""
    from rollout_server.server import RolloutServer

    server = RolloutServer.from_run(cfg)
    server.rcfg = dataclasses.replace(server.rcfg, engine=dataclasses.replace(
        server.rcfg.engine, kind=kind, url=engine.url))
    server.engine = engine if kind == "embedded" else None
    server.tokenizer, server.task, server.rewards = TOK, make_task(CFG), Rewards()

    async def met():
        server.client = SGLangClient(engine.url, local=server.engine)
        try:
            await server.meet_engine()
        finally:
            await server.client.close()
    asyncio.run(met())
    return server


async def episode_on(engine, ctx: EpisodeContext, credit: P.Credit) -> P.TrajectoryGroup:
    ctx.client = SGLangClient(engine.url, local=engine)
    try:
        return await run_episode(ctx, credit)
    finally:
        await ctx.client.close()


def test_a_prompt_over_the_embedded_engines_kv_budget_is_skipped_not_failed(tmp_path):
    """A prompt over the engine's KV budget is not sent (also by URL); the buffer skips it."""
    from rollout_server.engine import EmbeddedEngine

    with running(make_cfg(tmp_path, max_staleness=3)) as (_, c):
        register(c)
        credit = next_credit(c)
        prompt = len(encode_prompt(TOK, make_task(CFG).example(credit.prompt_index,
                                                               credit.epoch), CFG))
        cfg = RunConfig(run_dir=str(tmp_path / "job"), task=CFG)
        cfg.rollout.engine = dataclasses.replace(cfg.rollout.engine, max_total_tokens=prompt)
        assert cfg.model.max_position_embeddings == 256 > prompt
        engine = EmbeddedEngine(cfg.model, cfg.rollout.engine).start()
        try:
            assert engine.context_len == prompt
            assert meet(cfg, engine, "url").max_input == prompt  # read over HTTP
            server = meet(cfg, engine, "embedded")
            assert (server.facts.context, server.max_input) == (prompt, prompt)
            group = asyncio.run(episode_on(engine, server.episode_context(), credit))
        finally:
            engine.stop()
        assert {t.finish_reason for t in group.trajectories} == {"no_room"}
        ack = c.request(group)
        assert ack.status == "rejected" and ack.reason.startswith("no_room:"), ack.reason
        assert next_credit(c).prompt_index != credit.prompt_index  # skipped this epoch
