"""Real SGLang on a GPU: the rollout server's launcher, client and weight-sync path end to end.

Skips without CUDA (tests/gpu/conftest.py) and when ``sglang`` is not installed. Builds a small
Qwen2 with the char tokenizer into a local model directory (nothing is downloaded), launches
``python -m sglang.launch_server`` through ``SGLangProcess`` with ``engine.sglang`` options passed
through, then: generate with logprobs, pause with a long request in flight (abort + resume), and a
weight update by broadcast from a separate sender process (rank 0) driven by a ``WeightSyncPlan``
through ``apply_weight_sync``. With two GPUs the group uses NCCL (sender on cuda:1); with one,
gloo over CUDA tensors (NCCL cannot put two ranks on one device).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from areal_like.net.distributed import free_port
from areal_like.net.metrics import scrape
from areal_like.settings.config import EngineConfig, ModelConfig
from areal_like.weights.plan import BucketSpec, SyncMember, WeightSyncPlan
from rollout_server.launch_sglang import installed_sglang

# the installed distribution, not find_spec: pytest puts tests/ on sys.path, where tests/sglang/ is
# a namespace package named sglang
pytestmark = pytest.mark.skipif(installed_sglang() is None, reason="sglang is not installed")

REPO = Path(__file__).resolve().parents[2]
MODEL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, max_position_embeddings=512, dtype="bfloat16")
SENDER = (Path(__file__).resolve().parents[1] / "weight_sender.py").read_text()  # group rank 0
KEY = secrets.token_hex(16)  # the job's engine key: the sender's gate asks, a door proves it


@pytest.fixture(scope="module")
def sglang_server(tmp_path_factory):
    from areal_like.tasks.tokenizer import char_tokenizer
    from areal_like.weights.hf import build_model
    from rollout_server.launch_sglang import SGLangProcess

    model_dir = tmp_path_factory.mktemp("tiny-qwen2")
    build_model(ModelConfig(**MODEL)).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    engine_cfg = EngineConfig(kind="sglang", device="cuda", startup_timeout_s=900, sglang={
        "mem_fraction_static": 0.3, "skip_server_warmup": True, "disable_radix_cache": True,
        "enable_metrics": True, "attention_backend": "triton"})
    proc = SGLangProcess(ModelConfig(**MODEL, path=str(model_dir)), engine_cfg,
                         log_path=str(model_dir / "sglang.log")).start()
    try:
        yield proc.url
    finally:
        proc.stop()


def test_generate_pause_resume_and_weight_update_on_real_sglang(sglang_server):
    import torch

    from areal_like.engines.sglang import SGLangClient
    from areal_like.weights.hf import build_model
    from areal_like.weights.push import apply_weight_sync
    from areal_like.weights.server_sync import local_door
    from rollout_server.episode import generate_sample

    two_gpus = torch.cuda.device_count() >= 2
    state = build_model(ModelConfig(**MODEL, init_seed=1)).state_dict()
    names = list(state)
    buckets = [names[: len(names) // 2], names[len(names) // 2:]]
    port, group = free_port(), "gpu_test_weights"
    plan = WeightSyncPlan(
        policy_version=1, group_name=group, master_addr="127.0.0.1", master_port=port, world_size=2,
        backend="nccl" if two_gpus else "gloo", reform=True,
        members=[SyncMember(server_id="gpu", rank_offset=1)],
        buckets=[BucketSpec(names=b, dtypes=["bfloat16"] * len(b),
                            shapes=[list(state[n].shape) for n in b])
                 for b in buckets], deadline_s=300)
    spec = {"model": {**MODEL, "init_seed": 1}, "port": port, "group": group, "buckets": buckets,
            "backend": plan.backend, "device": "cuda:1" if two_gpus else "cuda:0", "timeout_s": 300,
            "key": KEY}

    async def scenario():
        client = SGLangClient(sglang_server, timeout_s=300)
        try:
            await client.health_generate()  # EngineError when it does not generate
            assert await client.weight_version() == "0"
            out = await client.generate([1, 20, 21], {"max_new_tokens": 8, "temperature": 1.0})
            assert (out.finish_reason in ("stop", "length")
                    and len(out.logprobs) == len(out.output_ids) >= 1)
            assert all(lp <= 0 for lp in out.logprobs) and out.weight_version == "0"
            version = 0
            job = asyncio.create_task(generate_sample(client, [1, 30, 31],
                                                      {"temperature": 1.0, "ignore_eos": True},
                                                      400, lambda: version))
            await asyncio.sleep(0.2)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            sender = subprocess.Popen([sys.executable, "-c", SENDER, json.dumps(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                # SGLang joins by torch's own rendezvous: through a door, as its rollout server
                done = await apply_weight_sync(client, plan, "gpu",
                                               door=local_door(client.base_url, KEY))
                _, err = await asyncio.to_thread(sender.communicate, timeout=300)
                assert sender.returncode == 0, err[-2000:]
            finally:
                if sender.poll() is None:
                    sender.kill()
                    sender.wait()
            assert done.ok, done.reason
            version = 1
            sample = await job
            assert len(sample.output_ids) == 400 and sample.finish_reason == "length"
            assert sorted(set(sample.versions)) in ([1], [0, 1])
            assert await client.weight_version() == "1"
            out = await client.generate([1, 20, 21], {"max_new_tokens": 4, "temperature": 1.0})
            assert out.weight_version == "1"
            page = await asyncio.to_thread(scrape, f"{sglang_server}/metrics", 30.0)
            assert any(k.startswith("sglang:num_running_reqs") for k in page)
        finally:
            await client.close()

    asyncio.run(scenario())
