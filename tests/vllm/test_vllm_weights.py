"""Weights and log-probs with the real vLLM: what it samples at launch is what the trainer scores
(vLLM's processed log-probs: areal_like/engines/vllm.py); a push through vLLM's
weight-transfer API (the gloo backend, rollout_server/vllm_gloo.py, driven by the rollout
server's ``apply_weight_sync`` against a stand-in trainer, tests/weight_sender.py) after which
the engine samples what the trainer scores, greedy included; and a push in the middle of a
generation, paused in vLLM's abort mode, after which every token's recorded version is the one
whose weights sampled it.

The session's server changes weights from test to test: the first test reads the initial
weights, each later one first serves the weights it compares against. Mutations checked (each
made once, each failed its test): ``--logprobs-mode`` left at vLLM's ``raw_logprobs`` (0.15 nats
off at temperature 0.7); ``receive_weights`` not loading what it received (0.75 nats off)."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import torch
from vllm_kit import PROMPTS, TOL, assert_served, engine_logprobs, model_config, push_seed

from areal_like.engines.vllm import VLLMClient
from areal_like.weights.hf import build_model
from rollout_server.episode import generate_sample
from trainer.logprob_guard import trainer_logprobs

TOKENS = 3000  # ~20 s of generation here (prompt + TOKENS within the model's 4096 positions)


def _model(seed: int) -> torch.nn.Module:
    return build_model(model_config(init_seed=seed))


def _client(server) -> VLLMClient:
    return VLLMClient(server.url, api_key=server.api_key, timeout_s=300)


def test_the_engine_log_probs_at_launch_are_the_trainers(vllm_server):
    async def scenario():
        async with VLLMClient(vllm_server.url, api_key=vllm_server.api_key) as client:
            for temperature in (0.7, 1.0):
                assert_served(await engine_logprobs(client, temperature), _model(0), temperature)

    asyncio.run(scenario())


def test_after_a_push_the_engine_samples_what_the_trainer_scores(vllm_server):
    async def scenario():
        async with _client(vllm_server) as client:
            await push_seed(client, 11, seed=3, wait_ready=True)
            for temperature in (1.0, 0.7):
                assert_served(await engine_logprobs(client, temperature), _model(3), temperature)
            # temperature 0 is greedy; its log-probs are at temperature 1
            assert_served(await engine_logprobs(client, 0.0), _model(3), 1.0)
            # one broadcast per tensor
            await push_seed(client, 12, seed=4, load_format=None, wait_ready=True)
            assert_served(await engine_logprobs(client, 1.0), _model(4), 1.0)

    asyncio.run(scenario())


def _generated(url: str, key: str) -> float:
    """The tokens vLLM counts as generated (its Prometheus ``/metrics``)."""
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in raw.splitlines()
               if line.startswith("vllm:generation_tokens_total"))


async def until_generated(client, tokens: int, job: asyncio.Task,
                          timeout_s: float = 300) -> None:
    """Until vLLM counts ``tokens`` more generated than when called, or ``job`` (the generation
    watched) ended: its error is raised; a job that finished leaves nothing to pause."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    start = await asyncio.to_thread(_generated, client.base_url, client.api_key)
    done = 0.0
    while loop.time() < deadline and not job.done():
        done = await asyncio.to_thread(_generated, client.base_url, client.api_key) - start
        if done >= tokens:
            return
        await asyncio.sleep(0.02)
    if job.done():
        job.result()  # raises what ended the generation
        return
    raise AssertionError(f"vLLM generated {done:.0f} of {tokens} tokens in {timeout_s:.0f} s")


def mid_generation(scenario, attempts: int = 3):
    """The sample of the first of ``attempts`` runs of ``scenario(attempt)`` whose generation the
    pause caught (it was aborted and resumed): on CI's loaded machine one generation finished its
    3,000 tokens before the pause came (2026-11-27), and such a run shows nothing. Each run's
    versions are its own; an AssertionError saying how each ended when none was caught."""
    missed = []
    for attempt in range(attempts):
        t0 = time.monotonic()
        sample = asyncio.run(scenario(attempt))
        if sample.resumed:
            return attempt, sample
        missed.append(f"{len(sample.output_ids)} tokens in {time.monotonic() - t0:.1f} s")
    raise AssertionError(f"the pause never came while vLLM generated: {missed}")


def test_a_push_mid_generation_labels_every_token_with_the_weights_that_sampled_it(vllm_server):
    prompt, temperature = PROMPTS[0], 1.0

    async def scenario(attempt: int):
        before, after = 20 + 2 * attempt, 21 + 2 * attempt
        async with _client(vllm_server) as client:
            await push_seed(client, before, seed=0, wait_ready=True)
            version, job = before, None
            pause = client.pause_generation

            async def pause_mid_generation(*args, **kwargs):
                # started here, after the group join (seconds on a loaded machine), so it is
                # still generating when the pause comes: started before the join it could finish
                nonlocal job
                job = asyncio.create_task(generate_sample(
                    client, prompt, {"temperature": temperature, "ignore_eos": True}, TOKENS,
                    lambda: version))
                await until_generated(client, 20, job)
                return await pause(*args, **kwargs)

            client.pause_generation = pause_mid_generation
            await push_seed(client, after, seed=1, wait_ready=True)
            version = after
            return await job

    attempt, sample = mid_generation(scenario)
    before, after = 20 + 2 * attempt, 21 + 2 * attempt
    assert len(sample.output_ids) == TOKENS
    assert sample.versions[0] == before and sample.versions[-1] == after
    assert sample.versions == sorted(sample.versions)
    scored = {v: trainer_logprobs(_model(seed), prompt, sample.output_ids, temperature,
                                  torch.device("cpu")) for v, seed in ((before, 0), (after, 1))}
    worst = max(abs(lp - scored[v][i])
                for i, (lp, v) in enumerate(zip(sample.logprobs, sample.versions)))
    assert worst < TOL, f"a token's log-prob differs by {worst:.2e} from its labelled version's"
