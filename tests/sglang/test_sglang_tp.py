"""``rollout.engine.tp_size=2`` with the real SGLang on CPU: it starts, samples what the trainer
scores, and takes a distributed weight push to both ranks. It never started before: the CUDA
build of torch SGLang is installed with brings NCCL, so SGLang's NCCL communicator bound the
ranks' ``cpu`` device as a CUDA one (``ValueError: Expected a cuda device, but got: cpu``), and
without ``SGLANG_CPU_OMP_THREADS_BIND`` SGLang wants a NUMA node a rank (this machine has one)."""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import replace

from sglang_kit import assert_served, cpu_engine, engine_logprobs, model_config, push_seed

from areal_like.engines.sglang import SGLangClient
from areal_like.weights.hf import build_model
from rollout_server.launch_sglang import SGLangProcess


def test_tp_2_on_cpu_starts_samples_what_the_trainer_scores_and_takes_a_push(model_dir, tmp_path):
    key = secrets.token_hex(16)  # hex: never starts with "-"
    proc = SGLangProcess(model_config(model_dir), replace(cpu_engine(), tp_size=2),
                         log_path=str(tmp_path / "sglang.log"), api_key=key)
    proc.start()

    async def scenario():
        async with SGLangClient(proc.url, api_key=key, timeout_s=120) as client:
            assert_served(await engine_logprobs(client, 1.0), build_model(model_config()), 1.0)
            await push_seed(client, 7, seed=3, engine_ranks=2)
            assert_served(await engine_logprobs(client, 1.0),
                          build_model(model_config(init_seed=3)), 1.0)

    try:
        asyncio.run(scenario())
    finally:
        proc.stop()
    assert proc.exit_code() is not None
    assert not [f for f in proc.shm if os.path.exists(f)]
