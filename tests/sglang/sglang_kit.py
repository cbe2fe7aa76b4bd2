"""Helpers of the SGLang tier (tests/sglang): the engine flags a cpu_sglang job passes and starting
a server through the rollout server's launch path; the model and checks are ``tests/engine_kit.py``.
"""

from __future__ import annotations

import os
import stat
import tempfile
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


def cpu_engine(**sglang) -> EngineConfig:
    """``topology=cpu_sglang``'s engine section (the flags a job passes), with ``sglang`` added."""
    engine = load_config(["topology=cpu_sglang"]).rollout.engine
    return replace(engine, sglang={**engine.sglang, **sglang})


def start_server(model_dir: Path, log_path: Path, api_key: str | None = None, **sglang) -> Server:
    return start(SGLangProcess, cpu_engine(**sglang), model_dir, log_path, api_key)


def own_tmpdir(server: Server) -> str:
    """The TMPDIR of ``server``'s SGLang, checked to be a directory of its own (under the shared
    temporary directory) holding SGLang's ZeroMQ IPC sockets, which SGLang makes with ``tempfile``
    and leaves there at exit; the reaper removes it at stop (the caller checks, after stopping)."""
    environ = Path(f"/proc/{server.proc.proc.pid}/environ").read_bytes().split(b"\0")
    tmpdir = dict(e.decode().split("=", 1) for e in environ if b"=" in e).get("TMPDIR")
    assert tmpdir and os.path.dirname(tmpdir) == tempfile.gettempdir(), tmpdir
    sockets = [e for e in os.scandir(tmpdir) if stat.S_ISSOCK(e.stat().st_mode)]
    assert sockets, os.listdir(tmpdir)  # SGLang's IPC sockets are there, not in the shared one
    return tmpdir
