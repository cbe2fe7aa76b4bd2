"""Per-peer caps at the buffer (buffer/peer_caps.py), through the service's real request handling:
a peer over its cap of held BatchRequests or of registered server ids is refused at once with a
``peer_limit`` reason and counted in ``buffer/rejected{peer_limit}``; other peers are unaffected."""

from __future__ import annotations

from areal_like import protocol as P
from areal_like.config import BufferConfig
from buffer.expiry import expire
from buffer.peer_caps import MAX_HELD_PER_PEER, MAX_SERVERS_PER_PEER
from tests.unit.service_harness import Sink, start

A, B = b"peer-a", b"peer-b"


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


def send(svc, peer: bytes, req_id: bytes, msg: P.Message) -> list[tuple[bytes, bytes, P.Message]]:
    """Handle one request as the loop does; the replies sent meanwhile (none for a held request)."""
    before = len(svc.server.to)
    frame = P.encode(msg)
    svc.handle(peer, req_id, P.decode(frame), frame)
    svc.settle(sweep=False)
    svc.wal.wait_durable()
    svc.send_durable()
    return svc.server.to[before:]


def test_a_peer_holding_too_many_batch_requests_is_refused_and_others_are_not(tmp_path):
    svc, _ = serve(tmp_path)
    request = P.BatchRequest(n_groups=2, trainer_version=0, wait_s=600.0)  # nothing stored: every one is held
    for i in range(MAX_HELD_PER_PEER):
        assert send(svc, A, b"a%d" % i, request) == []
    (peer, req_id, reply), = send(svc, A, b"over", request)
    assert (peer, req_id) == (A, b"over") and isinstance(reply, P.Batch) and reply.groups == []
    assert reply.reason.startswith("peer_limit: peer b'peer-a' already holds 4 BatchRequests")
    assert send(svc, B, b"b0", request) == []  # another peer is held as usual
    assert [p.peer for p in svc.handout.pending] == [A] * MAX_HELD_PER_PEER + [B]
    assert svc.stats()["rejected_peer_limit"] == 1


def test_a_peer_registering_too_many_server_ids_is_refused_and_others_are_not(tmp_path):
    svc, now = serve(tmp_path, heartbeat_timeout_s=15.0)

    def register(peer: bytes, server_id: str) -> P.Message:
        (_, _, reply), = send(svc, peer, server_id.encode(), P.Register(server_id=server_id, engine_url="http://e"))
        return reply

    for i in range(MAX_SERVERS_PER_PEER):
        assert isinstance(register(A, f"s{i}"), P.RegisterAck)
    refused = register(A, "s9")
    assert isinstance(refused, P.Ack) and refused.status == "rejected"
    assert refused.reason == (f"peer_limit: peer b'peer-a' already registered {MAX_SERVERS_PER_PEER} server ids on "
                              f"the roster (at most {MAX_SERVERS_PER_PEER}); refused 's9'")
    assert "s9" not in svc.control.roster and svc.stats()["rejected_peer_limit"] == 1
    assert isinstance(register(A, "s0"), P.RegisterAck)  # registering again is always fine
    assert isinstance(register(B, "s9"), P.RegisterAck)  # another peer is unaffected
    # an id that left the roster no longer counts: s1 falls silent, the others heartbeat
    now[0] = 20.0
    for sid in ("s0", "s2", "s3"):
        send(svc, A, b"hb", P.Heartbeat(server_id=sid, policy_version=0))
    expire(svc)
    assert "s1" not in svc.control.roster
    assert isinstance(register(A, "s5"), P.RegisterAck)
    assert isinstance(register(A, "s6"), P.Ack)  # and the cap holds again at four
    assert svc.stats()["rejected_peer_limit"] == 2
