"""Interruptible generation across a real weight update (pause_mode abort and retract, and LoRA).

Greedy generations are gated at ~40 tokens until the pause lands (gate_at_the_pause), while a
sender process broadcasts other weights. Checked against reference forwards: versions switch
0 -> 1 once per sample at its pause point k; tokens before k are the old model's greedy choices,
from k the new model's continuation of prompt + tokens[:k]; behav_logp is the producing model's
log_softmax (1e-4); the length is what the engine reported.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from test_sglang_contract import GROUP_KEY, weight_sync_setup

from areal_like.engines.sglang import SGLangClient
from areal_like.settings.config import EngineConfig, LoraConfig, ModelConfig
from areal_like.weights.hf import build_model
from areal_like.weights.lora import add_adapters, is_adapter
from areal_like.weights.plan import WeightSyncPlan
from areal_like.weights.push import apply_weight_sync
from rollout_server.engine import EmbeddedEngine
from rollout_server.episode import generate_sample

MODEL = {"max_position_embeddings": 512}
MAX_NEW = 300
PROMPTS = [[1, 20 + i, 40 + 2 * i, 60 + i] for i in range(4)]


def gate_at_the_pause(sched, tokens: int) -> tuple[threading.Event, threading.Event]:
    """Hold engine steps at tokens per sample (held set) until the pause is in its inbox."""
    held, go = threading.Event(), threading.Event()

    def then_go(post):
        def posted(*args, **kwargs):
            out = post(*args, **kwargs)
            go.set()
            return out
        return posted
    sched.hold, sched.abort = then_go(sched.hold), then_go(sched.abort)

    def check(s) -> None:  # on the scheduler thread, between two steps; again after each step
        if len(s.running) == len(PROMPTS) and min(len(r.output_ids) for r in s.running) >= tokens:
            held.set()
            go.wait(120)
        else:
            s.call(check)
    sched.call(check)
    return held, go


async def scenario(engine, plan: WeightSyncPlan, sender: subprocess.Popen, pause_mode: str):
    client = SGLangClient(engine.url, timeout_s=120)
    version = 0
    go = threading.Event()
    try:
        await client.wait_healthy(120)
        assert (await asyncio.to_thread(sender.stdout.readline)).strip() == "ready"
        # greedy (top_k=1; logprobs are of the untruncated distribution), every sample runs to
        # MAX_NEW
        sampling = {"temperature": 1.0, "top_k": 1, "ignore_eos": True}
        jobs = [asyncio.create_task(generate_sample(client, p, sampling, MAX_NEW, lambda: version))
                for p in PROMPTS]
        held, go = gate_at_the_pause(engine.scheduler, 40)  # every sample well under way
        assert await asyncio.to_thread(held.wait, 120)
        done = await apply_weight_sync(client, plan, "engine-under-test",
                                       pause_mode=pause_mode)
        _, err = await asyncio.to_thread(sender.communicate, timeout=120)
        assert sender.returncode == 0, err[-2000:]
        if done.ok:
            version = 1
        samples = await asyncio.gather(*jobs)
        return done, samples, await client.weight_version()
    finally:
        go.set()
        await client.close()


def check_against(model, prompt: list[int], out: list[int], logps: list[float], lo: int,
                  hi: int) -> None:
    """Tokens out[lo:hi] are ``model``'s greedy choices given prompt + out[:t], logprobs match."""
    if lo >= hi:
        return
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0].float()
    steps = logits[len(prompt) - 1 + lo: len(prompt) - 1 + hi]
    assert steps.argmax(-1).tolist() == out[lo:hi]
    ref = torch.log_softmax(steps, -1).gather(-1, torch.tensor(out[lo:hi])[:, None])[:, 0]
    assert (ref - torch.tensor(logps[lo:hi])).abs().max().item() <= 1e-4


def run_interrupted(state: dict, lora: LoraConfig | None = None, state_file: Path | None = None,
                    pause_mode: str = "abort"):
    """Generate PROMPTS while state is pushed as v1 mid-way: (SyncDone, samples, version)."""
    plan, sender = weight_sync_setup(MODEL, "engine-under-test", state, state_file)
    try:
        engine = EmbeddedEngine(ModelConfig(**MODEL), EngineConfig(max_running_requests=8),
                                lora=lora, group_key=GROUP_KEY).start()
        try:
            return asyncio.run(scenario(engine, plan, sender, pause_mode))
        finally:
            engine.stop()
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()


def check_exact_switch(done, samples, served: str, old, new, pause_mode: str = "abort") -> None:
    assert done.ok and done.pause_s > 0, done.reason
    assert served == "1"
    spanning = 0
    for prompt, s in zip(PROMPTS, samples):
        n = len(s.output_ids)
        assert s.finish_reason == "length" and n == MAX_NEW  # nothing lost, nothing generated twice
        assert len(s.logprobs) == len(s.versions) == n
        k = s.versions.count(0)
        assert s.versions == [0] * k + [1] * (n - k), "versions must switch once, from 0 to 1"
        if 0 < k < n:
            spanning += 1
            # abort: resubmitted; retract: held in the engine, re-prefilled, never resubmitted
            assert (s.resumed >= 1) if pause_mode == "abort" else s.resumed == 0
        check_against(old, prompt, s.output_ids, s.logprobs, 0, k)
        check_against(new, prompt, s.output_ids, s.logprobs, k, n)
    assert spanning == len(PROMPTS), "every sample is in flight at the pause"


@pytest.mark.parametrize("pause_mode", ["abort", "retract"])
def test_pause_update_continue_switches_versions_exactly_at_the_pause_point(pause_mode):
    torch.set_num_threads(1)
    old = build_model(ModelConfig(**MODEL, init_seed=0))
    new = build_model(ModelConfig(**MODEL, init_seed=1))
    check_exact_switch(*run_interrupted(new.state_dict(), pause_mode=pause_mode), old, new,
                       pause_mode)


def test_an_adapter_change_mid_generation_switches_versions_exactly(tmp_path):
    """LoRA: adapters-only update; from the abort point on, tokens are base + adapter's."""
    torch.set_num_threads(1)
    lora = LoraConfig(rank=4, alpha=8.0)
    old = build_model(ModelConfig(**MODEL))
    new = add_adapters(build_model(ModelConfig(**MODEL)), lora).eval()
    gen = torch.Generator().manual_seed(7)
    adapter = {n: torch.randn(p.shape, generator=gen) * 0.3
               for n, p in new.named_parameters() if is_adapter(n)}
    with torch.no_grad():
        for n, p in new.named_parameters():
            if n in adapter:
                p.copy_(adapter[n])
    assert len(adapter) == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 blocks: all sent
    with torch.no_grad():  # the adapter changes the model: the switch point shows in the tokens
        x = torch.tensor(PROMPTS)
        assert (old(x).logits - new(x).logits).abs().max() > 0.1
    check_exact_switch(*run_interrupted(adapter, lora, tmp_path / "adapter.pt"), old, new)
