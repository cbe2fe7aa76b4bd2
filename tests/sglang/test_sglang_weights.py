"""Weights and log-probs with the real SGLang: what it samples is what the trainer scores, through
every weight path (distributed over gloo, plain and flattened buckets; tensor, the one-GPU path,
whose payloads on CPU name shared-memory files; from disk), and across a pause in the middle of a
generation (every token's recorded version exact).

The session's server changes weights from test to test; each test first serves the weights it
compares against."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sglang_kit import MODEL, PROMPTS, TOL, assert_served, engine_logprobs, model_config, save_model

from areal_like.engines.sglang import SGLangClient
from areal_like.net.distributed import free_port
from areal_like.settings.config import WeightSyncConfig
from areal_like.weights.hf import build_model
from areal_like.weights.plan import BucketSpec, SyncMember, WeightSyncPlan
from areal_like.weights.push import apply_weight_sync
from areal_like.weights.server_sync import local_door
from areal_like.wire.weight_wire import FLATTENED
from rollout_server.episode import generate_sample
from trainer.logprob_guard import trainer_logprobs
from trainer.weight_local import TensorSender

REPO = Path(__file__).resolve().parents[2]
SENDER = (REPO / "tests" / "weight_sender.py").read_text()  # group rank 0, as the trainer
def _model(seed: int) -> torch.nn.Module:
    return build_model(model_config(init_seed=seed))


def _client(server) -> SGLangClient:
    return SGLangClient(server.url, api_key=server.api_key, timeout_s=120)


def _plan(
    version: int, state: dict, port: int, group: str, path: str = "distributed", payloads=(),
    engine_ranks: int = 1,
) -> WeightSyncPlan:
    names = list(state)
    buckets = [names[: len(names) // 2], names[len(names) // 2 :]]
    return WeightSyncPlan(
        policy_version=version,
        group_name=group,
        master_addr="127.0.0.1",
        master_port=port,
        world_size=1 + engine_ranks,
        backend="gloo",
        reform=True,
        members=[SyncMember(server_id="s", rank_offset=1)],
        path=path,
        payloads=list(payloads),
        buckets=[
            BucketSpec(
                names=b, dtypes=["float32"] * len(b), shapes=[list(state[n].shape) for n in b]
            )
            for b in buckets
        ],
        deadline_s=120,
    )


async def push(
    client, version: int, seed: int, load_format: str | None = FLATTENED, pause_mode: str = "abort",
    engine_ranks: int = 1,
) -> None:
    """Broadcast the seed-``seed`` model as ``version`` from a sender process (group rank 0) to
    an engine of ``engine_ranks`` (its tp_size)."""
    state = _model(seed).state_dict()
    port, group = free_port(), f"sglang_tier_{version}_{seed}_{os.getpid()}"
    plan = _plan(version, state, port, group, engine_ranks=engine_ranks)
    spec = {
        "model": {**MODEL, "init_seed": seed},
        "world_size": 1 + engine_ranks,
        "port": port,
        "group": group,
        "load_format": load_format,
        "buckets": [b.names for b in plan.buckets],
        "backend": "gloo",
        "timeout_s": 120,
        "key": client.api_key,  # the job's engine key: the engine's door proves it to this gate
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sender = subprocess.Popen(
        [sys.executable, "-c", SENDER, json.dumps(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        done = await apply_weight_sync(
            client,
            plan,
            "s",
            load_format=load_format,
            door=local_door(client.base_url, client.api_key),
            pause_mode=pause_mode,
        )
        _, err = await asyncio.to_thread(sender.communicate, timeout=120)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert done.ok, done.reason
    assert sender.returncode == 0, err[-2000:]
    assert await client.weight_version() == str(version)


async def load_from_disk(client, path: Path, version: int) -> None:
    plan = _plan(version, _model(0).state_dict(), 0, "disk", path="disk", payloads=[str(path)])
    done = await apply_weight_sync(client, plan, "s")
    assert done.ok, done.reason
    assert await client.weight_version() == str(version)


@pytest.mark.parametrize("load_format", [FLATTENED, None], ids=["flattened", "plain"])
def test_after_a_distributed_push_the_engine_samples_what_the_trainer_scores(
    sglang_server, load_format
):
    async def scenario():
        async with _client(sglang_server) as client:
            await push(client, 11, seed=3, load_format=load_format)
            for temperature in (1.0, 2.0):
                assert_served(await engine_logprobs(client, temperature), _model(3), temperature)
            greedy = await engine_logprobs(client, 0.0)
            assert_served(
                greedy, _model(3), 1.0
            )  # temperature 0 is greedy; its log-probs are at temperature 1

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
    buckets = _plan(13, state, 0, "tensor", path="disk", payloads=["unused"]).buckets
    sender = TensorSender(WeightSyncConfig(), "gloo", 0, "float32")  # rank 0's half of path=tensor
    payloads = sender.payloads(model, 13, buckets, [[state[n] for n in b.names] for b in buckets])
    plan = _plan(13, state, 0, "tensor", path="tensor", payloads=payloads)

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
def test_a_push_mid_generation_labels_every_token_with_the_weights_that_sampled_it(
    sglang_server, pause_mode
):
    async def scenario():
        async with _client(sglang_server) as client:
            await push(client, 20, seed=0)
            version = 20
            prompt, temperature = PROMPTS[0], 1.0
            job = asyncio.create_task(
                generate_sample(
                    client,
                    prompt,
                    {"temperature": temperature, "ignore_eos": True},
                    1500,
                    lambda: version,
                )
            )
            await until_decoding(client, 200)
            await push(client, 21, seed=1, pause_mode=pause_mode)
            version = 21
            sample = await job
        assert (
            len(sample.output_ids) == 1500
            and sample.versions[0] == 20
            and sample.versions[-1] == 21
        )
        assert sample.versions == sorted(sample.versions)
        scored = {
            v: trainer_logprobs(
                _model(seed), prompt, sample.output_ids, temperature, torch.device("cpu")
            )
            for v, seed in ((20, 0), (21, 1))
        }
        worst = max(
            abs(lp - scored[v][i])
            for i, (lp, v) in enumerate(zip(sample.logprobs, sample.versions))
        )
        assert worst < TOL, f"a token's log-prob differs by {worst:.2e} from its labelled version's"

    asyncio.run(scenario())
