"""Routing replay end to end on a tiny Qwen3-MoE, CPU, one FSDP2 rank: engine routes over the
wire into ``trainer.routing_replay``. Before any update the trainer's log-probs equal the engine's
either way; after a few the engine-vs-trainer gap is smaller with replay (``-s`` prints it).
Multi-turn (``task.env``) and agent (``task.agent``) episodes: each trajectory carries a route for
every fed position over the wire, the routes the trainer replays are a transformers forward's of
the whole conversation, and a step on them moves the weights."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from tests.families import save_family

STEPS = 3
DTYPE = "bfloat16"
# the guess task's template: the char tokenizer spells it
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{% if m['role'] == "
            "'assistant' %}<eos>{% endif %}|{% endfor %}{% if add_generation_prompt %}assistant:"
            "{% endif %}")


@pytest.fixture(scope="module")
def group():
    from areal_like.settings.config import load_config
    from trainer.model import init_distributed, leave_distributed

    init_distributed(load_config([]).trainer)
    yield
    leave_distributed()


def _sample_groups(engine, n_groups: int = 8, n: int = 4):
    from areal_like.engines.sglang import SGLangClient
    from areal_like.wire import protocol as P
    from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
    from rollout_server.episode import generate_group

    client = SGLangClient(engine.url, local=engine, routed_experts=True)
    rng = np.random.default_rng(0)

    async def one(g: int):
        prompt = [1, *rng.integers(3, 100, size=3 + g).tolist()]
        samples = await generate_group(client, prompt, n, {"temperature": 1.0, "ignore_eos": True},
                                       16, lambda: 0)
        trajs = [Trajectory.of(prompt_ids=as_i32(prompt), output_ids=as_i32(s.output_ids),
                               behav_logp=as_f32(s.logprobs), versions=as_i32(s.versions),
                               reward=float(rng.random()), finish_reason=s.finish_reason,
                               routed_experts=np.frombuffer(s.routes, "<i4"))
                 for s in samples]
        frame = P.encode(P.TrajectoryGroup(group_id=f"s-{g}", server_id="s", lease_id="1",
                                           prompt_index=g, epoch=0, trajectories=trajs))
        return P.decode(frame)  # over the wire

    async def all_groups():
        try:
            return [await one(g) for g in range(n_groups)]
        finally:
            await client.close()
    return asyncio.run(all_groups())


def _gap(policy, batch, settings, replay: bool) -> tuple[float, float]:
    """Mean and largest |trainer - engine| log-prob over the generated tokens."""
    from dataclasses import replace

    from trainer.step import batch_logp

    b = batch if replay else replace(batch, routes=None)
    lp = batch_logp(policy.model, b, settings, policy.device)
    gap = (lp - batch.behav_logp).abs() * batch.mask
    return float(gap.sum() / batch.mask.sum()), float(gap.max())


def test_replay_narrows_the_engine_trainer_gap_of_a_mixture(tmp_path: Path, group):
    from areal_like.settings.config import EngineConfig, ModelConfig, load_config
    from areal_like.weights.routing import route_shape
    from rollout_server.engine.embedded import EmbeddedEngine
    from tests.helpers_trainer import full_state_dict
    from trainer.data import BatchSource, groups_to_batch
    from trainer.model import build_policy
    from trainer.step import StepSettings, train_step

    d = save_family("qwen3_moe", tmp_path / "moe")
    cfg = load_config([f"model.path={d}", "model.attn_implementation=sdpa",
                       "trainer.routing_replay=true", "trainer.lr=1e-4", "trainer.grad_clip=1e9",
                       "buffer.groups_per_step=8", "task.temperature=1.0"])
    policy = build_policy(cfg.model, cfg.trainer)  # fp32, as the trainer computes
    shape = route_shape(policy.model)
    source = BatchSource("inproc://none", 8, wait_s=1, buffer_timeout_s=1, rank=1,
                         route_shape=shape)
    settings = StepSettings.from_config(cfg)
    # the engine serves in bfloat16, as SGLang does: near ties of a router go either way
    engine = EmbeddedEngine(ModelConfig(path=str(d), attn_implementation="sdpa", dtype=DTYPE),
                            EngineConfig(max_running_requests=4)).start()
    gaps = []
    try:
        for version in range(2):
            groups = _sample_groups(engine)
            assert len(source.usable(groups)) == len(groups)  # each trajectory has its routes
            batch = groups_to_batch(groups, shape)
            gaps.append((_gap(policy, batch, settings, True), _gap(policy, batch, settings, False)))
            if version == 0:
                for _ in range(STEPS):
                    train_step(policy, batch, settings, None)
                with torch.no_grad():  # the weight update: the trained weights, in bfloat16
                    engine.model.load_state_dict(full_state_dict(policy.model))
    finally:
        engine.stop()
    for (replayed, free), when in zip(gaps, ("before any update", f"after {STEPS} updates")):
        print(f"\n|trainer - engine| log-prob {when}, mean (max): replay {replayed[0]:.5f} "
              f"({replayed[1]:.4f}), free routing {free[0]:.5f} ({free[1]:.4f})")
        assert replayed[0] < free[0] and replayed[1] < free[1]


def _context(engine, tokenizer, **task):
    """A routed-experts client of ``engine`` and an episode context of a task of ``task``."""
    from areal_like.engines.sglang import SGLangClient
    from areal_like.settings.config import TaskConfig
    from areal_like.tasks.task import make_task
    from rollout_server.episode import EpisodeContext

    client = SGLangClient(engine.url, local=engine, routed_experts=True)
    cfg = TaskConfig(chat_template=TEMPLATE, max_new_tokens=6, max_turns=3, max_episode_tokens=200,
                     temperature=1.0, **task)
    return client, EpisodeContext(client=client, task=make_task(cfg), tokenizer=tokenizer,
                                  rewards=None, task_cfg=cfg, server_id="s",
                                  current_version_fn=lambda: 0)


def _episodes(engine, tokenizer, n_groups: int = 2):
    from areal_like.wire import protocol as P
    from rollout_server.multiturn import EpisodeRunner

    client, ctx = _context(engine, tokenizer, env="tests.unit.agent_envs:Chat", group_size=2)
    runner = EpisodeRunner(ctx)

    async def run():
        try:
            return [P.decode(P.encode(await runner.run_group(
                P.Credit(lease_id=str(g), prompt_index=g, epoch=0, deadline_s=60.0))))
                for g in range(n_groups)]
        finally:
            await client.close()
    return asyncio.run(run())


def _agent_episodes(engine, tokenizer):
    """One agent episode of three calls: the second continues the first (its reply and a new user
    message), the third rewrites the history (a second trajectory of the same episode)."""
    from openai import AsyncOpenAI

    from areal_like.wire import protocol as P
    from rollout_server.agent_endpoint import AgentEndpoint

    client, ctx = _context(engine, tokenizer, name="calc", group_size=1,
                           agent="areal_like.tasks.agents:calc_agent")

    async def run():
        ep = await AgentEndpoint(ctx).start()
        try:
            key, session = ep.open_session(None)
            sdk = AsyncOpenAI(base_url=ep.base_url, api_key=key, max_retries=0)
            user = [{"role": "user", "content": "12*34"}]
            reply = await sdk.chat.completions.create(model="m", messages=user)
            await sdk.chat.completions.create(model="m", messages=user + [
                reply.choices[0].message,
                {"role": "user", "content": "again"}])
            await sdk.chat.completions.create(model="m", messages=[
                {"role": "user", "content": "5*6"}])
            await sdk.close()
            ep.close_session(key)
            trajs = ep.trajectories(session, 0.0, {"turns": 0})
            return P.decode(P.encode(P.TrajectoryGroup(
                group_id="a", server_id="s", lease_id="a", prompt_index=0, epoch=0,
                trajectories=trajs)))
        finally:
            await ep.close()
            await client.close()
    return [asyncio.run(run())]


@pytest.mark.parametrize("episodes", ["multi_turn", "agent"])
def test_multi_turn_routes_are_the_models_and_train(tmp_path: Path, group, episodes):
    from transformers import AutoTokenizer

    from areal_like.settings.config import EngineConfig, ModelConfig, load_config
    from areal_like.weights.hf import build_model
    from areal_like.weights.routing import recording, route_shape
    from rollout_server.engine.embedded import EmbeddedEngine
    from trainer.data import BatchSource, groups_to_batch
    from trainer.model import build_policy
    from trainer.step import StepSettings, train_step

    d = save_family("qwen3_moe", tmp_path / "moe")
    model_cfg = ModelConfig(path=str(d), attn_implementation="sdpa", dtype="float32")
    engine = EmbeddedEngine(model_cfg, EngineConfig(max_running_requests=4)).start()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d))
        groups = (_episodes if episodes == "multi_turn" else _agent_episodes)(engine, tokenizer)
    finally:
        engine.stop()
    # the environment scores every episode alike: other rewards, so that the step has advantages
    groups = [msgspec.structs.replace(g, trajectories=[
        msgspec.structs.replace(t, reward=float(j)) for j, t in enumerate(g.trajectories)])
        for g in groups]
    trajs = [t for g in groups for t in g.trajectories]
    if episodes == "multi_turn":  # several turns each, environment messages between (loss_mask 0)
        assert all(t.metadata["turns"] >= 2 and (t.loss_mask == 0).any() for t in trajs)
    else:  # two calls in the first trajectory, the agent's message between; the rewrite's one
        assert [t.metadata["calls"] for t in trajs] == [2, 1] and (trajs[0].loss_mask == 0).any()

    model = build_model(model_cfg).eval()
    shape = route_shape(model)
    cfg = load_config([f"model.path={d}", "model.attn_implementation=sdpa",
                       "trainer.routing_replay=true", "trainer.lr=1e-3", "trainer.grad_clip=1e9",
                       f"buffer.groups_per_step={len(groups)}"])
    source = BatchSource("inproc://none", len(groups), wait_s=1, buffer_timeout_s=1, rank=1,
                         route_shape=shape)
    assert len(source.usable(groups)) == len(groups)  # every trajectory has its routes
    batch = groups_to_batch(groups, shape)
    for i, t in enumerate(trajs):
        fed = [*t.prompt_ids.tolist(), *t.output_ids.tolist()][:-1]
        with torch.no_grad(), recording(model) as seen:
            model(torch.tensor([fed]))
        np.testing.assert_array_equal(batch.routes[i, :len(fed)].numpy(), seen[0].numpy())

    policy = build_policy(cfg.model, cfg.trainer)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    stats = train_step(policy, batch, StepSettings.from_config(cfg), None)
    assert np.isfinite(float(stats["loss"]))
    assert any(not torch.equal(before[n], p.detach())
               for n, p in policy.model.named_parameters())
