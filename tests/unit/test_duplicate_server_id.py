"""Two rollout server processes under one ``rollout.server_id``: the real request handling, a fake
clock (service_harness); the process-level check: tests/integration/test_rollout_leave.py."""

from __future__ import annotations

import logging

from service_harness import Clock, start, step

from areal_like.settings.config import BufferConfig
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from buffer.service import BufferService

OLD, NEW = "a" * 16, "b" * 16
HEARTBEAT_S = 15.0


def _start(tmp_path, clock: Clock) -> BufferService:
    return start(tmp_path, BufferConfig(max_staleness=4, groups_per_step=2, max_inflight=32,
                                        capacity=64, heartbeat_timeout_s=HEARTBEAT_S), clock=clock)


def _step(svc: BufferService, msg: P.Message) -> P.Message:
    return step(svc, msg, peer=b"rollout")


def _register(svc: BufferService, incarnation: str, url: str = "http://x") -> P.Message:
    return _step(svc, P.Register(server_id="rollout-0", engine_url=url, policy_version=0,
                                 incarnation=incarnation, fresh=True))


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
    clock = Clock()
    svc = _start(tmp_path, clock)
    assert isinstance(_register(svc, OLD), P.RegisterAck)
    # a keyholder naming the live server's id without its incarnation: no leave, no keep-alive
    for msg in (P.Heartbeat(server_id="rollout-0", policy_version=0, leaving=True),
                P.Heartbeat(server_id="rollout-0", policy_version=0),
                P.CreditRequest(server_id="rollout-0", max_credits=2), _group("")):
        assert _told_to_stop(_step(svc, msg)), msg.TYPE
    assert "rollout-0" in svc.control.roster
    assert isinstance(_register(svc, OLD, url="http://attacker"), P.Ack)  # held: id_in_use
    caplog.clear()
    clock.t += HEARTBEAT_S + 1  # the first one stalled (SIGSTOP) or died: silent past the timeout
    # a second rollout-0 started by hand (the keyless messages kept nothing alive): it takes the
    # id, as a restart does
    assert isinstance(_register(svc, NEW), P.RegisterAck)
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


def test_a_second_process_is_refused_while_the_first_is_heard_and_the_first_is_told(tmp_path):
    clock = Clock()
    svc = _start(tmp_path, clock)
    assert isinstance(_register(svc, OLD), P.RegisterAck)
    for incarnation, url in ((NEW, "http://x"), (OLD, "http://elsewhere"), ("", "http://x")):
        clock.t += HEARTBEAT_S / 2
        beat = _step(svc, P.Heartbeat(server_id="rollout-0", policy_version=0, incarnation=OLD))
        assert isinstance(beat, P.HeartbeatAck) and beat.known and not beat.challenged
        refused = _register(svc, incarnation, url)
        assert (isinstance(refused, P.Ack) and refused.status == "rejected"
                and refused.reason.startswith("id_in_use: server id 'rollout-0' is held by a "
                                              "live process")
                and "buffer.heartbeat_timeout_s=15s" in refused.reason), refused
        beat = _step(svc, P.Heartbeat(server_id="rollout-0", policy_version=0, incarnation=OLD))
        assert beat.known and beat.challenged.startswith("a Register under this server's id")
    assert svc.control.roster["rollout-0"].entry.incarnation == OLD
    assert svc.instruments.counts["rejected_id_in_use"] == 3
    svc.wal.close()
