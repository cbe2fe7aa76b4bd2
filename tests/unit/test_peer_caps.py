"""Per-member caps and roles at the buffer, through the service's request handling: a member (a
key's role, on any socket) over a cap is refused as ``peer_limit``, others unaffected; a rollout
key's BatchRequest as ``role``."""

from __future__ import annotations

from areal_like.settings.config import BufferConfig
from areal_like.wire import protocol as P
from buffer.facts import MIN_SERVERS
from buffer.peer_caps import MAX_HELD_PER_MEMBER
from tests.unit.service_harness import Sink, start

A, B, C = b"peer-a", b"peer-b", b"peer-c"  # sockets


class PeerSink(Sink):
    """Also keeps who each reply went to."""

    def __init__(self):
        super().__init__()
        self.to: list[tuple[bytes, bytes, P.Message]] = []

    def send(self, peer, req_id, msg):
        super().send(peer, req_id, msg)
        self.to.append((peer, req_id, msg))


def serve(tmp_path, **buffer):
    now = [0.0]
    svc = start(tmp_path, BufferConfig(**buffer), clock=lambda: now[0])
    svc.server = PeerSink()
    return svc, now


def send(svc, peer: bytes, req_id: bytes, msg: P.Message,
         member: str = "trainer") -> list[tuple[bytes, bytes, P.Message]]:
    """Handle one request as the loop does; the replies sent meanwhile (none for a held request)."""
    before = len(svc.server.to)
    frame = P.encode(msg)
    svc.handle(peer, req_id, P.decode(frame), frame, member)
    svc.settle(sweep=False)
    svc.wal.wait_durable()
    svc.send_durable()
    return svc.server.to[before:]


def test_a_member_holding_too_many_batch_requests_is_refused_on_any_socket(tmp_path):
    svc, _ = serve(tmp_path)
    request = P.BatchRequest(n_groups=2, trainer_version=0, wait_s=600.0)  # nothing stored: held
    for i in range(MAX_HELD_PER_MEMBER):
        assert send(svc, b"t%d" % i, b"a", request) == []  # a fresh socket each time: one member
    ((peer, req_id, reply),) = send(svc, A, b"over", request)
    assert (peer, req_id) == (A, b"over") and isinstance(reply, P.Batch) and reply.groups == []
    assert reply.reason.startswith("peer_limit: member 'trainer' already holds 4 BatchRequests")
    assert send(svc, B, b"b0", request, member="local") == []  # another member is held as usual
    assert [p.member for p in svc.handout.pending] == ["trainer"] * MAX_HELD_PER_MEMBER + ["local"]
    assert svc.stats()["rejected_peer_limit"] == 1


def test_a_member_registering_too_many_server_ids_is_refused_and_others_are_not(tmp_path):
    svc, now = serve(tmp_path, heartbeat_timeout_s=15.0)

    def register(peer: bytes, server_id: str, member: str = "rollout") -> P.Message:
        ((_, _, reply),) = send(svc, peer, server_id.encode(),
                                P.Register(server_id=server_id, engine_url="http://e"), member)
        return reply

    for i in range(MIN_SERVERS):
        assert isinstance(register(b"s%d" % i, f"s{i}"), P.RegisterAck)  # each from its own socket
    refused = register(C, "s9")
    assert isinstance(refused, P.Ack) and refused.status == "rejected"
    assert refused.reason == (
        f"peer_limit: member 'rollout' already has {MIN_SERVERS} server ids on "
        f"the roster (at most {MIN_SERVERS}: 2 x launch.num_rollout_servers per rollout node, "
        "at least 8, in the buffer's config); refused 's9'")
    assert "s9" not in svc.control.roster and svc.stats()["rejected_peer_limit"] == 1
    assert isinstance(register(C, "s0"), P.RegisterAck)  # registering again: from any socket
    assert isinstance(register(B, "s9", "local"), P.RegisterAck)  # another member is unaffected
    # an id that left the roster no longer counts: s1 falls silent, the others heartbeat
    now[0] = 20.0
    for i in range(MIN_SERVERS):
        if i != 1:
            send(svc, A, b"hb", P.Heartbeat(server_id=f"s{i}", policy_version=0), "rollout")
    svc.expire()
    assert "s1" not in svc.control.roster
    assert isinstance(register(A, "s10"), P.RegisterAck)
    assert isinstance(register(A, "s11"), P.Ack)  # and the cap holds again
    assert svc.stats()["rejected_peer_limit"] == 2


def test_new_server_ids_of_a_member_are_rate_limited_after_a_burst(tmp_path):
    svc, now = serve(tmp_path, heartbeat_timeout_s=1.0)
    def register(sid: str) -> P.Message:
        return send(svc, A, sid.encode(), P.Register(server_id=sid, engine_url="http://e"),
                    "rollout")[0][2]

    for i in range(MIN_SERVERS):  # the burst: every server of the job at once
        assert isinstance(register(f"a{i}"), P.RegisterAck)
    now[0] = 2.0  # all of them expire; the bucket refilled by 2 ids only
    svc.expire()
    assert not svc.control.roster
    assert [type(register(f"b{i}")).__name__ for i in range(4)] == ["RegisterAck"] * 2 + ["Ack"] * 2
    assert "faster than 1/s" in register("b9").reason
