"""LoRA with the real vLLM on CPU: a vLLM started for a job with ``trainer.lora``
(rollout_server/launch_vllm.py: ``--enable-lora``, the job's rank rounded up to one vLLM takes,
runtime adapter loading) gets each version's adapter alone (trainer/weight_local.py's disk path:
a PEFT directory; areal_like/weights/server_sync.py's ``apply_adapter_sync``, vLLM's abort pause)
and then samples what the trainer's model WITH that adapter scores, not what the base scores; a
second adapter changes them again; a sync in the middle of a generation labels every token with
the adapter that sampled it; the log-prob guard's probe naming the live adapter measures it.

The server is this module's own (LoRA is a launch flag), started once and stopped by PID.
Mutations checked (each made once, each failed its test): generate calls not naming the adapter
(``model`` left out: the base answered, 0.75 nats off)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
from test_vllm_weights import TOKENS, mid_generation, until_generated
from vllm_kit import PROMPTS, TOL, Server, cpu_engine, engine_logprobs, model_config

from areal_like.engines.vllm import VLLMClient
from areal_like.settings.config import LoraConfig
from rollout_server.episode import generate_sample
from rollout_server.launch_vllm import VLLMProcess
from tests.engine_kit import (
    check_guard_probes_the_live_adapter,
    lora_model,
    scored,
    sync_adapter,
)
from trainer.logprob_guard import trainer_logprobs

LORA = LoraConfig(rank=4, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"])
APART = 100 * TOL  # an adapter that moves the log-probs by less would not show it was applied


@pytest.fixture(scope="module")
def lora_server(model_dir, tmp_path_factory):
    key = uuid.uuid4().hex
    log = tmp_path_factory.mktemp("vllm-lora-log") / "vllm.log"
    proc = VLLMProcess(model_config(model_dir), cpu_engine(), log_path=str(log), api_key=key,
                       lora=LORA)
    server = Server(proc=proc.start(), model_dir=model_dir, api_key=key)
    try:
        yield server
    finally:
        server.proc.stop()


def _client(server) -> VLLMClient:
    return VLLMClient(server.url, api_key=server.api_key, timeout_s=300)


def test_after_an_adapter_sync_vllm_samples_what_the_trainer_with_the_adapter_scores(lora_server):
    base, first, second = lora_model(LORA, None), lora_model(LORA, 1), lora_model(LORA, 2)

    async def scenario():
        async with _client(lora_server) as client:
            await sync_adapter(client, first, 1)
            for temperature, scale in ((1.0, 1.0), (0.7, 0.7), (0.0, 1.0)):  # greedy: at 1
                outs = await engine_logprobs(client, temperature)
                assert {o.weight_version for o in outs} == {"1"}
                assert scored(outs, first, scale) < TOL, "the engine does not serve the adapter"
                assert scored(outs, base, scale) > APART, "the adapter changed nothing"
            await sync_adapter(client, second, 2)
            again = await engine_logprobs(client, 1.0)
            assert {o.weight_version for o in again} == {"2"}
            assert scored(again, second, 1.0) < TOL, "the engine serves an old adapter"
            assert scored(again, first, 1.0) > APART

    asyncio.run(scenario())


def test_an_adapter_sync_mid_generation_labels_every_token_with_the_adapter_that_sampled_it(
    lora_server
):
    prompt, built = PROMPTS[0], {}  # per attempt: its versions' models (PEFT draws A at random)

    async def scenario(attempt: int):
        before, after = 10 + 2 * attempt, 11 + 2 * attempt
        built[attempt] = {before: lora_model(LORA, 3), after: lora_model(LORA, 4)}
        async with _client(lora_server) as client:
            await sync_adapter(client, built[attempt][before], before)
            version, job = before, None
            load = client.load_lora_adapter

            async def load_then_generate(*args, **kwargs):
                # the generation starts once the new adapter is loaded (seconds on a loaded
                # machine) and before the sync names it, so the pause that follows catches it
                nonlocal job
                await load(*args, **kwargs)
                job = asyncio.create_task(generate_sample(
                    client, prompt, {"temperature": 1.0, "ignore_eos": True}, TOKENS,
                    lambda: version))
                await until_generated(client, 20, job)

            client.load_lora_adapter = load_then_generate
            await sync_adapter(client, built[attempt][after], after)
            version = after
            return await job

    attempt, sample = mid_generation(scenario)
    models = built[attempt]
    assert len(sample.output_ids) == TOKENS and sample.versions[0] == min(models)
    assert sample.versions == sorted(sample.versions) and sample.versions[-1] == max(models)
    scores = {v: trainer_logprobs(m, prompt, sample.output_ids, 1.0, torch.device("cpu"))
              for v, m in models.items()}
    worst = max(abs(lp - scores[v][i]) for i, (lp, v) in enumerate(zip(sample.logprobs,
                                                                       sample.versions)))
    assert worst < TOL, f"a token's log-prob differs by {worst:.2e} from its labelled adapter's"


def test_the_logprob_guard_probes_the_adapter_the_engine_serves(lora_server):
    check_guard_probes_the_live_adapter(lora_server, LORA, "vllm")

