"""LoRA with the real SGLang on CPU: an SGLang server started for a job with ``trainer.lora``
(rollout_server/launch_sglang.py: ``--enable-lora``, the job's rank and target modules, the
``torch_native`` LoRA kernels) gets each version's adapter alone (trainer/weight_local.py's disk
path: a PEFT directory; areal_like/weights/server_sync.py's ``apply_adapter_sync``) and then samples
what the trainer's model WITH that adapter scores, not what the base scores; a second adapter
changes them again; a sync in the middle of a generation labels every token with the adapter that
sampled it.

The server is this module's own (LoRA is a launch flag), started once and stopped by PID."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
import torch
from sglang_kit import PROMPTS, TOL, Server, cpu_engine, engine_logprobs, model_config
from test_sglang_weights import until_decoding

from areal_like.engines.sglang import SGLangClient
from areal_like.settings.config import LoraConfig
from rollout_server.engine_reaper import shm_files
from rollout_server.episode import generate_sample
from rollout_server.launch_sglang import SGLangProcess
from tests.engine_kit import (
    check_guard_probes_the_live_adapter,
    lora_model,
    scored,
    sync_adapter,
)
from trainer.logprob_guard import trainer_logprobs

LORA = LoraConfig(rank=8, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"])
APART = 100 * TOL  # an adapter that moves the log-probs by less would not show it was applied


@pytest.fixture(scope="module")
def lora_server(model_dir, tmp_path_factory):
    key = uuid.uuid4().hex
    log = tmp_path_factory.mktemp("sglang-lora-log") / "sglang.log"
    proc = SGLangProcess(model_config(model_dir), cpu_engine(), log_path=str(log), api_key=key,
                         lora=LORA)
    server = Server(proc=proc.start(), model_dir=model_dir, api_key=key)
    try:
        yield server
    finally:
        server.proc.stop()


def _client(server) -> SGLangClient:
    return SGLangClient(server.url, api_key=server.api_key, timeout_s=120)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_after_an_adapter_sync_sglang_samples_what_the_trainer_with_the_adapter_scores(
    lora_server, temperature
):
    base, first, second = lora_model(LORA, None), lora_model(LORA, 1), lora_model(LORA, 2)
    scale = temperature or 1.0  # greedy: SGLang reports the log-probs at temperature 1

    async def scenario():
        async with _client(lora_server) as client:
            await sync_adapter(client, first, 1)
            outs = await engine_logprobs(client, temperature)
            assert {o.weight_version for o in outs} == {"1"}
            assert scored(outs, first, scale) < TOL, "the engine does not serve the adapter"
            assert scored(outs, base, scale) > APART, "the adapter changed nothing"
            await sync_adapter(client, second, 2)
            again = await engine_logprobs(client, temperature)
            assert {o.weight_version for o in again} == {"2"}
            assert scored(again, second, scale) < TOL, "the engine serves an old adapter"
            assert scored(again, first, scale) > APART

    asyncio.run(scenario())


@pytest.mark.parametrize("pause_mode", ["abort", "retract"])
def test_an_adapter_sync_mid_generation_labels_every_token_with_the_adapter_that_sampled_it(
    lora_server, pause_mode
):
    models = {10: lora_model(LORA, 3), 11: lora_model(LORA, 4)}

    async def scenario():
        async with _client(lora_server) as client:
            await sync_adapter(client, models[10], 10)
            version = 10
            prompt = PROMPTS[0]
            job = asyncio.create_task(generate_sample(
                client, prompt, {"temperature": 1.0, "ignore_eos": True}, 1500, lambda: version))
            await until_decoding(client, 200)
            await sync_adapter(client, models[11], 11, pause_mode=pause_mode)
            version = 11
            return prompt, await job

    prompt, sample = asyncio.run(scenario())
    assert len(sample.output_ids) == 1500 and sample.versions[0] == 10
    assert sample.versions == sorted(sample.versions)
    assert pause_mode == "retract" or sample.versions[-1] == 11  # aborted: resumed under v11
    scores = {v: trainer_logprobs(m, prompt, sample.output_ids, 1.0, torch.device("cpu"))
              for v, m in models.items()}
    worst = max(abs(lp - scores[v][i]) for i, (lp, v) in enumerate(zip(sample.logprobs,
                                                                       sample.versions)))
    assert worst < TOL, f"a token's log-prob differs by {worst:.2e} from its labelled adapter's"


def test_the_logprob_guard_probes_the_adapter_the_engine_serves(lora_server):
    check_guard_probes_the_live_adapter(lora_server, LORA, "sglang")



def test_an_sglang_stopped_while_holding_adapters_leaves_no_shared_memory_file(lora_server):
    """SGLang keeps a loaded adapter's CPU tensors as they arrived, so an adapter sent in shared
    memory stayed mapped by SGLang, and stopping SGLang while it held the live and the retired
    adapter left their ``/dev/shm/torch_*`` files behind. Read from a directory
    (trainer/weight_local.py's disk path), they map no shared-memory file: none is left.
    LAST in the module: it stops the module's server."""
    async def two_syncs() -> None:
        async with _client(lora_server) as client:
            await sync_adapter(client, lora_model(LORA, 6), 20)
            # v20's adapter retired, still loaded
            await sync_adapter(client, lora_model(LORA, 7), 21)

    asyncio.run(two_syncs())
    process = lora_server.proc
    held = {f for f in shm_files(process.proc.pid) - process.shm  # the reaper's: at start
            if os.path.basename(f).startswith("torch_")}
    process.stop()
    left = sorted(f for f in held if os.path.exists(f))
    assert not left, f"SGLang stopped; the shared-memory files of its adapters are left: {left}"
    assert not held, f"SGLang maps shared-memory files of its adapters: {sorted(held)}"
