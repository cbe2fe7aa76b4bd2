"""A model the trainer exports (``trainer.export.export_hf``), served by the real SGLang, evaluates
the same greedily as ``areal-like eval`` on the embedded engine: the same greedy accuracy and
reward over the quickstart's eval prompts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from areal_like.engines.sglang import SGLangClient
from areal_like.settings.config import export_yaml, load_config
from areal_like.tasks.tokenizer import load_tokenizer
from areal_like.weights.hf import build_model
from launch.warmstart import ensure_warm_start
from rollout_server.evaluate import ServerEvaluator
from rollout_server.facts import RolloutFacts
from rollout_server.reward_pool import RewardPool
from trainer.export import export_hf

REPO = Path(__file__).resolve().parents[2]
EVAL = ["experiment=quickstart", "eval.max_examples=128", "eval.k=0"]
# where tests/integration/system_harness.warm_model keeps the quickstart's warm start: the main
# tier trained it already (the same cache key), so it is not trained again here
WARM_CACHE = Path(tempfile.gettempdir()) / "areal-like-test-warmstart" / "warm" / "warmstart"


def test_an_export_served_by_sglang_evaluates_like_the_embedded_engine(sglang_server, tmp_path):
    cfg = ensure_warm_start(load_config([*EVAL, f"run_dir={tmp_path / 'run'}",
                                         f"warm_start.cache_dir={WARM_CACHE}"]), log=lambda m: None)
    export = export_hf(
        build_model(cfg.model),
        tmp_path / "export" / "v00000030",
        model_cfg=cfg.model,
        tokenizer=load_tokenizer(cfg.model),
        shard_mb=64,
        dtype="float32",
        # as the trainer exports: `areal-like eval` scores the stored task
        task_file=export_yaml(cfg.task),
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    embedded = subprocess.run(
        [sys.executable, "-m", "launch.cli", "eval", str(export), *EVAL],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert embedded.returncode == 0, embedded.stderr[-2000:]
    offline = json.loads(embedded.stdout.strip().splitlines()[-1])

    async def on_sglang() -> dict:
        tokenizer = load_tokenizer(cfg.model)
        evaluator = ServerEvaluator(RolloutFacts.from_run(cfg), tokenizer, rewards=None)
        evaluator.rewards = rewards = RewardPool(cfg.task, evaluator.reward_path)
        try:
            async with SGLangClient(
                sglang_server.url, api_key=sglang_server.api_key, timeout_s=120
            ) as client:
                await client.update_weights_from_disk(str(export), weight_version="30")
                return await evaluator.run(client, 30)
        finally:
            rewards.close()

    served = asyncio.run(on_sglang())
    assert served["n"] == offline["n"] == 128
    assert (
        served["greedy_accuracy"] == offline["greedy_accuracy"] > 0.5
    )  # a warm-started model, not noise
    assert served["greedy_reward"] == offline["greedy_reward"]
    assert served["token_versions"] == [30, 30]
