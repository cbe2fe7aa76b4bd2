"""Transport over real sockets between processes: request/reply, a peer killed with SIGKILL
(the caller gets TransportTimeout, never a hang), reconnect after the peer restarts on the same
address, late replies discarded, and PUB/SUB after the subscription is live."""

from __future__ import annotations

import asyncio
import select
import time

import numpy as np
import pytest
import zmq

from areal_like.net.dealer import AsyncClient, Client
from areal_like.net.pubsub import Subscriber
from areal_like.net.transport import Server, TransportTimeout
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 60.0  # cold interpreter start on a loaded 2-core machine
REQUEST_TIMEOUT_S = 20.0  # healthy-path requests: generous, the server answers in milliseconds
DEAD_PEER_TIMEOUT_S = 1.0  # requests to a killed server: short, this is what we measure
HANG_SLACK_S = 15.0  # a timeout may overshoot by scheduling delays under load, never by a hang

# The peer: a ROUTER server that answers
#   Heartbeat(policy_version=v, in_flight=ms)  -> HeartbeatAck(policy_version=v) after sleeping ms
#   StatsRequest                              -> Stats({"pid": pid, "served": n})
#   TrajectoryGroup                           -> Ack(ref=group_id, status="accepted")
# and, if given a second address, publishes a junk frame and VersionUpdate(n) every 50 ms.
SERVER = """
import os, sys, time
from areal_like.wire import protocol as P
from areal_like.net.pubsub import Publisher
from areal_like.net.transport import Server

server = Server(sys.argv[1])
pub = Publisher(sys.argv[2]) if len(sys.argv) > 2 else None
print("READY", flush=True)
served, published, next_pub = 0, 0, 0.0
while True:
    item = server.recv(0.02)
    if item is not None:
        peer, req_id, msg = item
        served += 1
        if isinstance(msg, P.Heartbeat):
            time.sleep(msg.in_flight / 1000)
            reply = P.HeartbeatAck(policy_version=msg.policy_version, known=True)
        elif isinstance(msg, P.TrajectoryGroup):
            reply = P.Ack(ref=msg.group_id, status="accepted", reason=str(msg.n_tokens))
        elif isinstance(msg, P.ProtocolError):
            reply = P.Ack(ref="", status="rejected", reason=str(msg))
        else:
            reply = P.Stats(values={"pid": os.getpid(), "served": served})
        server.send(peer, req_id, reply)
    if pub is not None and time.monotonic() >= next_pub:
        pub._sock.send(b"junk that is not a frame")
        pub.publish(P.VersionUpdate(policy_version=published))
        published += 1
        next_pub = time.monotonic() + 0.05
"""


def wait_ready(proc) -> None:
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
    line = proc.stdout.readline() if ready else ""
    assert line.strip() == "READY", (
        f"server did not start: {line!r} exit={proc.poll()} {proc.stderr.read()[-2000:]}")


@pytest.fixture
def endpoint(free_port):
    return f"tcp://127.0.0.1:{free_port()}"


def start_server(spawn_python, address: str, pub_address: str | None = None):
    proc = spawn_python(SERVER, [address, *([pub_address] if pub_address else [])])
    wait_ready(proc)
    return proc


def group(n_tokens: int = 64) -> P.TrajectoryGroup:
    t = Trajectory.of(prompt_ids=np.arange(8), output_ids=np.arange(n_tokens),
                     behav_logp=np.zeros(n_tokens),
                     versions=np.zeros(n_tokens), reward=1.0, finish_reason="stop")
    return P.TrajectoryGroup(group_id="s-1", server_id="s", lease_id="1", prompt_index=0, epoch=0,
                             trajectories=[t] * 4)


def expect_timeout(fn) -> float:
    t0 = time.monotonic()
    with pytest.raises(TransportTimeout):
        fn()
    elapsed = time.monotonic() - t0
    assert DEAD_PEER_TIMEOUT_S * 0.9 <= elapsed < DEAD_PEER_TIMEOUT_S + HANG_SLACK_S
    return elapsed


def test_request_reply_garbage_late_replies_kill9_and_reconnect(spawn_python, endpoint):
    """A Client and an AsyncClient through one server's life: kill -9, then a restart."""
    server = start_server(spawn_python, endpoint)
    client = Client(endpoint, timeout_s=REQUEST_TIMEOUT_S, identity="test")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)

    async def scenario() -> None:  # the Client's calls block the loop: nothing else runs then
        aclient = AsyncClient(endpoint, timeout_s=REQUEST_TIMEOUT_S, identity="async")
        try:
            first = client.request(P.StatsRequest())
            assert first.values["pid"] == server.pid
            ack = client.request(group(4096))  # a realistic frame (~200 KB, zero-copy path)
            assert ack.status == "accepted" and ack.ref == "s-1" and ack.reason == str(4 * 4096)
            # two concurrent requests on one async socket: each gets its own reply
            a, b = await asyncio.gather(
                aclient.request(P.Heartbeat(server_id="x", policy_version=5, in_flight=50)),
                aclient.request(P.Heartbeat(server_id="x", policy_version=6)))
            assert (a.policy_version, b.policy_version) == (5, 6)

            dealer.send_multipart([b"rid", b"\x81\xa4type\xa3bad"])  # garbage: a rejection
            assert dealer.poll(int(REQUEST_TIMEOUT_S * 1000))
            req_id, payload = dealer.recv_multipart()
            reply = P.decode(payload)
            assert req_id == b"rid" and isinstance(reply, P.Ack) and reply.status == "rejected"
            assert reply.reason.startswith("type: ") and "'bad'" in reply.reason  # names the field

            with pytest.raises(TransportTimeout):  # abandoned: its late reply is discarded
                client.request(P.Heartbeat(server_id="s", policy_version=1, in_flight=800),
                               timeout_s=0.2)
            reply = client.request(P.Heartbeat(server_id="s", policy_version=2, in_flight=0))
            assert isinstance(reply, P.HeartbeatAck) and reply.policy_version == 2
            time.sleep(0.8)  # the abandoned reply is surely sent by now; it must never surface
            assert isinstance(client.request(P.StatsRequest()), P.Stats)

            spawn_python.kill9(server)
            expect_timeout(lambda: client.request(P.StatsRequest(), timeout_s=DEAD_PEER_TIMEOUT_S))
            expect_timeout(lambda: client.request(P.StatsRequest(), timeout_s=DEAD_PEER_TIMEOUT_S))
            t0 = time.monotonic()
            with pytest.raises(TransportTimeout):
                await aclient.request(P.StatsRequest(), timeout_s=DEAD_PEER_TIMEOUT_S)
            assert time.monotonic() - t0 < DEAD_PEER_TIMEOUT_S + HANG_SLACK_S

            restarted = start_server(spawn_python, endpoint)  # same address, new process
            reply = client.request(P.StatsRequest())  # the same Client object reconnects
            assert reply.values["pid"] == restarted.pid != first.values["pid"]
            assert (await aclient.request(P.StatsRequest())).values["pid"] == restarted.pid
            # a cancelled request leaves a late reply behind; the next request must not see it
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(aclient.request(P.Heartbeat(server_id="x", policy_version=7,
                                                                   in_flight=800)),
                                       0.2)
            reply = await aclient.request(P.Heartbeat(server_id="x", policy_version=8))
            assert reply.policy_version == 8
        finally:
            aclient.close()

    try:
        asyncio.run(scenario())
    finally:
        client.close()
        dealer.close(linger=0)


def test_reply_with_another_req_id_is_skipped(endpoint):
    """req_id matching in isolation: a ROUTER that first answers with a stale id."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    client = Client(endpoint, timeout_s=REQUEST_TIMEOUT_S)
    try:
        import threading

        def answer():
            peer, req_id, _payload = router.recv_multipart()
            router.send_multipart([peer, b"stale-request-id",
                                   P.encode(P.VersionUpdate(policy_version=1))])
            router.send_multipart([peer, req_id, P.encode(P.VersionUpdate(policy_version=2))])

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        assert client.request(P.VersionUpdate(policy_version=0)).policy_version == 2
        thread.join(timeout=10)
    finally:
        client.close()
        router.close(linger=0)


def test_pub_sub_delivers_once_subscribed(spawn_python, free_port):
    req, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    start_server(spawn_python, req, pub)
    sub = Subscriber(pub)
    try:
        first = sub.recv(REQUEST_TIMEOUT_S)  # slow joiner: whatever was published before is gone
        assert isinstance(first, P.VersionUpdate)
        later = [sub.recv(REQUEST_TIMEOUT_S) for _ in range(3)]
        versions = [first.policy_version] + [m.policy_version for m in later]
        assert versions == sorted(versions) and len(set(versions)) == 4  # junk frames skipped
    finally:
        sub.close()

    async def async_side():
        asub = Subscriber(pub, asyncio_ctx=True)
        try:
            msg = await asub.arecv(REQUEST_TIMEOUT_S)
            assert isinstance(msg, P.VersionUpdate)
        finally:
            asub.close()

    asyncio.run(async_side())


def test_closed_client_refuses(endpoint):
    client = Client(endpoint, timeout_s=0.1)
    client.close()
    with pytest.raises(Exception, match="closed"):
        client.request(P.StatsRequest())
    server = Server(endpoint)
    try:
        assert server.recv(0.01) is None
    finally:
        server.close()
