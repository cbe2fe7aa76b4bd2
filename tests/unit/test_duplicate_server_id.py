"""Two rollout server processes under one ``rollout.server_id``: the newest Register wins, and the
older process is told to stop (an Ack ``duplicate_id`` naming the id) when the buffer hears from it
again, by its heartbeat, credit request or group; its leaving heartbeat does not take the newer
one off the roster; the buffer warns once per such process. A restart (the older process dead)
costs nothing more than before. The real request handling with fake sockets (service_harness);
the process-level check is in tests/integration/test_rollout_leave.py."""

from __future__ import annotations

import logging

from service_harness import start, step

from areal_like.settings.config import BufferConfig
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from buffer.service import BufferService

OLD, NEW = "a" * 16, "b" * 16


def _start(tmp_path) -> BufferService:
    return start(tmp_path, BufferConfig(max_staleness=4, groups_per_step=2, max_inflight=32,
                                        capacity=64))


def _step(svc: BufferService, msg: P.Message) -> P.Message:
    return step(svc, msg, peer=b"rollout")


def _register(svc: BufferService, incarnation: str) -> None:
    ack = _step(svc, P.Register(server_id="rollout-0", engine_url="http://x", policy_version=0,
                                incarnation=incarnation, fresh=True))
    assert isinstance(ack, P.RegisterAck)


def _group(incarnation: str) -> P.TrajectoryGroup:
    t = Trajectory.of(prompt_ids=as_i32([1]), output_ids=as_i32([2, 3]),
                      behav_logp=as_f32([-1, -1]), versions=as_i32([0, 0]), reward=1.0,
                      finish_reason="stop")
    return P.TrajectoryGroup(group_id="g", server_id="rollout-0", lease_id="l", prompt_index=0,
                             epoch=0, trajectories=[t], incarnation=incarnation)


def _told_to_stop(reply: P.Message) -> bool:
    return (isinstance(reply, P.Ack) and reply.status == "rejected"
            and reply.reason.startswith("duplicate_id: another process registered as rollout-0")
            and "rollout.server_id" in reply.reason)


def test_the_older_process_of_an_id_is_told_to_stop_and_cannot_unregister_the_newer(
        tmp_path, caplog):
    svc = _start(tmp_path)
    _register(svc, OLD)
    _register(svc, NEW)  # a second rollout-0 started by hand: it wins, as a restart does
    with caplog.at_level(logging.WARNING, logger=svc.log.name):
        for msg in (P.Heartbeat(server_id="rollout-0", policy_version=0, incarnation=OLD),
                    P.CreditRequest(server_id="rollout-0", max_credits=2, incarnation=OLD),
                    _group(OLD),
                    P.Heartbeat(server_id="rollout-0", policy_version=0, leaving=True,
                                incarnation=OLD)):
            assert _told_to_stop(_step(svc, msg)), msg.TYPE
    warned = [r for r in caplog.records if "rollout.server_id" in r.getMessage()]
    assert len(warned) == 1 and "rollout-0" in warned[0].getMessage()
    assert "rollout-0" in svc.control.roster  # the older one's leaving took nothing off
    ack = _step(svc, P.Heartbeat(server_id="rollout-0", policy_version=0, incarnation=NEW))
    assert isinstance(ack, P.HeartbeatAck) and ack.known
    credits = _step(svc, P.CreditRequest(server_id="rollout-0", max_credits=2, incarnation=NEW))
    assert isinstance(credits, P.Credits) and len(credits.credits) == 2
    svc.wal.close()


def test_a_restarted_server_and_a_sender_that_tells_no_incarnation_are_served_as_before(tmp_path):
    svc = _start(tmp_path)
    _register(svc, OLD)
    _register(svc, NEW)  # the old process was killed -9: only the new one speaks
    for incarnation in (NEW, ""):  # "": a sender from before incarnations in these messages
        ack = _step(svc, P.Heartbeat(server_id="rollout-0", policy_version=0,
                                     incarnation=incarnation))
        assert isinstance(ack, P.HeartbeatAck) and ack.known
    svc.wal.close()
