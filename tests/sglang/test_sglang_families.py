"""The family table's SGLang column (README, "Supported models"): the real SGLang on CPU serves a
tiny random model of each family (tests/families.py, saved as a user's checkpoint) with sampled
log-probs equal to the trainer's, then takes the trainer's weight push (path ``tensor``: the
tensors under the checkpoint's own names, a mixture's experts one by one; trainer/WEIGHT_SYNC.md,
"Names") and samples what the trainer scores for the pushed weights.

One server per family (30-90 s to start), started once and stopped by PID. To keep the tier's
time small it serves the families whose SGLang models differ from the tier's tiny Qwen2: Qwen3,
Qwen3-MoE, Llama 3 and Gemma 3 (tied embeddings, as released: SGLang's Gemma 3 never loads an
``lm_head.weight``, and the preflight refuses an untied one). Not here: Qwen2 (the rest of the
tier serves it), Mistral and GPT-OSS (``NOT_SERVED``, with why)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sglang_kit import assert_served, engine_logprobs, start_server

from areal_like.engines.sglang import SGLangClient
from areal_like.settings.config import ModelConfig, WeightSyncConfig
from areal_like.weights.hf import build_model
from areal_like.weights.plan import SyncMember, WeightSyncPlan
from areal_like.weights.push import apply_weight_sync
from tests.families import FAMILIES, save_family
from trainer.weight_buckets import PushTensors, gather
from trainer.weight_local import TensorSender
from trainer.weight_sync import push_buckets

# family -> why this test does not serve it (tried once each on the pinned SGLang 0.5.23, CPU)
NOT_SERVED = {
    "qwen2": "the rest of the tier serves the quickstart's tiny Qwen2 (test_sglang_weights.py)",
    "mistral": "SGLang's Mistral is its Llama, without a sliding window: past the window its "
               "log-probs differ from the trainer's (1.5 nats with the 8-token window; equal "
               "with a window longer than the sequence, tried once); its Llama is served here",
    "gpt_oss": "SGLang's GptOssForCausalLM refuses to start without a GPU attention backend "
               "(triton, trtllm_mha, fa3, fa4, ..., intel_amx); the CPU tier's is torch_native",
}
SERVED = [f for f in FAMILIES if f not in NOT_SERVED]


def _model(directory, family: str):
    impl = "eager" if family == "gpt_oss" else "sdpa"
    return build_model(ModelConfig(path=str(directory), dtype="float32",
                                   attn_implementation=impl)).eval()


@pytest.fixture(scope="module", params=SERVED)
def served(request, tmp_path_factory):
    family = request.param
    d = save_family(family, tmp_path_factory.mktemp(family))
    server = start_server(d, tmp_path_factory.mktemp(f"{family}-log") / "sglang.log")
    try:
        yield family, d, server
    finally:
        server.proc.stop()


def _push_plan(model, version: int, sender: TensorSender) -> WeightSyncPlan:
    """``WeightBroadcaster.push``'s plan for path ``tensor``: buckets small enough that a fused
    expert parameter falls in two of them."""
    push = PushTensors(model)
    buckets = push_buckets(push, "float32", bucket_mb=0.02)
    tensors = [gather(push, b, "float32") for b in buckets]
    return WeightSyncPlan(
        policy_version=version, group_name="tensor", master_addr="127.0.0.1", master_port=0,
        world_size=1, backend="gloo", reform=False,
        members=[SyncMember(server_id="s", rank_offset=1)], path="tensor",
        payloads=sender.payloads(model, version, buckets, tensors), buckets=buckets,
        deadline_s=120, plan_id=uuid.uuid4().hex[:12])


def test_sglang_serves_the_family_and_takes_the_trainers_push(served, tmp_path):
    family, d, server = served
    pushed = _model(save_family(family, tmp_path / "pushed", seed=1), family)
    sender = TensorSender(WeightSyncConfig(), "gloo", 0, "float32")  # rank 0's half of path=tensor

    async def scenario():
        async with SGLangClient(server.url, api_key=server.api_key, timeout_s=120) as client:
            assert_served(await engine_logprobs(client, 1.0), _model(d, family), 1.0)
            done = await apply_weight_sync(client, _push_plan(pushed, 1, sender), "s")
            assert done.ok, done.reason
            assert await client.weight_version() == "1"
            assert_served(await engine_logprobs(client, 1.0), pushed, 1.0)

    try:
        asyncio.run(scenario())
    finally:
        sender.close()
