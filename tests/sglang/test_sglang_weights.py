"""Weights and log-probs with the real SGLang: what it samples is what the trainer scores, through
every weight path (distributed over gloo, plain and flattened buckets; tensor, the one-GPU path,
whose payloads on CPU name shared-memory files; from disk), and across a pause in the middle of a
generation (every token's recorded version exact).

The session's server changes weights from test to test; each test first serves the weights it
compares against."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from sglang_kit import (
    PROMPTS,
    TOL,
    assert_served,
    engine_logprobs,
    model_config,
    push_seed,
    save_model,
    seed_plan,
)

from areal_like.engines.sglang import SGLangClient
from areal_like.settings.config import WeightSyncConfig
from areal_like.weights.hf import build_model
from areal_like.weights.push import apply_weight_sync
from areal_like.wire.weight_wire import FLATTENED
from rollout_server.episode import generate_sample
from trainer.logprob_guard import trainer_logprobs
from trainer.weight_local import TensorSender


def _model(seed: int) -> torch.nn.Module:
    return build_model(model_config(init_seed=seed))


def _client(server) -> SGLangClient:
    return SGLangClient(server.url, api_key=server.api_key, timeout_s=120)


async def load_from_disk(client, path: Path, version: int) -> None:
    plan = seed_plan(version, _model(0).state_dict(), 0, "disk", path="disk", payloads=[str(path)])
    done = await apply_weight_sync(client, plan, "s")
    assert done.ok, done.reason
    assert await client.weight_version() == str(version)


@pytest.mark.parametrize("load_format", [FLATTENED, None], ids=["flattened", "plain"])
def test_after_a_distributed_push_the_engine_samples_what_the_trainer_scores(sglang_server,
                                                                             load_format):
    async def scenario():
        async with _client(sglang_server) as client:
            await push_seed(client, 11, seed=3, load_format=load_format)
            for temperature in (1.0, 2.0):
                assert_served(await engine_logprobs(client, temperature), _model(3), temperature)
            # temperature 0 is greedy; its log-probs are at temperature 1
            assert_served(await engine_logprobs(client, 0.0), _model(3), 1.0)

    asyncio.run(scenario())


def test_the_disk_path_serves_an_exported_directory(sglang_server, tmp_path):
    async def scenario():
        async with _client(sglang_server) as client:
            await load_from_disk(client, save_model(tmp_path / "seed5", init_seed=5), 12)
            assert_served(await engine_logprobs(client, 1.0), _model(5), 1.0)

    asyncio.run(scenario())


def test_the_tensor_path_serves_the_trainers_weights(sglang_server):
    model = _model(7)
    state = model.state_dict()
    # only its buckets: a disk plan, which needs no group port
    buckets = seed_plan(13, state, 0, "tensor", path="disk", payloads=["unused"]).buckets
    sender = TensorSender(WeightSyncConfig(), "gloo", 0, "float32")  # rank 0's half of path=tensor
    payloads = sender.payloads(model, 13, buckets, [[state[n] for n in b.names] for b in buckets])
    plan = seed_plan(13, state, 0, "tensor", path="tensor", payloads=payloads)

    async def scenario():
        async with _client(sglang_server) as client:
            done = await apply_weight_sync(client, plan, "s")
            assert done.ok, done.reason
            assert await client.weight_version() == "13"
            assert_served(await engine_logprobs(client, 1.0), model, 1.0)

    try:
        asyncio.run(scenario())
    finally:
        sender.close()


async def until_decoding(client, tokens: int, timeout_s: float = 120) -> None:
    """Until the engine holds ``tokens`` KV slots (a request is well into its decode)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(int(x.get("num_used_tokens") or 0) for x in await client.loads()) >= tokens:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the engine never held {tokens} tokens")


@pytest.mark.parametrize("pause_mode", ["abort", "retract"])
def test_a_push_mid_generation_labels_every_token_with_the_weights_that_sampled_it(sglang_server,
                                                                                   pause_mode):
    prompt, temperature = PROMPTS[0], 1.0

    async def scenario():
        async with _client(sglang_server) as client:
            await push_seed(client, 20, seed=0)
            version = 20
            job = asyncio.create_task(generate_sample(
                client, prompt, {"temperature": temperature, "ignore_eos": True}, 1500,
                lambda: version))
            await until_decoding(client, 200)
            await push_seed(client, 21, seed=1, pause_mode=pause_mode)
            version = 21
            return await job

    sample = asyncio.run(scenario())
    assert len(sample.output_ids) == 1500
    assert sample.versions[0] == 20 and sample.versions[-1] == 21
    assert sample.versions == sorted(sample.versions)
    scored = {v: trainer_logprobs(_model(seed), prompt, sample.output_ids, temperature,
                                  torch.device("cpu")) for v, seed in ((20, 0), (21, 1))}
    worst = max(abs(lp - scored[v][i])
                for i, (lp, v) in enumerate(zip(sample.logprobs, sample.versions)))
    assert worst < TOL, f"a token's log-prob differs by {worst:.2e} from its labelled version's"
