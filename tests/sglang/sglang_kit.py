"""Helpers of the SGLang tier (tests/sglang): the engine flags a cpu_sglang job passes and starting
a server through the rollout server's launch path; the model and checks are ``tests/engine_kit.py``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from areal_like.settings.config import EngineConfig, load_config
from rollout_server.launch_sglang import SGLangProcess
from tests.engine_kit import (  # noqa: F401 - the tier's tests import them from here
    MODEL,
    PROMPTS,
    TOL,
    Server,
    assert_served,
    check_teacher,
    check_teacher_process,
    engine_logprobs,
    model_config,
    save_model,
    start,
)


def cpu_engine(**sglang) -> EngineConfig:
    """``topology=cpu_sglang``'s engine section (the flags a job passes), with ``sglang`` added."""
    engine = load_config(["topology=cpu_sglang"]).rollout.engine
    return replace(engine, sglang={**engine.sglang, **sglang})


def start_server(model_dir: Path, log_path: Path, api_key: str | None = None, **sglang) -> Server:
    return start(SGLangProcess, cpu_engine(**sglang), model_dir, log_path, api_key)
