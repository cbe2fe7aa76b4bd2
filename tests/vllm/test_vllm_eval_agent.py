"""Evaluation and the agent endpoint through the vLLM client (areal_like/engines/vllm.py), as a
rollout server with ``rollout.engine.kind=vllm`` runs them: a model the trainer exports, served by
the real vLLM, evaluates greedily as ``areal-like eval`` does on the embedded engine (the same
greedy accuracy and reward over the quickstart's eval prompts); an ``openai``-SDK call to the
agent endpoint records exactly the ids and log-probs vLLM generated, each token with its version.

The server is this module's own (it serves the export), started once and stopped by PID.
Mutation checked (made once, failed its test): the vLLM client dropping ``temperature`` (the
evaluation's greedy prompts sampled at vLLM's default 1.0: greedy accuracy 0.89 against 0.95)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from vllm_kit import Server, cpu_engine, start

from areal_like.engines.vllm import VLLMClient
from areal_like.settings.config import export_yaml, load_config
from areal_like.tasks.tokenizer import load_tokenizer
from areal_like.weights.hf import build_model
from launch.warmstart import ensure_warm_start
from rollout_server.evaluate import ServerEvaluator
from rollout_server.facts import RolloutFacts
from rollout_server.launch_vllm import VLLMProcess
from rollout_server.reward_pool import RewardPool
from trainer.export import export_hf

REPO = Path(__file__).resolve().parents[2]
EVAL = ["experiment=quickstart", "eval.max_examples=128", "eval.k=0"]
# where tests/integration/system_harness.warm_model keeps the quickstart's warm start: the main
# tier trained it already (the same cache key), so it is not trained again here
WARM_CACHE = Path(tempfile.gettempdir()) / "areal-like-test-warmstart" / "warm" / "warmstart"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The quickstart's warm-started model as the trainer exports it, and its config."""
    tmp = tmp_path_factory.mktemp("vllm-export")
    cfg = ensure_warm_start(load_config([*EVAL, f"run_dir={tmp / 'run'}",
                                         f"warm_start.cache_dir={WARM_CACHE}"]), log=lambda m: None)
    export = export_hf(build_model(cfg.model), tmp / "export" / "v00000030", model_cfg=cfg.model,
                       tokenizer=load_tokenizer(cfg.model), shard_mb=64, dtype="float32",
                       task_file=export_yaml(cfg.task))  # `areal-like eval` scores the stored task
    return cfg, Path(export)


@pytest.fixture(scope="module")
def export_server(exported, tmp_path_factory):
    cfg, export = exported
    server: Server = start(VLLMProcess, cpu_engine(), export,
                           tmp_path_factory.mktemp("vllm-export-log") / "vllm.log")
    try:
        yield server
    finally:
        server.proc.stop()


def _client(server) -> VLLMClient:
    return VLLMClient(server.url, api_key=server.api_key, timeout_s=300)


def test_an_export_served_by_vllm_evaluates_like_the_embedded_engine(exported, export_server):
    cfg, export = exported
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    embedded = subprocess.run([sys.executable, "-m", "launch.cli", "eval", str(export), *EVAL],
                              env=env, capture_output=True, text=True, timeout=600)
    assert embedded.returncode == 0, embedded.stderr[-2000:]
    offline = json.loads(embedded.stdout.strip().splitlines()[-1])

    async def on_vllm() -> dict:
        evaluator = ServerEvaluator(RolloutFacts.from_run(cfg), load_tokenizer(cfg.model),
                                    rewards=None)
        evaluator.rewards = rewards = RewardPool(cfg.task, evaluator.reward_path)
        try:
            async with _client(export_server) as client:
                await client.update_weight_version("30")
                return await evaluator.run(client, 30)
        finally:
            rewards.close()

    served = asyncio.run(on_vllm())
    assert served["n"] == offline["n"] == 128
    assert served["greedy_accuracy"] == offline["greedy_accuracy"] > 0.5  # warm-started, not noise
    assert served["greedy_reward"] == offline["greedy_reward"]
    assert served["token_versions"] == [30, 30]


def test_the_agent_endpoint_records_what_vllm_generated(exported, export_server):
    """The calc task's chat template (tests/integration/test_agent_endpoint.py's) on the
    quickstart's char tokenizer: the trajectory's generated ids and log-probs are vLLM's."""
    import yaml
    from openai import AsyncOpenAI

    from areal_like.settings.config import TaskConfig
    from areal_like.tasks.task import make_task
    from rollout_server.agent_endpoint import AgentEndpoint
    from rollout_server.episode import EpisodeContext

    cfg, _ = exported
    tok = load_tokenizer(cfg.model)
    calc = yaml.safe_load((REPO / "configs/task/calc.yaml").read_text())
    task = TaskConfig(name="calc", chat_template=calc["chat_template"], max_new_tokens=24,
                      max_turns=3, max_episode_tokens=200, group_size=1,
                      agent="areal_like.tasks.agents:calc_agent")

    class Recording:  # the rollout server's client, keeping every answer
        def __init__(self, client):
            self.client, self.outs = client, []

        async def generate(self, input_ids, params):
            self.outs.append(out := await self.client.generate(input_ids, params))
            return out

    async def scenario():
        async with _client(export_server) as client:
            await client.update_weight_version("30")
            rec = Recording(client)
            ctx = EpisodeContext(client=rec, task=make_task(task), tokenizer=tok, rewards=None,
                                 task_cfg=task, server_id="s", current_version_fn=lambda: 30)
            ep = await AgentEndpoint(ctx).start()
            try:
                key, session = ep.open_session(None)
                sdk = AsyncOpenAI(base_url=ep.base_url, api_key=key, max_retries=0)
                user = [{"role": "user", "content": "12*34"}]
                reply = await sdk.chat.completions.create(model="m", messages=user)
                await sdk.chat.completions.create(model="m", messages=user + [
                    reply.choices[0].message, {"role": "user", "content": "again"}])
                await sdk.close()
                return ep.trajectories(session, 0.0, {}), rec.outs, reply
            finally:
                await ep.close()

    [traj], outs, reply = asyncio.run(scenario())
    mask = traj.loss_mask == 1
    assert len(outs) == 2 and all(o.output_ids for o in outs)
    assert list(traj.output_ids[mask]) == outs[0].output_ids + outs[1].output_ids
    assert list(traj.behav_logp[mask]) == pytest.approx(outs[0].logprobs + outs[1].logprobs, abs=0)
    assert set(traj.versions[mask]) == {30}
    assert reply.choices[0].message.content == tok.decode(outs[0].output_ids,
                                                          skip_special_tokens=True)
