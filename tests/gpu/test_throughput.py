"""Throughput of a 0.5B-shaped random model on one GPU (marker gpu; skipped without CUDA).

The model has Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, vocab 151936,
tied embeddings) and random weights, in bf16: nothing is downloaded. Three figures, each recorded
with the ``figure`` fixture for tests/gpu/RESULTS.md:

* ``generated_tokens_per_s``: the embedded engine on CUDA, ``BATCH`` concurrent requests of
  ``NEW_TOKENS`` tokens each (``ignore_eos``), after one warm-up request;
* ``trained_tokens_per_s``: one FSDP2 bf16 ``train_step`` (world size 1) over ``GROUPS`` x
  ``GROUP_SIZE`` sequences of ``PROMPT + NEW_TOKENS`` tokens, after a warm-up step;
* ``weight_sync_s``: one weight sync of the whole model in the trainer's wire format (flattened
  bf16 buckets, ``tests/weight_sender.py``) into that engine over gloo on CUDA tensors, the path a
  one-GPU machine uses when NCCL cannot put two ranks on one device.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from areal_like.config import EngineConfig, ModelConfig
from areal_like.distributed import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_engine_cuda import HTTP_TIMEOUT_S, post  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
BATCH, PROMPT, NEW_TOKENS = 64, 64, 256
GROUPS, GROUP_SIZE = 4, 8
BUCKET_BYTES = 256 * 1024 * 1024

TRAIN_WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from areal_like.config import load_config
from areal_like.protocol import TrajectoryGroup
from areal_like.trajectory import Trajectory
from trainer.data import groups_to_batch
from trainer.model import build_policy, init_distributed
from trainer.step import StepSettings, compute_batch_advantages, recompute_prox_logp, train_step

spec = json.loads(sys.argv[2])
rng = np.random.default_rng(0)
groups = [TrajectoryGroup(group_id=f"g{g}", server_id="s", lease_id=str(g), prompt_index=g, epoch=0, trajectories=[
    Trajectory.of(prompt_ids=rng.integers(4, 100, spec["prompt"]), output_ids=rng.integers(4, 100, spec["new"]),
                  behav_logp=-rng.random(spec["new"]) * 5, versions=np.zeros(spec["new"], np.int32),
                  reward=float(i % 2), finish_reason="length") for i in range(spec["group_size"])])
          for g in range(spec["groups"])]
batch = groups_to_batch(groups)
cfg = load_config(["trainer.device=cuda", "model.dtype=bfloat16", "trainer.micro_batch_size=8",
                   *[f"model.{k}={v}" for k, v in spec["shape"].items()]])
init_distributed(cfg.trainer)
policy = build_policy(cfg.model, cfg.trainer)
s = StepSettings.from_config(cfg)
times = []
for _ in range(2):  # the first step warms up kernels and the allocator
    torch.cuda.synchronize(); t0 = time.perf_counter()
    stats = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s), compute_batch_advantages(batch, s))
    torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
tokens = sum(len(t.prompt_ids) + len(t.output_ids) for g in groups for t in g.trajectories)
print("RESULT " + json.dumps({"tokens": tokens, "seconds": times[-1], "loss": stats["loss"]}), flush=True)
"""


def model_cfg(seed: int = 0) -> ModelConfig:
    return ModelConfig(**SHAPE, dtype="bfloat16", init_seed=seed)


@pytest.fixture(scope="module")
def engine():
    from rollout_server.engine import EmbeddedEngine

    e = EmbeddedEngine(model_cfg(), EngineConfig(device="cuda", max_running_requests=BATCH,
                                                 max_total_tokens=BATCH * (PROMPT + NEW_TOKENS))).start()
    try:
        yield e
    finally:
        e.stop()


def test_generated_tokens_per_second(engine, figure):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 100, (PROMPT,), generator=g).tolist() for _ in range(BATCH)]
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 1.0, "ignore_eos": True}
    assert post(engine.url, "/generate", {"input_ids": prompts[0], "sampling_params": params})[0] == 200  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(BATCH) as pool:
        outs = list(pool.map(lambda p: post(engine.url, "/generate", {"input_ids": p, "sampling_params": params}),
                             prompts))
    seconds = time.perf_counter() - t0
    assert all(status == 200 for status, _ in outs), [body for status, body in outs if status != 200][:1]
    tokens = sum(len(body["output_ids"]) for _, body in outs)
    assert tokens == BATCH * NEW_TOKENS
    figure("generated_tokens_per_s", tokens / seconds, "tokens/s")


def test_trained_tokens_per_second(figure):
    spec = {"shape": SHAPE, "prompt": PROMPT, "new": NEW_TOKENS, "groups": GROUPS, "group_size": GROUP_SIZE}
    proc = subprocess.run([sys.executable, "-c", TRAIN_WORKER, str(REPO), json.dumps(spec)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert res["tokens"] == GROUPS * GROUP_SIZE * (PROMPT + NEW_TOKENS) and res["loss"] == res["loss"]
    figure("trained_tokens_per_s", res["tokens"] / res["seconds"], "tokens/s")


def test_weight_sync_seconds(engine, figure):
    from areal_like.protocol import SyncMember, WeightSyncPlan
    from rollout_server.sglang_client import SGLangClient
    from rollout_server.weight_update import apply_weight_sync
    from trainer.weight_buckets import plan_buckets

    named = [(n, list(p.shape)) for n, p in engine.model.named_parameters()]
    buckets = plan_buckets([(n, s, "bfloat16") for n, s in named], BUCKET_BYTES)
    port, group = free_port(), "throughput_weights"
    spec = {"device": "cuda:0", "backend": "gloo", "model": asdict(model_cfg(seed=1)), "port": port, "group": group,
            "buckets": [b.names for b in buckets], "rounds": [{"seed": 1, "dtype": "bfloat16"}],
            "timeout_s": HTTP_TIMEOUT_S}
    sender = subprocess.Popen([sys.executable, "-c", (REPO / "tests" / "weight_sender.py").read_text(),
                               json.dumps(spec)], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert sender.stdout.readline().strip() == "ready"  # the model is built: time the sync alone

        async def sync():
            async with SGLangClient(engine.url, timeout_s=HTTP_TIMEOUT_S) as client:
                plan = WeightSyncPlan(policy_version=1, group_name=group, master_addr="127.0.0.1", master_port=port,
                                      world_size=2, backend="gloo", reform=True,
                                      members=[SyncMember(server_id="e", rank_offset=1)], buckets=buckets,
                                      deadline_s=HTTP_TIMEOUT_S)
                return await apply_weight_sync(client, plan, "e", drain=False)

        t0 = time.perf_counter()
        done = asyncio.run(sync())
        seconds = time.perf_counter() - t0
        assert done.ok, done.reason
        assert sender.stdout.readline().strip() == "sent"
    finally:
        if sender.poll() is None:
            sender.kill()
        sender.wait(timeout=60)
    figure("weight_sync_s", seconds, "s")
    figure("weight_sync_gb_per_s", sum(p.numel() * 2 for p in engine.model.parameters()) / seconds / 1e9, "GB/s")
