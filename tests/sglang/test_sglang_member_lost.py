"""A member lost mid-bucket with two real SGLang servers: the survivor stays healthy and takes the
next version on a group formed without the lost one.

Real processes and sockets: the buffer daemon, a world-size-1 trainer (``tests/weight_pusher.py``,
the real ``WeightBroadcaster`` and ``GroupSender`` on gloo), two SGLang servers on CPU (``lost``,
started here with the same key, and the session's ``sglang_server``, the survivor), driven by the
trainer through store doors, and two rollout-server stand-ins in this process
(``weight_sync_harness.Driver``: Register and Heartbeat).

The push of v1 has six buckets. Once ``lost`` answered the first, its whole SGLang process group
gets SIGKILL (by its group id) and its stand-in stops as its rollout server would (no more
heartbeats). That is a lost member as the trainer knows one: the process in the
group (SGLang's scheduler) and its server gone at once, as when a node dies, so the buffer
expires it. Killing SGLang alone while its rollout server lives is the relaunch path instead (the
member stays in the roster and re-registers: test_sglang_faults.py).

Asserted: the v1 push returns within its deadline, drops ``lost`` and re-pushes v1 to the survivor
alone; the survivor answers ``/health_generate`` within ``HEALTH_S``, serves v1 and then v2 (on
the group re-formed for it) and after each its log-probs are the trainer's model's within ``TOL``.

Mutation checked (made once, failed this test): ``apply_weight_sync`` without the
``/end_weight_update`` it sends after a failed bucket (the survivor's re-push was refused: SGLang
still held the first attempt's session).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import torch
from sglang_kit import assert_served, engine_logprobs, model_config, start_server

from areal_like.engines.sglang import SGLangClient
from areal_like.weights.hf import build_model
from rollout_server.engine_reaper import group_members

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from test_trainer_weight_sync import read_json  # noqa: E402
from weight_sync_harness import (  # noqa: E402
    Driver,
    start_pusher,
    write_config,
    write_job_key,
)

DEADLINE_S = 40.0  # the sync deadline: a re-push fits in it with SGLang's HTTP calls on 2 cores
HEARTBEAT_TIMEOUT_S = 10.0  # how soon the buffer expires the lost member; 3 s expired the
# survivor once in CI, its stand-in thread starved while the freshly started SGLang took both cores
HEALTH_S = 30.0  # the survivor answers /health_generate within this (SGLang's own check: 20 s)
REPORT_WAIT_S = DEADLINE_S + 120.0  # the longest the test waits for a push's report (not a bound)


def _trainer_model(version: int) -> torch.nn.Module:
    """The pusher's model after pushing versions 1..``version`` (each adds 0.01 * version)."""
    model = build_model(model_config(init_seed=0))
    with torch.no_grad():
        for v in range(1, version + 1):
            for p in model.parameters():
                p.add_(0.01 * v)
    return model


async def _serves(server, version: int) -> None:
    async with SGLangClient(server.url, api_key=server.api_key, timeout_s=120) as client:
        await client.health_generate(HEALTH_S)  # EngineError: the survivor failed it
        assert await client.weight_version() == str(version)
        assert_served(await engine_logprobs(client, 1.0), _trainer_model(version), 1.0)


def test_a_member_lost_mid_bucket_leaves_the_survivor_healthy_and_on_the_next_version(
    sglang_server, model_dir, tmp_path, spawn_python, free_port, wait_until
):
    lost = start_server(model_dir, tmp_path / "lost.log", api_key=sglang_server.api_key)
    pgid = lost.proc.proc.pid  # started in a session of its own: its group id
    a = b = None
    try:
        cfg, cfg_path = write_config(
            tmp_path,
            free_port,
            [
                f"trainer.weight_sync.deadline_s={DEADLINE_S}",
                "trainer.weight_sync.bucket_mb=0.25",  # six buckets of the 1.3 MB model
                "trainer.weight_sync.backend=gloo",
                f"buffer.heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S}",
                f"model.max_position_embeddings={model_config().max_position_embeddings}",
            ],
        )
        write_job_key(tmp_path, sglang_server.api_key)  # the one the trainer drives both with
        spawn_python("buffer", ["--config-file", cfg_path], capture=False)
        a = Driver("rollout-a", lost.url, cfg, fault="bucket", engine_pid=pgid,
                   sglang=lost.api_key)
        b = Driver("rollout-b", sglang_server.url, cfg, sglang=sglang_server.api_key)
        for d in (a, b):
            d.start()
        pusher = start_pusher(
            spawn_python,
            cfg_path,
            tmp_path,
            [{"version": 1, "members": 2}, {"version": 2, "members": 1, "after": "checked-v1"}],
        )

        def report(version: int):
            assert pusher.poll() in (None, 0), f"the trainer died (exit {pusher.returncode})"
            assert a.error is None and b.error is None, (a.error, b.error)
            return read_json(tmp_path / f"v{version}.json")

        v1 = wait_until(lambda: report(1), REPORT_WAIT_S, 0.2, "trainer push v1")
        assert a.killed.is_set(), f"the fault never fired: {v1}"
        assert v1["members"] == ["rollout-a", "rollout-b"] and v1["reform"], v1
        assert v1["dropped"] == ["rollout-a"] and v1["done"] == ["rollout-b"], v1
        assert v1["repushed"] == ["rollout-b"], v1  # a new group without the lost member
        assert v1["blocked_s"] <= DEADLINE_S, v1
        wait_until(lambda: not group_members(pgid), 30, 0.1, "the lost SGLang's processes gone")
        asyncio.run(_serves(sglang_server, 1))
        (tmp_path / "checked-v1").write_text("ok")

        v2 = wait_until(lambda: report(2), REPORT_WAIT_S, 0.2, "trainer push v2")
        assert v2["members"] == ["rollout-b"] and v2["done"] == ["rollout-b"], v2
        assert not v2["reform"], v2  # the group re-formed for the survivor during v1 stays warm
        assert not v2["dropped"] and not v2["error"] and not v2["repushed"], v2
        asyncio.run(_serves(sglang_server, 2))
    finally:
        for d in (a, b):
            if d is not None:
                d.stop.set()
                d.join(timeout=15)
        lost.proc.stop()
