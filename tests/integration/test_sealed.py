"""Sealed bulk frames over real sockets (areal_like/sealed.py, areal_like/bulk.py): a CURVE handshake
hands out the session, requests and replies travel AES-GCM sealed on the bulk port, and whatever a
stranger sends there (garbage, forged or replayed frames, a wrong key) gets no reply and is counted
as a ``sealed`` refusal. A server killed with SIGKILL and started again is reached again after one
timeout, through a new handshake."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest
import zmq

from areal_like import protocol as P
from areal_like import sealed, security
from areal_like.dealer import AsyncClient, Client
from areal_like.distributed import free_port
from areal_like.peers import TRAINER_PEER
from areal_like.trajectory import Trajectory, as_f32, as_i32
from areal_like.transport import MAX_HANDLED_PER_RECV, Server, TransportError, TransportTimeout, new_socket

REQUEST_S = 30.0  # a live server answers in milliseconds, on a loaded machine too
STRANGER_WAIT_S = 1.0  # how long a stranger listens for an answer that must never come

SERVER_SCRIPT = r"""
import sys
from areal_like import protocol as P, security
from areal_like.transport import Server

keys_dir, address, bulk_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
security.set_sealed_bulk(True, bulk_port)
with security.using(security.load(keys_dir, security.SERVER)):
    server = Server(address)
print("READY", server.bulk_port, flush=True)
while True:
    if (got := server.recv(1.0)) is not None:
        peer, req_id, msg = got
        server.send(peer, req_id, P.Ack(ref=msg.TYPE, status="accepted", reason=str(server.bulk_port)))
"""


class EchoServer:
    """A sealed-mode Server in a thread of this process: answers every request with an Ack naming the
    request's type and the peer it came from; records what reached it and the refusals counted."""

    def __init__(self, keys_dir):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        with security.using(security.load(keys_dir, security.SERVER)):
            self.server = Server(self.address)
        self.seen: list[tuple[bytes, P.Message]] = []
        self.refused: list[str] = []
        security.on_refused(self.refused.append)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if (got := self.server.recv(0.05)) is not None:
                peer, req_id, msg = got
                self.seen.append((peer, msg))
                self.server.send(peer, req_id, P.Ack(ref=getattr(msg, "TYPE", "error"), status="accepted",
                                                     reason=peer.decode(errors="replace")))

    def sealed_refusals(self) -> int:
        return self.refused.count("sealed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.server.close()
        security._refused_callbacks.remove(self.refused.append)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    """One job's keys for the module: a process's ZAP handler takes the allow-list of the first
    server keys it serves (areal_like/security.py ``_authenticator``)."""
    keys = tmp_path_factory.mktemp("sealed") / "keys"
    security.make_keys(keys)
    return keys


@pytest.fixture
def echo(keys_dir):
    server = EchoServer(keys_dir)
    yield server
    server.close()


def client(keys_dir, address: str, role: str = "rollout", identity: str | None = "r", timeout_s=REQUEST_S) -> Client:
    with security.using(security.load(keys_dir, role)):
        return Client(address, timeout_s=timeout_s, identity=identity)


def big_group() -> P.TrajectoryGroup:
    traj = Trajectory.of(prompt_ids=as_i32(np.arange(256)), output_ids=as_i32(np.arange(4096) % 32000),
                         behav_logp=as_f32(np.full(4096, -0.5)), versions=as_i32(np.zeros(4096)), reward=1.0,
                         finish_reason="length")
    return P.TrajectoryGroup(group_id="g", server_id="r", lease_id="l", prompt_index=0, epoch=0,
                             trajectories=[traj] * 8)


def stranger(address: str, identity: bytes | None = None) -> zmq.Socket:
    """A plain DEALER with no keys at all, straight to ``address``."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(address)
    return sock


def bulk(echo: EchoServer) -> str:
    return f"tcp://127.0.0.1:{echo.server.bulk_port}"


def test_round_trip_through_the_sealed_channel(echo, keys_dir):
    c = client(keys_dir, echo.address)
    group = big_group()
    ack = c.request(group)
    assert ack.ref == "trajectory_group" and ack.reason.startswith("r-")
    assert c._channel is not None and c._sock.getsockopt(zmq.MECHANISM) == zmq.NULL  # on the bulk connection
    assert P.encode(echo.seen[-1][1]) == P.encode(group)  # decoded intact on the server
    session = echo.server._bulk.sessions.for_peer(echo.seen[-1][0])
    assert session.role == "rollout" and session.channel.received == 1
    assert c.request(P.StatsRequest()).ref == "stats_request" and session.channel.received == 2

    async def twice():
        with security.using(security.load(keys_dir, "trainer")):
            ac = AsyncClient(echo.address, timeout_s=REQUEST_S, identity="a")
        return [(await ac.request(P.RosterRequest())).ref for _ in range(2)], ac

    refs, ac = asyncio.run(twice())
    assert refs == ["roster_request"] * 2 and ac._channel is not None
    c.close(), ac.close()
    assert echo.sealed_refusals() == 0


def test_stranger_on_the_bulk_port_gets_nothing_and_is_counted(echo, keys_dir):
    c = client(keys_dir, echo.address)
    c.request(P.StatsRequest())
    sid = c._channel.sid
    before, seen = echo.sealed_refusals(), len(echo.seen)
    s = stranger(bulk(echo))
    s.send_multipart([os.urandom(16), os.urandom(600)])  # random bytes, no session
    s.send_multipart([b"garbage"])  # not even [req_id, frame]
    s.send_multipart([b"a", b"b", b"c"])
    s.send_multipart([os.urandom(16), sid + (99).to_bytes(8, "big") + os.urandom(64)])  # forged under a real session id
    s.send_multipart([os.urandom(16), P.encode(P.StatsRequest())])  # a plain protocol message
    assert not s.poll(int(STRANGER_WAIT_S * 1000))
    assert echo.sealed_refusals() - before == 5 and len(echo.seen) == seen
    assert c.request(P.StatsRequest()).ref == "stats_request"  # the session goes on unharmed
    s.close(), c.close()


def test_a_client_shakes_hands_again_once_its_session_key_carried_its_budget(echo, keys_dir, monkeypatch):
    group = big_group()
    monkeypatch.setattr(sealed, "SESSION_BYTES", 2 * len(P.encode(group)))  # shared with the server's thread
    c = client(keys_dir, echo.address)
    sids = []
    for _ in range(5):
        assert c.request(group).ref == "trajectory_group"
        sids.append(c._channel.sid)
    # a key carries two groups (and their acks) before the budget is spent; the third request shakes hands first
    assert sids[0] == sids[1] != sids[2] == sids[3] != sids[4]
    assert [msg.TYPE for _, msg in echo.seen] == ["trajectory_group"] * 5 and echo.sealed_refusals() == 0
    assert len(echo.server._bulk.sessions) == 1  # the two spent sessions were forgotten, the live one kept
    c.close()
    with pytest.raises(TransportError, match="closed"):
        c.request(group)  # a closed client stays closed, spent session or not


def test_a_replayed_frame_is_refused_and_counted(echo, keys_dir):
    c = client(keys_dir, echo.address)
    c.request(P.StatsRequest())
    captured = []
    seal_in_place = c._channel.seal_in_place

    def capture(req_id, buf):  # a wiretap: the frame as it is sent
        captured.append((req_id, bytes(seal_in_place(req_id, buf))))
        return buf

    c._channel.seal_in_place = capture
    c.request(P.RosterRequest())
    before, seen = echo.sealed_refusals(), len(echo.seen)
    s = stranger(bulk(echo))
    s.send_multipart(list(captured[0]))  # the frame exactly as it went over the wire
    assert not s.poll(int(STRANGER_WAIT_S * 1000))
    assert echo.sealed_refusals() - before == 1 and len(echo.seen) == seen
    s.close(), c.close()


def test_a_frame_sealed_with_a_wrong_key_is_refused(echo, keys_dir):
    c = client(keys_dir, echo.address)
    c.request(P.StatsRequest())
    forged = sealed.Channel(c._channel.sid, os.urandom(32), sealed.TO_SERVER, sent=c._channel.sent)
    before, seen = echo.sealed_refusals(), len(echo.seen)
    s = stranger(bulk(echo))
    req_id = os.urandom(16)
    s.send_multipart([req_id, forged.seal(req_id, P.encode(P.RosterRequest()))])
    assert not s.poll(int(STRANGER_WAIT_S * 1000))
    assert echo.sealed_refusals() - before == 1 and len(echo.seen) == seen
    s.close(), c.close()


def test_a_session_keeps_the_role_curve_gave_it(echo, keys_dir):
    with pytest.raises(TransportError, match="session refused"):  # a rollout key cannot be the trainer's peer
        client(keys_dir, echo.address, "rollout", TRAINER_PEER).request(P.StatsRequest())
    assert echo.sealed_refusals() == 1 and echo.seen == []
    trainer = client(keys_dir, echo.address, "trainer", TRAINER_PEER)
    assert trainer.request(P.StatsRequest()).reason.startswith(TRAINER_PEER + "-")
    assert echo.server._bulk.sessions.for_peer(echo.seen[-1][0]).role == "trainer"
    # a rollout session whose bulk connection claims the trainer's routing id still speaks as itself
    c = client(keys_dir, echo.address, "rollout", "r")
    c.request(P.StatsRequest())
    curve_peer = echo.seen[-1][0]
    impostor = stranger(bulk(echo), identity=f"{TRAINER_PEER}-evil".encode())
    req_id = os.urandom(16)
    impostor.send_multipart([req_id, c._channel.seal(req_id, P.encode(P.StatsRequest()))])
    assert impostor.poll(int(REQUEST_S * 1000))
    rid, reply = impostor.recv_multipart()
    assert rid == req_id and P.decode(c._channel.open(rid, reply)).reason == curve_peer.decode()
    assert echo.seen[-1][0] == curve_peer and echo.server._bulk.sessions.for_peer(curve_peer).role == "rollout"
    impostor.close(), trainer.close(), c.close()


def test_a_flood_on_the_bulk_port_never_holds_recv_past_its_share(keys_dir):
    """A keyless flood is handled a bounded number of frames per ``recv`` (the daemon's loop goes on to
    answer its members), and a frame over the largest sealed frame a member may send is cut by ZeroMQ."""
    refused: list[str] = []
    security.on_refused(refused.append)
    with security.using(security.load(keys_dir, security.SERVER)):
        server = Server(f"tcp://127.0.0.1:{free_port()}", max_frame_bytes=1000)
    assert server._bulk.sock.getsockopt(zmq.MAXMSGSIZE) == 2 * 1000 + sealed.OVERHEAD_BYTES
    s = stranger(f"tcp://127.0.0.1:{server.bulk_port}")
    n = 300
    try:
        for _ in range(n):
            s.send_multipart([os.urandom(16), os.urandom(64)])
        deadline = time.monotonic() + REQUEST_S
        while refused.count("sealed") < n and time.monotonic() < deadline:
            before = refused.count("sealed")
            assert server.recv(REQUEST_S) is None  # returns although its wait is far from over
            assert refused.count("sealed") - before <= MAX_HANDLED_PER_RECV
        assert refused.count("sealed") == n
        big = stranger(f"tcp://127.0.0.1:{server.bulk_port}")
        big.send_multipart([os.urandom(16), os.urandom(2 * 1000 + sealed.OVERHEAD_BYTES + 1)])  # cut, never seen
        s.send_multipart([os.urandom(16), os.urandom(64)])
        for _ in range(5):
            server.recv(0.2)
        assert refused.count("sealed") == n + 1
        big.close()
    finally:
        s.close()
        server.close()
        security._refused_callbacks.remove(refused.append)


def test_a_flood_on_the_bulk_port_does_not_starve_the_curve_socket(keys_dir):
    """The two sockets of a sealed Server take turns: a member's handshake on the CURVE socket is
    answered while a keyless flood is still queued on the bulk port, not after it."""
    refused: list[str] = []
    security.on_refused(refused.append)
    with security.using(security.load(keys_dir, security.SERVER)):
        server = Server(f"tcp://127.0.0.1:{free_port()}")
    s = stranger(f"tcp://127.0.0.1:{server.bulk_port}")
    with security.using(security.load(keys_dir, "rollout")):
        member = new_socket(zmq.Context.instance(), zmq.DEALER)
        security.connect(member, server.address)
    n = 200
    try:
        for _ in range(n):
            s.send_multipart([os.urandom(16), os.urandom(64)])
        member.send_multipart([b"req-1", sealed.HELLO])
        assert server._bulk.sock.poll(int(REQUEST_S * 1000)) and server._sock.poll(int(REQUEST_S * 1000))
        deadline = time.monotonic() + REQUEST_S
        while not member.poll(0) and time.monotonic() < deadline:
            server.recv(0)  # one frame per call: its deadline is over once a frame is handled
            member.poll(10)
        req_id, reply = member.recv_multipart()
        assert req_id == b"req-1" and reply.startswith(sealed.WELCOME)
        assert refused.count("sealed") <= 2 < n  # answered after at most a frame or two of the flood
    finally:
        s.close()
        member.close(linger=0)
        server.close()
        security._refused_callbacks.remove(refused.append)


def test_another_roles_key_under_the_trainers_peer_id_is_refused_on_plain_curve(echo, keys_dir):
    security.set_sealed_bulk(False)  # the CURVE socket itself, as with security.sealed_bulk=false
    try:
        impostor = client(keys_dir, echo.address, "rollout", TRAINER_PEER, timeout_s=STRANGER_WAIT_S)
        trainer = client(keys_dir, echo.address, "trainer", TRAINER_PEER)
    finally:
        security.set_sealed_bulk(True)
    with pytest.raises(TransportTimeout):
        impostor.request(P.VersionUpdate(policy_version=1))
    assert echo.refused.count("role") == 1 and echo.seen == []
    assert trainer.request(P.StatsRequest()).reason.startswith(TRAINER_PEER + "-")  # the trainer's key passes
    impostor.close(), trainer.close()


@pytest.mark.parametrize("fixed_bulk_port", [False, True], ids=["any_bulk_port", "fixed_bulk_port"])
def test_server_restart_makes_the_client_shake_hands_again(keys_dir, spawn_python, fixed_bulk_port):
    address, port = f"tcp://127.0.0.1:{free_port()}", free_port() if fixed_bulk_port else 0

    def start():
        proc = spawn_python(SERVER_SCRIPT, [keys_dir, address, port])
        line = proc.stdout.readline().split()  # blocks until the server is up (or died: empty)
        assert line[:1] == ["READY"], proc.stderr.read()
        return proc, int(line[1])

    proc, bulk_port = start()
    assert not fixed_bulk_port or bulk_port == port
    c = client(keys_dir, address, timeout_s=5.0)
    assert c.request(P.StatsRequest()).reason == str(bulk_port)
    first_sid = c._channel.sid
    spawn_python.kill9(proc)
    proc, bulk_port = start()
    with pytest.raises(TransportTimeout):  # the old session is gone with the old server
        c.request(P.StatsRequest())
    assert c.request(P.StatsRequest()).reason == str(bulk_port)  # a new handshake, transparently
    assert c._channel is not None and c._channel.sid != first_sid
    c.close()
