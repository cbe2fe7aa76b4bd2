"""LoRA with the real SGLang on GPUs: each version's adapter reaches SGLang over the disk path (a
PEFT directory written by ``trainer.weight_local.DiskSender``, loaded by ``apply_adapter_sync``),
with ``rollout.engine.tp_size`` 1 and, where two GPUs exist, 2 (SGLang then reads the directory on
each TP rank itself). SGLang then samples what the trainer's model WITH that adapter scores, not
what the base scores, and a second adapter replaces the first.

Skips without CUDA (tests/gpu/conftest.py), without ``sglang`` installed, and the tp_size=2 case
with fewer than two GPUs. The CPU version of the same checks is tests/sglang/test_sglang_lora.py;
on a GPU SGLang's own LoRA kernels run (no ``torch_native`` backend) in bfloat16, hence the looser
tolerance and the ratio to the base's distance.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid

import pytest

from areal_like.settings.config import EngineConfig, LoraConfig, ModelConfig, WeightSyncConfig
from rollout_server.launch_sglang import installed_sglang

pytestmark = pytest.mark.skipif(installed_sglang() is None, reason="sglang is not installed")

MODEL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, max_position_embeddings=512, dtype="bfloat16", vocab_size=104)
LORA = LoraConfig(rank=8, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"])
PROMPTS = [[1, 20, 21, 22, 23], [1, 40, 41], [1, 60, 61, 62, 63, 64, 65]]
TOL = 0.1  # bfloat16 weights on both sides, SGLang's LoRA kernels against PEFT's
CLOSER = 5.0  # the served adapter is at least this much closer than the base (or the other adapter)


def _model(seed: int | None):
    """The base (init seed 0) with LORA's adapters: B from ``seed`` (None: PEFT's zero B)."""
    from tests.engine_kit import lora_model

    return lora_model(LORA, seed, ModelConfig(**{**MODEL, "dtype": "float32"}, init_seed=0))


def _scored(outs, model) -> float:
    """The mean difference between the engine's log-probs of its tokens and ``model``'s."""
    import torch

    from trainer.logprob_guard import trainer_logprobs

    diffs = [abs(a - b) for prompt, out in zip(PROMPTS, outs)
             for a, b in zip(out.logprobs, trainer_logprobs(model, prompt, out.output_ids, 1.0,
                                                            torch.device("cpu")))]
    return sum(diffs) / len(diffs)


async def _sync(client, model, version: int) -> None:
    """What a push of ``model``'s adapter as ``version`` gives a rollout server (the disk path)."""
    from areal_like.weights.plan import WeightSyncPlan
    from areal_like.weights.server_sync import apply_adapter_sync
    from trainer.weight_buckets import PushTensors
    from trainer.weight_local import DiskSender
    from trainer.weight_sync import SyncReport, push_buckets

    params = PushTensors(model)
    buckets = push_buckets(params, "bfloat16", bucket_mb=64)
    sender = DiskSender(WeightSyncConfig(path="disk"), "gloo", 0, "bfloat16")
    sender.stage(model, params, buckets, SyncReport(version=version))
    try:
        plan = WeightSyncPlan(policy_version=version, buckets=buckets, backend="gloo",
                              plan_id=uuid.uuid4().hex[:12], deadline_s=300,
                              **sender.route(version, [("gpu", 1)]))
        done = await apply_adapter_sync(client, plan, "gpu", pause_mode="abort")
    finally:
        sender.done()
        sender.close()
    assert done.ok, done.reason
    assert await client.weight_version() == str(version)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_sglang_on_gpus_samples_what_the_adapter_scores(tmp_path, tp_size):
    import torch

    from areal_like.engines.sglang import SGLangClient
    from areal_like.tasks.tokenizer import char_tokenizer
    from areal_like.weights.hf import build_model
    from rollout_server.launch_sglang import SGLangProcess

    if torch.cuda.device_count() < tp_size:
        pytest.skip(f"tp_size={tp_size} needs {tp_size} GPUs ({torch.cuda.device_count()} here)")
    model_dir = tmp_path / "base"
    build_model(ModelConfig(**MODEL, init_seed=0)).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    engine = EngineConfig(kind="sglang", device="cuda", tp_size=tp_size, startup_timeout_s=900,
                          sglang={"mem_fraction_static": 0.3, "skip_server_warmup": True,
                                  "attention_backend": "triton"})
    key = secrets.token_hex(16)  # hex: never starts with "-"
    proc = SGLangProcess(ModelConfig(**MODEL, path=str(model_dir)), engine,
                         log_path=str(tmp_path / "sglang.log"), api_key=key, lora=LORA).start()
    base, first, second = _model(None), _model(1), _model(2)
    sp = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "ignore_eos": True}

    async def scenario():
        async with SGLangClient(proc.url, api_key=key, timeout_s=300) as client:
            await _sync(client, first, 1)
            outs = [await client.generate(p, sp) for p in PROMPTS]
            assert {o.weight_version for o in outs} == {"1"}
            assert _scored(outs, first) < TOL, "the engine does not serve the adapter"
            assert _scored(outs, base) > CLOSER * _scored(outs, first), (
                "the adapter changed nothing")
            await _sync(client, second, 2)
            again = [await client.generate(p, sp) for p in PROMPTS]
            assert {o.weight_version for o in again} == {"2"}
            assert _scored(again, second) < TOL, "the engine serves an old adapter"
            assert _scored(again, first) > CLOSER * _scored(again, second)

    try:
        asyncio.run(scenario())
    finally:
        proc.stop()
