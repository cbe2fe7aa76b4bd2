"""The embedded engine on CUDA: greedy == transformers' generate, logprobs == a separate forward
(fp32 tight, bf16 with a bf16 tolerance), and a weight update broadcast from another process over
NCCL (two GPUs: the sender on cuda:1) or gloo over CUDA tensors (one GPU: NCCL cannot put two ranks
on one device).

Skips cleanly without CUDA (tests/gpu/conftest.py marks and skips everything here).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from areal_like.net.distributed import free_port
from areal_like.settings.config import EngineConfig, ModelConfig
from areal_like.weights.hf import build_model
from benchmarks.weight_checksum import state_checksum
from rollout_server.engine import EmbeddedEngine

REPO = Path(__file__).resolve().parents[2]
HTTP_TIMEOUT_S = 300.0
GROUP = "areal_like_weights"
KEY = secrets.token_hex(16)  # the job's engine key: the sender's gate asks, the engine proves it
BF16_LOGPROB_TOL = 0.1  # bf16 keeps ~3 significant digits; logprobs of a random model sit around -4
# a greedy divergence is accepted only where the reference's top-2 logits are this close
BF16_TIE_GAP = 0.125

SENDER = r"""
import json, os, sys, torch, torch.distributed as dist
from areal_like.settings.config import ModelConfig
from areal_like.net.distributed import init_weight_group
from areal_like.weights.hf import build_model
spec = json.loads(sys.argv[1])
torch.cuda.set_device(spec["device"])
model = build_model(ModelConfig(**spec["model"]), device=spec["device"])
pg = init_weight_group(spec["backend"], "127.0.0.1", spec["port"], 2, 0, spec["group"], 300,
                       key=spec["key"])
for name, p in model.named_parameters():
    dist.broadcast(p.data, group_src=0, group=pg)
torch.cuda.synchronize()
print("SENT", flush=True)
os._exit(0)  # skip interpreter teardown of the group (it can abort on exit)
"""


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _stop(engine: EmbeddedEngine, sender: subprocess.Popen | None) -> None:
    """Teardown: the engine, then the sender process (killed by PID if it is still running)."""
    engine.stop()
    if sender is not None:
        if sender.poll() is None:
            sender.kill()
        sender.wait(timeout=60)


def model_cfg(dtype: str, seed: int = 0) -> ModelConfig:
    return ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       dtype=dtype, init_seed=seed)


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(3, 60, (n,), generator=g).tolist()
    return [[1] + torch.randint(4, 104, (k,), generator=g).tolist() for k in lens]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_greedy_and_logprobs(dtype):
    engine = EmbeddedEngine(model_cfg(dtype),
                            EngineConfig(device="cuda", max_running_requests=4)).start()
    try:
        ps, limits = prompts(10), [5, 80, 17, 3, 120, 25, 9, 60, 33, 1]
        with ThreadPoolExecutor(len(ps)) as pool:
            outs = list(pool.map(lambda a: post(engine.url, "/generate", {
                "input_ids": a[0], "sampling_params": {"max_new_tokens": a[1], "temperature": 0},
                "return_logprob": True})[1], zip(ps, limits)))
        model = engine.model
        for p, m, out in zip(ps, limits, outs):
            got = out["output_ids"]
            with torch.no_grad():
                ref = model.generate(torch.tensor([p], device="cuda"),
                                     max_new_tokens=m, do_sample=False,
                                     eos_token_id=2, pad_token_id=0)[0, len(p):].tolist()
                logits = (model(torch.tensor([p + got], device="cuda"))
                          .logits[0, len(p) - 1:-1].float())
            lp = (torch.log_softmax(logits, -1)
                  .gather(1, torch.tensor(got, device="cuda")[:, None])[:, 0].cpu())
            diff = (lp - torch.tensor(
                [e[0] for e in out["meta_info"]["output_token_logprobs"]])).abs().max().item()
            if dtype == "float32":
                assert got == ref
                assert diff <= 1e-4
                continue
            assert diff <= BF16_LOGPROB_TOL
            k = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
            # bf16: batched and single-sequence kernels may break a near-tie differently
            if k is not None:
                top2 = logits[k].topk(2).values
                assert (top2[0] - top2[1]).item() <= BF16_TIE_GAP, (k, got, ref)
    finally:
        engine.stop()


def test_cuda_weight_update_from_another_process():
    two_gpus = torch.cuda.device_count() >= 2
    backend, sender_device = ("nccl", "cuda:1") if two_gpus else ("gloo", "cuda:0")
    engine = EmbeddedEngine(model_cfg("bfloat16"),
                            EngineConfig(device="cuda:0", max_running_requests=4),
                            group_key=KEY).start()
    sender = None
    try:
        port = free_port()
        spec = {"device": sender_device, "model": asdict(model_cfg("bfloat16", seed=5)),
                "backend": backend,
                "port": port, "group": GROUP, "key": KEY}
        sender = subprocess.Popen([sys.executable, "-c", SENDER, json.dumps(spec)],
                                  cwd=REPO, text=True,
                                  stdout=subprocess.PIPE)
        status, body = post(engine.url, "/init_weights_update_group", {
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": GROUP, "backend": backend})
        assert status == 200, body
        target = build_model(model_cfg("bfloat16", seed=5), device="cuda:0")
        named = list(target.named_parameters())
        assert post(engine.url, "/pause_generation", {"mode": "abort"})[0] == 200
        assert post(engine.url, "/begin_weight_update", {})[0] == 200
        status, body = post(engine.url, "/update_weights_from_distributed", {
            "names": [n for n, _ in named], "dtypes": ["bfloat16"] * len(named),
            "shapes": [list(p.shape) for _, p in named], "group_name": GROUP,
            "weight_version": "1"})
        assert status == 200, body
        assert post(engine.url, "/end_weight_update", {})[0] == 200
        assert post(engine.url, "/continue_generation", {})[0] == 200
        assert sender.stdout.readline().strip() == "SENT"
        assert state_checksum(engine.model) == state_checksum(target)
        info = json.loads(urllib.request.urlopen(engine.url + "/model_info",
                                                 timeout=HTTP_TIMEOUT_S).read())
        assert info["weight_version"] == "1"
        out = post(engine.url, "/generate",
                   {"input_ids": [1, 9], "sampling_params": {"max_new_tokens": 4}})[1]
        assert out["meta_info"]["weight_version"] == "1"
    finally:
        _stop(engine, sender)


def test_cuda_flattened_bucket_syncs_swap_bf16_weights_exactly():
    """Two syncs in the trainer's wire format (one flattened bf16 broadcast per bucket, several
    buckets, ``tests/weight_sender.py``) into a bf16 engine on CUDA: each parameter ends up a view
    of a received buffer (swapped, not copied) holding exactly the sender's values, also in the
    second sync, which receives into the buffers the first one retired."""
    import asyncio

    from areal_like.engines.sglang import SGLangClient
    from areal_like.weights.plan import SyncMember, WeightSyncPlan, plan_buckets
    from areal_like.weights.push import apply_weight_sync

    engine = EmbeddedEngine(model_cfg("bfloat16"),
                            EngineConfig(device="cuda:0", max_running_requests=4),
                            group_key=KEY).start()
    sender = None
    try:
        port, seeds = free_port(), [7, 8]
        named = [(n, list(p.shape)) for n, p in engine.model.named_parameters()]
        specs = plan_buckets([(n, s, "bfloat16") for n, s in named], 256 * 1024)
        assert len(specs) >= 3
        spec = {"device": "cuda:0", "backend": "gloo", "model": asdict(model_cfg("bfloat16")),
                "port": port, "group": GROUP, "key": KEY, "buckets": [b.names for b in specs],
                "rounds": [{"seed": s} for s in seeds]}
        sender = subprocess.Popen([sys.executable, "-c",
                                   (REPO / "tests" / "weight_sender.py").read_text(),
                                   json.dumps(spec)], cwd=REPO, text=True, stdout=subprocess.PIPE)

        async def syncs() -> list[tuple[bool, str, str]]:
            out = []
            async with SGLangClient(engine.url, timeout_s=HTTP_TIMEOUT_S) as client:
                for version in range(1, len(seeds) + 1):
                    plan = WeightSyncPlan(policy_version=version, group_name=GROUP,
                                          master_addr="127.0.0.1", master_port=port,
                                          world_size=2, backend="gloo", reform=version == 1,
                                          members=[SyncMember(server_id="e", rank_offset=1)],
                                          buckets=specs,
                                          deadline_s=HTTP_TIMEOUT_S)
                    done = await apply_weight_sync(client, plan, "e")
                    out.append((done.ok, done.reason, state_checksum(engine.model)))
            return out

        for seed, (ok, reason, checksum) in zip(seeds, asyncio.run(syncs())):
            assert ok, reason
            assert checksum == state_checksum(build_model(model_cfg("bfloat16", seed=seed),
                                                          device="cuda:0"))
        live = {flat.untyped_storage().data_ptr() for flat in engine.weights._live.values()}
        assert {p.untyped_storage().data_ptr() for p in engine.model.parameters()} <= live
        out = post(engine.url, "/generate",
                   {"input_ids": [1, 9], "sampling_params": {"max_new_tokens": 4}})[1]
        assert out["meta_info"]["weight_version"] == str(len(seeds))
        assert [line.strip() for line in sender.stdout][-1] == "sent"
    finally:
        _stop(engine, sender)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_a_step_waits_on_the_device_once(dtype, monkeypatch):
    """torch's sync debug mode warns at every operation that waits for the device (a read, a
    pageable copy, a boolean index): at most one per scheduler step (the read of its tokens)."""
    import threading
    import warnings

    from rollout_server.engine import scheduler as scheduler_mod
    from rollout_server.engine.sampling import SamplingParams
    from rollout_server.engine.scheduler import Request, Scheduler

    model = build_model(model_cfg(dtype), device="cuda")
    steps = [0]
    real_sample = scheduler_mod.sample

    def counted(*args, **kwargs):
        steps[0] += 1
        return real_sample(*args, **kwargs)
    monkeypatch.setattr(scheduler_mod, "sample", counted)
    params = [SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=14, top_p=0.8),
              SamplingParams(max_new_tokens=20, temperature=0.0),
              SamplingParams(max_new_tokens=9, top_k=5, sampling_seed=3)]
    done, finished = threading.Event(), []

    def fin(r):
        finished.append(r)
        if len(finished) == len(params):
            done.set()
    s = Scheduler(model, max_running=4, max_total_tokens=4096, context_len=512,
                  weight_version="0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            s.start()
            for i, p in enumerate(params):
                s.submit(Request(rid=str(i), input_ids=[1, 5 + i, 7, 9], params=p,
                                 stop_ids=frozenset(), on_finish=fin))
            assert done.wait(HTTP_TIMEOUT_S)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            s.stop()
    # not the warning that the debug mode itself is a prototype (once a process, the first run)
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    assert sorted(len(r.output_ids) for r in finished) == [9, 14, 20, 20]
    assert steps[0] >= 20 and len(syncs) <= steps[0], (len(syncs), steps[0],
                                                        {str(w.message) for w in syncs})


def test_cuda_sampler_frequencies_exact():
    """The inverse-CDF sampler on CUDA: evenly spread uniforms give the exact frequencies."""
    import math

    from rollout_server.engine.sampling import SamplingParams, prepare, sample
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]], device="cuda").log().expand(1000, -1)
    for params, expected in [(SamplingParams(), [500, 300, 150, 50]),
                             (SamplingParams(top_p=0.6), [625, 375, 0, 0]),
                             (SamplingParams(top_k=3), [526, 316, 158, 0])]:
        batch = prepare([params] * 1000, [(i + 0.5) / 1000 for i in range(1000)],
                        torch.device("cuda"))
        tok, lp = sample(logits, batch)
        got = torch.bincount(tok, minlength=4).tolist()
        assert all(abs(g - e) <= 1 for g, e in zip(got, expected)), got
        assert lp[tok == 0].sub(math.log(0.5)).abs().max().item() < 1e-6


def test_cuda_bf16_logprob_gap_within_the_guards_default(figure):
    """The bf16 embedded engine against the bf16 trainer on CUDA, 0.5B shape: the gap the log-prob
    guard's bf16 default (trainer/logprob_guard.py, measured on CPU) must cover."""
    from trainer.logprob_guard import default_tol

    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_logprob_gap.py"),
                          "--device", "cuda", "--dtype", "bfloat16", "--shape", "0.5b",
                          "--probes", "16"], cwd=REPO, capture_output=True, text=True,
                         timeout=HTTP_TIMEOUT_S, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    figure("logprob_gap_bf16", line["figure"], "nats/token")
    figure("logprob_gap_bf16_max_token", line["max_token"], "nats")
    assert line["figure"] <= default_tol("bfloat16"), line
