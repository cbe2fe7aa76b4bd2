"""The trainer's log-prob guard (trainer/logprob_guard.py) against the real SGLang: it passes an
engine that serves the trainer's weights with the trainer's convention, and refuses one started
with ``SGLANG_RETURN_ORIGINAL_LOGPROB`` (log-probs before the temperature), naming it. That
engine, started and stopped by its test, also shows the launch's TMPDIR of the engine's own, gone
after stop (``sglang_kit.own_tmpdir``; moved from test_sglang_launch.py to spare a start).

Mutation checked: ``run_guard`` comparing at temperature 1 instead of the run's (the refusal
test failed: the wrongly started engine passed)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import torch
from sglang_kit import model_config, own_tmpdir, start_server

from areal_like.engines.sglang import SGLangClient
from areal_like.weights.hf import build_model
from areal_like.wire.protocol import Roster, RosterEntry
from trainer.logprob_guard import LogprobGuardError, run_guard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from weight_sync_harness import SyncStandIn  # noqa: E402

PROMPT = [1, 20, 21, 22]
TEMPERATURE = 2.0  # the quickstart's; at 1 the two conventions agree


class OneEngineBuffer:
    """What ``run_guard`` asks the buffer: the roster (here one engine, and its rollout server's
    sync port, which vouches for it)."""

    def __init__(self, url: str, sync_url: str):
        self.url, self.sync_url = url, sync_url

    def request(self, _msg, timeout_s=None):
        return Roster(
            members=[
                RosterEntry(server_id="s", engine_url=self.url, engine_ranks=1, policy_version=0,
                            sync_url=self.sync_url)
            ],
            policy_version=0,
        )


def _serve_seed0(server) -> None:
    async def load():
        async with SGLangClient(server.url, api_key=server.api_key, timeout_s=120) as client:
            await client.update_weights_from_disk(str(server.model_dir), weight_version="0")

    asyncio.run(load())


def _guard(server, monkeypatch) -> tuple[list[str], dict[str, str]]:
    port = SyncStandIn("s", server.url, server.api_key, kind="sglang")
    try:
        return run_guard(
            build_model(model_config(init_seed=0)),
            torch.device("cpu"),
            rank=0,
            buffer=OneEngineBuffer(server.url, port.url),
            served=["s"],
            prompt_ids=PROMPT,
            temperature=TEMPERATURE,
            tol=0.05,
            api_key=server.api_key,  # the job's key, as the trainer's facts hold it
        )
    finally:
        port.close()


def test_the_guard_passes_sglang_serving_the_trainers_weights(sglang_server, monkeypatch):
    _serve_seed0(sglang_server)
    assert _guard(sglang_server, monkeypatch) == (["s"], {})  # passed, none left unchecked


def test_the_guard_refuses_sglang_returning_logprobs_before_the_temperature(
    model_dir, tmp_path, monkeypatch
):
    # inherited by the SGLang process only here
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    server = start_server(model_dir, tmp_path / "sglang.log")
    try:
        tmpdir = own_tmpdir(server)  # the launch's, whatever the engine's environment says

        async def served_version() -> str | None:
            async with SGLangClient(server.url, api_key=server.api_key) as client:
                return await client.weight_version()

        assert asyncio.run(served_version()) == "0"  # a fresh server: --weight-version 0
        with pytest.raises(LogprobGuardError, match="engine s .* differ from the trainer's"):
            _guard(server, monkeypatch)
    finally:
        server.proc.stop()
    assert not os.path.exists(tmpdir)  # SGLang's sockets left in it, removed with it at stop
