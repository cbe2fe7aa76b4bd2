"""Routing replay end to end on a tiny Qwen3-MoE, CPU, one FSDP2 rank: engine routes over the
wire into ``trainer.routing_replay``. Before any update the trainer's log-probs equal the engine's
either way; after a few the engine-vs-trainer gap is smaller with replay (``-s`` prints it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.families import save_family

STEPS = 3
DTYPE = "bfloat16"


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
