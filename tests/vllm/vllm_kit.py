"""Helpers of the vLLM tier (tests/vllm): the engine flags a cpu_vllm job passes and starting a
server through the rollout server's launch path; the model (the SGLang tier's tiny Qwen2) and
checks are ``tests/engine_kit.py``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from areal_like.settings.config import EngineConfig, load_config
from rollout_server.launch_vllm import VLLMProcess
from tests.engine_kit import (  # noqa: F401 - the tier's tests import them from here
    MODEL,
    PROMPTS,
    TOL,
    Server,
    assert_served,
    check_killed_engine_is_relaunched,
    check_killed_server_takes_its_engine,
    check_teacher,
    check_teacher_process,
    engine_logprobs,
    model_config,
    push_seed,
    save_model,
    seed_plan,
    start,
)


def cpu_engine(**vllm) -> EngineConfig:
    """``topology=cpu_vllm``'s engine section (the flags a job passes), with ``vllm`` added."""
    engine = load_config(["topology=cpu_vllm"]).rollout.engine
    return replace(engine, vllm={**engine.vllm, **vllm})


def start_server(model_dir: Path, log_path: Path, **vllm) -> Server:
    return start(VLLMProcess, cpu_engine(**vllm), model_dir, log_path)
