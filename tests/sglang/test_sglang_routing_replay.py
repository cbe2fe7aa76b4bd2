"""Routing replay on the real SGLang (CPU): started for ``trainer.routing_replay`` (the launch adds
``--enable-return-routed-experts``), it returns the experts it routed each token to, a prefix it
served from its cache included (a second turn), and those are the experts a direct transformers
forward of the same tiny Qwen3-MoE routes the same tokens to, token by token and layer by layer.
Then a whole multi-turn job (``areal-like run``, topology=cpu_sglang) trains on trajectories that
carry them."""

from __future__ import annotations

import asyncio
import re
import secrets

import pytest
from sglang_kit import cpu_engine, model_config

from areal_like.engines.sglang import SGLangClient
from rollout_server.launch_sglang import SGLangProcess
from tests.engine_kit import assert_routed_as_the_model, routed_generations, run_routing_replay_job
from tests.families import save_family


def test_sglang_returns_the_experts_the_model_routes_each_token_to(tmp_path):
    moe = save_family("qwen3_moe", tmp_path / "moe")
    key = secrets.token_hex(16)
    proc = SGLangProcess(model_config(moe), cpu_engine(), log_path=str(tmp_path / "sglang.log"),
                         api_key=key, routed_experts=True).start()

    async def generate():
        async with SGLangClient(proc.url, api_key=key, timeout_s=120,
                                routed_experts=True) as client:
            return await routed_generations(client)

    try:
        outs = asyncio.run(generate())
    finally:
        proc.stop()
    # the last three prefills are the second turns: each served its first turn from the cache
    cached = re.findall(r"#cached-token: (\d+)", (tmp_path / "sglang.log").read_text())
    firsts = [len(ids) + len(out.output_ids) - 1 for ids, out in outs[:len(outs) // 2]]
    assert [int(n) >= k for n, k in zip(cached[-3:], firsts)] == [True] * 3, (cached, firsts)
    assert_routed_as_the_model(outs, moe)


@pytest.mark.timeout(1200)  # one SGLang start-up (up to ~2 min on a loaded machine) and 2 steps
def test_a_multi_turn_routing_replay_job_on_sglang_trains_on_every_trajectory(tmp_path):
    run_routing_replay_job(tmp_path, "cpu_sglang")
