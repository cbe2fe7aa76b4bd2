"""Versions come only from the trainer; the job says ok only when the trainer says
it reached ``trainer.steps`` (a real BufferService, hand-written trainer.jsonl records).
"""

from __future__ import annotations

import json
import logging

import torch
from test_buffer_service import TIMEOUT_S, make_cfg, running

from areal_like.net.dealer import Client
from areal_like.settings.config import WeightSyncConfig
from areal_like.wire import protocol as P
from launch.records import outcome
from trainer.weight_sync import WeightBroadcaster


def _stats(client) -> dict:
    return client.request(P.StatsRequest()).values


def test_a_version_from_another_peer_is_refused_and_a_trainer_ahead_is_taken_whole(tmp_path,
                                                                                   caplog):
    cfg = make_cfg(tmp_path)
    with running(cfg) as (svc, trainer):  # `running`'s client carries the trainer's routing id
        stranger = Client(cfg.buffer.address, timeout_s=TIMEOUT_S, identity="rollout-0")
        try:
            ack = stranger.request(P.VersionUpdate(policy_version=1))
            assert ack.status == "rejected" and ack.reason.startswith("not_trainer")
            anonymous = Client(cfg.buffer.address, timeout_s=TIMEOUT_S)  # ZMQ's random routing id
            assert anonymous.request(P.VersionUpdate(policy_version=1)).status == "rejected"
            anonymous.close()
            assert trainer.request(P.VersionUpdate(policy_version=1)).status == "ok"
            # a repeat, or an older version, is harmless
            assert trainer.request(P.VersionUpdate(policy_version=1)).status == "ok"
            assert trainer.request(P.VersionUpdate(policy_version=0)).status == "ok"
            reg = stranger.request(P.Register(server_id="trainer-ws-7", engine_url="http://x",
                                              policy_version=0))
            assert isinstance(reg, P.Ack) and reg.reason.startswith("reserved_id")
            s = _stats(trainer)
            assert s["policy_version"] == 1
            assert (s["rejected_not_trainer"], s["rejected_reserved_id"]) == (2, 1)
        finally:
            stranger.close()
    # rate-limited: once a minute
    assert any("not_trainer" in r.getMessage() for r in caplog.records)
    caplog.clear()
    caplog.set_level(logging.INFO)
    # the version was made durable; a trainer ahead of the restarted buffer (announcements it
    # never made durable, or a resume from a checkpoint) moves it in one announcement, unrefused;
    # the same run_dir on new ports (the stopped buffer's may not be free again at once)
    cfg = make_cfg(tmp_path)
    with running(cfg) as (svc, trainer):
        ws = WeightBroadcaster(WeightSyncConfig(), buffer_address=cfg.buffer.address, rank=0,
                               device=torch.device("cpu"))
        try:
            assert ws.announced_version(timeout_s=TIMEOUT_S) == 1
            assert ws.announce(3).error == "" and _stats(trainer)["policy_version"] == 3
            assert not [k for k, v in _stats(trainer).items() if k.startswith("rejected") and v]
        finally:
            ws.close()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _write(run_dir, *records) -> None:
    (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics" / "trainer.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))


def test_ok_only_when_the_trainer_says_it_reached_its_steps(tmp_path):
    step = {"step": 1, "policy_version": 1, "reward_mean": 0.5}
    _write(tmp_path, step)  # exit 0, but no "done" record: the trainer never said it finished
    # exit 0 short of the steps: stopped (a signal's exit would say so too), not failed
    assert outcome(tmp_path, 0) == {"ok": False, "end": "stopped", "exit_code": 0}
    done = {"event": "done", "policy_version": 40, "steps": 50, "steps_trained": 38,
            "rolled_back_steps": 2, "nonfinite_skipped": 0}
    _write(tmp_path, step, done)  # stopped at the end of data, 10 steps short
    assert outcome(tmp_path, 0)["ok"] is False
    resume = {"event": "resume", "policy_version": 9, "rolled_back_steps": 3,
              "rolled_back_total": 3}
    _write(tmp_path, step, resume,
           {**done, "policy_version": 50, "steps_trained": 47, "rolled_back_steps": 3,
            "nonfinite_skipped": 5})
    # a step whose loss was not finite holds its version but not its update: said beside it
    assert outcome(tmp_path, 0) == {"ok": True, "end": "completed", "exit_code": 0,
                                    "steps_trained": 47, "rolled_back_steps": 3,
                                    "nonfinite_skipped": 5}
    assert outcome(tmp_path, 1)["ok"] is False
    _write(tmp_path, step, resume)  # crashed out of restarts after a resume
    assert outcome(tmp_path, 1) == {"ok": False, "end": "failed", "exit_code": 1,
                                    "rolled_back_steps": 3}
    assert outcome(tmp_path, 143)["end"] == "stopped"  # areal-like stop: SIGTERM
