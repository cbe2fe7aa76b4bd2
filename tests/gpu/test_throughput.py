"""Throughput of a 0.5B-shaped random model on one GPU (marker gpu; skipped without CUDA).

The model has Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, vocab 151936,
tied embeddings) and random weights, in bf16: nothing is downloaded. The figures, each recorded
with the ``figure`` fixture for tests/gpu/RESULTS.md:

* ``generated_tokens_per_s``: the embedded engine on CUDA, ``BATCH`` concurrent requests of
  ``NEW_TOKENS`` tokens each (``ignore_eos``), after one warm-up request;
* ``trained_tokens_per_s`` and ``train_mfu``: one bf16 ``train_step`` on one rank (FSDP2 with the
  mixed-precision policy; a pre-hook checks that a decoder Linear computes in bf16) over
  ``TRAIN_SEQS`` sequences of ``TRAIN_SEQ_LEN`` tokens, after a warm-up step (one optimizer step;
  the default kernel takes pi_prox from the training forward itself); MFU against the GPU's dense
  bf16 peak;
* ``train_peak_gib`` (with and without activation checkpointing): the same step's
  ``torch.cuda.max_memory_allocated`` against ``launch.memory.estimate_peak_bytes``, the
  accounting of trainer/MEMORY.md (its 0.5B row on one GPU);
* ``weight_sync_s``: one weight sync of the whole model in the trainer's wire format (flattened
  bf16 buckets, ``tests/weight_sender.py``) into that engine over gloo on CUDA tensors, the path a
  one-GPU machine uses when NCCL cannot put two ranks on one device.
* ``weight_sync_ipc_s``: the one-GPU CUDA IPC path at the job's bucket size over 20 pushes;
* ``profiles/profile_decode.txt``: a torch.profiler table of 20 decode steps of the batch.

MFU counts the output head on output tokens only (``kit.train_flops``).
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

from areal_like.net.distributed import free_port
from areal_like.settings.config import EngineConfig, ModelConfig, WeightSyncConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kit import profile_text  # noqa: E402
from test_engine_cuda import HTTP_TIMEOUT_S, KEY, post  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
             tie_word_embeddings=True)
BATCH, PROMPT, NEW_TOKENS = 64, 64, 256
# the trainer step: trainer/MEMORY.md's 0.5B row on one GPU (8 x 2048 tokens, one micro-batch)
TRAIN_SEQS, TRAIN_SEQ_LEN, TRAIN_MBS = 8, 2048, 8
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12),
                   ("H200", 989.4e12), ("A100", 312e12))
BUCKET_BYTES = 256 * 1024 * 1024  # the gloo sync's (test_weight_sync_seconds)
# the one-GPU IPC sync at the job's bucket size (weight_sync.bucket_mb, in MiB as
# trainer/weight_sync.py reads it)
IPC_BUCKET_BYTES = int(WeightSyncConfig().bucket_mb * 1024 * 1024)
DECODE_PROFILE_STEPS = 20

TRAIN_WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from areal_like.settings.config import load_config
from areal_like.wire.protocol import TrajectoryGroup
from areal_like.wire.trajectory import Trajectory
from trainer.data import groups_to_batch
from trainer.model import build_policy, init_distributed
from trainer.step import StepSettings, recompute_prox_logp, train_step

spec = json.loads(sys.argv[2])
rng = np.random.default_rng(0)
new = spec["seq_len"] - spec["prompt"]
trajs = [Trajectory.of(prompt_ids=rng.integers(4, 100, spec["prompt"]),
                       output_ids=rng.integers(4, 100, new), behav_logp=-rng.random(new) * 5,
                       versions=np.zeros(new, np.int32), reward=float(i % 2),
                       finish_reason="length")
         for i in range(spec["seqs"])]
batch = groups_to_batch([TrajectoryGroup(group_id="g", server_id="s", lease_id="0", prompt_index=0,
                                         epoch=0, trajectories=trajs)])
cfg = load_config(["trainer.device=cuda", "model.dtype=bfloat16",
                   f"trainer.micro_batch_size={spec['mbs']}",
                   f"trainer.activation_checkpointing={str(spec['checkpointing']).lower()}",
                   *[f"model.{k}={v}" for k, v in spec["shape"].items()]])
init_distributed(cfg.trainer)
policy = build_policy(cfg.model, cfg.trainer)
seen = set()
policy.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
    lambda m, a: seen.add(str(a[0].dtype)) if torch.is_grad_enabled() else None)
s = StepSettings.from_config(cfg)
for _ in range(2):  # the first step warms up kernels and the allocator; the second is measured
    torch.cuda.synchronize(); t0 = time.perf_counter()
    stats = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
    torch.cuda.synchronize(); t1 = time.perf_counter()
print("RESULT " + json.dumps({
    "tokens": int(batch.input_ids.numel()), "train_s": t1 - t0, "loss": stats["loss"],
    "compute_dtypes": sorted(seen), "peak_bytes": torch.cuda.max_memory_allocated(),
    "gpu": torch.cuda.get_device_name(0)}), flush=True)
"""

def model_cfg(seed: int = 0) -> ModelConfig:
    return ModelConfig(**SHAPE, dtype="bfloat16", init_seed=seed)


@pytest.fixture(scope="module")
def engine():
    from rollout_server.engine import EmbeddedEngine

    e = EmbeddedEngine(model_cfg(), EngineConfig(device="cuda", max_running_requests=BATCH,
                                                 max_total_tokens=BATCH * (PROMPT + NEW_TOKENS)),
                       group_key=KEY).start()
    try:
        yield e
    finally:
        e.stop()


def test_generated_tokens_per_second(engine, figure):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 100, (PROMPT,), generator=g).tolist() for _ in range(BATCH)]
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 1.0, "ignore_eos": True}
    assert post(engine.url, "/generate",
                {"input_ids": prompts[0], "sampling_params": params})[0] == 200  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(BATCH) as pool:
        outs = list(pool.map(lambda p: post(engine.url, "/generate",
                                            {"input_ids": p, "sampling_params": params}),
                             prompts))
    seconds = time.perf_counter() - t0
    assert all(status == 200 for status, _ in outs), (
        [body for status, body in outs if status != 200][:1])
    tokens = sum(len(body["output_ids"]) for _, body in outs)
    assert tokens == BATCH * NEW_TOKENS
    figure("generated_tokens_per_s", tokens / seconds, "tokens/s")
    baseline = hf_static_tokens_per_s(engine.model, prompts)
    figure("generated_tokens_per_s_baseline_hf_static", baseline, "tokens/s")
    figure("generated_tokens_per_s_ratio", tokens / seconds / baseline, "x")


def test_decode_profile(engine, artifact):
    """torch.profiler over ``BATCH`` concurrent requests of ``DECODE_PROFILE_STEPS`` + 1 tokens
    (a prefill, then 20 decode steps of the whole batch), its table by CUDA and CPU time written
    beside the figures (``profiles/profile_decode.txt``). The engine runs in this process, so
    its threads' ops and kernels are in the profile."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 100, (PROMPT,), generator=g).tolist() for _ in range(BATCH)]
    params = {"max_new_tokens": DECODE_PROFILE_STEPS + 1, "temperature": 1.0, "ignore_eos": True}
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof, ThreadPoolExecutor(BATCH) as pool:
        outs = list(pool.map(lambda p: post(engine.url, "/generate",
                                            {"input_ids": p, "sampling_params": params}),
                             prompts))
        torch.cuda.synchronize()
    assert all(status == 200 for status, _ in outs)
    artifact("profile_decode.txt", profile_text(
        f"the engine: {BATCH} requests, a prefill and {DECODE_PROFILE_STEPS} decode steps", prof))


def hf_static_tokens_per_s(model, prompts: list[list[int]]) -> float:
    """The baseline of ``generated_tokens_per_s``: transformers' ``generate`` on the same model and
    card, the same prompts, tokens and sampling (temperature 1, whole vocabulary), with a static
    cache (which transformers compiles the forward for); one warm-up call of the same shapes
    (compilation), the second timed. The engine is idle meanwhile (its requests answered)."""
    ids = torch.tensor(prompts, device="cuda")
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=True,
                  temperature=1.0, top_k=0, top_p=1.0, cache_implementation="static",
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # compiles for these shapes
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    assert out.shape == (BATCH, PROMPT + NEW_TOKENS)
    return BATCH * NEW_TOKENS / seconds


def peak_bf16_flops(gpu: str) -> float | None:
    """Dense bf16 tensor-core peak of ``gpu`` (vendor data sheets), None when not in the table."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in gpu:
            return flops
    return None


def model_flops(cfg: ModelConfig, seqs: int, seq_len: int, prompt: int) -> float:
    """Training FLOPs of ``seqs`` sequences of ``seq_len`` tokens, ``prompt`` of them the prompt:
    ``kit.train_flops`` (the MFU convention; the output head on output tokens only, as the
    trainer computes it)."""
    from kit import train_flops

    from launch.memory import block_params

    return train_flops(cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, block_params(cfg),
                       [(prompt, seq_len - prompt)] * seqs)


@pytest.fixture(scope="module")
def trained():
    """One bf16 0.5B-shaped trainer step per checkpointing setting (run on first use)."""
    from tests.conftest import child_env

    runs: dict[bool, dict] = {}

    def run(checkpointing: bool) -> dict:
        if checkpointing not in runs:
            spec = {"shape": SHAPE, "seq_len": TRAIN_SEQ_LEN, "prompt": PROMPT, "seqs": TRAIN_SEQS,
                    "mbs": TRAIN_MBS, "checkpointing": checkpointing}
            proc = subprocess.run([sys.executable, "-c", TRAIN_WORKER, str(REPO), json.dumps(spec)],
                                  capture_output=True, text=True, timeout=900, env=child_env())
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[checkpointing] = json.loads(
                next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        return runs[checkpointing]

    return run


def test_trained_tokens_per_second_and_mfu(trained, figure):
    res = trained(False)
    assert res["compute_dtypes"] == ["torch.bfloat16"]  # bf16 compute, not fp32 recorded as bf16
    assert res["tokens"] == TRAIN_SEQS * TRAIN_SEQ_LEN and res["loss"] == res["loss"]
    figure("trained_tokens_per_s", res["tokens"] / res["train_s"], "tokens/s")
    peak = peak_bf16_flops(res["gpu"])
    if peak is not None:  # goal on one H100: >= 35 %
        flops = model_flops(model_cfg(), TRAIN_SEQS, TRAIN_SEQ_LEN, PROMPT)
        mfu = flops / res["train_s"] / peak
        figure("train_mfu", 100 * mfu, "%")
        assert 0 < mfu < 1


@pytest.mark.parametrize("checkpointing", [False, True])
def test_peak_memory_against_the_estimate(trained, figure, checkpointing):
    """torch.cuda.max_memory_allocated of the step against trainer/MEMORY.md's estimate for it
    (its table's 0.5B row on one GPU: 8 sequences of 2048 tokens in one micro-batch)."""
    from launch.memory import GIB, estimate_peak_bytes, qwen2_shape

    res = trained(checkpointing)
    est = estimate_peak_bytes(qwen2_shape("0.5B"), 1, TRAIN_MBS * TRAIN_SEQ_LEN, "bfloat16",
                              checkpointing, 512, accumulating=TRAIN_SEQS > TRAIN_MBS)
    tag = "_checkpointing" if checkpointing else ""
    figure(f"train_peak_gib{tag}", res["peak_bytes"] / GIB, "GiB")
    figure(f"train_peak_estimate_gib{tag}", est.total / GIB, "GiB")
    assert 0.85 <= res["peak_bytes"] / est.total <= 1.15, (res["peak_bytes"] / GIB, est.total / GIB)


def test_weight_sync_seconds(engine, figure):
    from areal_like.engines.sglang import SGLangClient
    from areal_like.weights.plan import SyncMember, WeightSyncPlan, plan_buckets
    from areal_like.weights.push import apply_weight_sync

    named = [(n, list(p.shape)) for n, p in engine.model.named_parameters()]
    buckets = plan_buckets([(n, s, "bfloat16") for n, s in named], BUCKET_BYTES)
    port, group = free_port(), "throughput_weights"
    spec = {"device": "cuda:0", "backend": "gloo", "model": asdict(model_cfg(seed=1)),
            "port": port, "group": group, "key": KEY,
            "buckets": [b.names for b in buckets], "rounds": [{"seed": 1, "dtype": "bfloat16"}],
            "timeout_s": HTTP_TIMEOUT_S}
    sender = subprocess.Popen([sys.executable, "-c",
                               (REPO / "tests" / "weight_sender.py").read_text(),
                               json.dumps(spec)], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    try:
        # the model is built: time the sync alone
        assert sender.stdout.readline().strip() == "ready"

        async def sync():
            async with SGLangClient(engine.url, timeout_s=HTTP_TIMEOUT_S) as client:
                plan = WeightSyncPlan(policy_version=1, group_name=group, master_addr="127.0.0.1",
                                      master_port=port,
                                      world_size=2, backend="gloo", reform=True,
                                      members=[SyncMember(server_id="e", rank_offset=1)],
                                      buckets=buckets,
                                      deadline_s=HTTP_TIMEOUT_S)
                return await apply_weight_sync(client, plan, "e")

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
    figure("weight_sync_gb_per_s",
           sum(p.numel() * 2 for p in engine.model.parameters()) / seconds / 1e9, "GB/s")


IPC_SENDER = r"""
import json, sys, time, types, torch
from areal_like.settings.config import ModelConfig, WeightSyncConfig
from areal_like.weights.hf import build_model
from areal_like.weights.plan import plan_buckets
from benchmarks.weight_checksum import state_checksum
from trainer.weight_buckets import PushTensors
from trainer.weight_local import TensorSender

spec = json.loads(sys.argv[1])
model = build_model(ModelConfig(**spec["model"]), device="cuda")
params = PushTensors(model)  # what WeightBroadcaster.push sends
buckets = plan_buckets([(n, s, "bfloat16") for n, s, _ in params.entries], spec["bucket_bytes"])
report = types.SimpleNamespace(bytes=0)
out = TensorSender(WeightSyncConfig(), "gloo", 0, "bfloat16")
print(json.dumps({"checksum": state_checksum(model), "buckets": len(buckets)}), flush=True)
for push in range(spec["pushes"]):
    sys.stdin.readline()  # the engine is ready for the next push
    torch.cuda.synchronize(); t0 = time.perf_counter()
    out.stage(model, params, buckets, report)
    payloads = out.route(push, [("e", 1, "")])["payloads"]  # packs, one device wait
    print(json.dumps({"payloads": payloads, "stage_s": time.perf_counter() - t0}), flush=True)
    sys.stdin.readline()  # the engine has loaded it
    out.done()
out.close()
"""
IPC_PUSHES = 21  # the first opens the handles; the 20 after it are the figures


def test_weight_sync_ipc_seconds(engine, figure):
    """``weight_sync_ipc_s``: the one-GPU ``tensor`` path (trainer/WEIGHT_SYNC.md, "One GPU") of
    the whole 0.5B bf16 model from another process into the engine: the sender's packing and
    payloads, then one ``/update_weights_from_tensor`` per bucket (version on the last) until the
    engine answered, the engine holding the sender's exact weights after; at the job's bucket
    size (``IPC_BUCKET_BYTES``), over 20 pushes after the one that opens the handles: their median
    (``weight_sync_ipc_s``), the median of the last five (``weight_sync_ipc_last_s``: flat, no
    growth push by push) and the slowest. Goal (the kit's table): both medians <= 0.02 s.
    Baseline: a device-to-device copy of the same bytes on the same card
    (``weight_sync_ipc_s_baseline``)."""
    from benchmarks.weight_checksum import state_checksum
    from tests.conftest import child_env

    spec = {"model": asdict(model_cfg(seed=2)), "bucket_bytes": IPC_BUCKET_BYTES,
            "pushes": IPC_PUSHES}
    sender = subprocess.Popen([sys.executable, "-c", IPC_SENDER, json.dumps(spec)], cwd=REPO,
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=child_env())
    times = []
    try:
        head = json.loads(sender.stdout.readline())
        for push in range(IPC_PUSHES):
            sender.stdin.write("go\n")
            sender.stdin.flush()
            made = json.loads(sender.stdout.readline())
            t0 = time.perf_counter()
            for i, payload in enumerate(made["payloads"]):
                last = i == len(made["payloads"]) - 1
                status, body = post(engine.url, "/update_weights_from_tensor", {
                    "serialized_named_tensors": [payload], "flush_cache": last,
                    "weight_version": f"ipc{push}" if last else None})
                assert status == 200 and body.get("success"), body
            times.append(made["stage_s"] + time.perf_counter() - t0)
            sender.stdin.write("loaded\n")
            sender.stdin.flush()
        assert sender.wait(HTTP_TIMEOUT_S) == 0
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(60)
    assert state_checksum(engine.model) == pytest.approx(head["checksum"], rel=1e-12)
    nbytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copies = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        copies.append(time.perf_counter() - t0)
    pushes, last = sorted(times[1:]), sorted(times[-5:])
    seconds, copy_s = pushes[len(pushes) // 2], sorted(copies)[2]
    figure("weight_sync_ipc_s", seconds, "s")
    figure("weight_sync_ipc_last_s", last[len(last) // 2], "s")  # flat: no growth push by push
    figure("weight_sync_ipc_max_s", pushes[-1], "s")
    figure("weight_sync_ipc_first_s", times[0], "s")  # opens the IPC handles
    figure("weight_sync_ipc_s_baseline", copy_s, "s")
    figure("weight_sync_ipc_ratio", copy_s / seconds, "x")
    figure("weight_sync_ipc_buckets", head["buckets"], "buckets")
