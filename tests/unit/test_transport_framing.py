"""The transport's per-frame send (``FrameWriter``): a failed NOBLOCK send queues nothing, asyncio
sockets keep their own path. (Its framing, and ``recv_parts``', through every Server and Client
round trip: test_transport_copies.py.) In one process over loopback TCP."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import zmq
import zmq.asyncio

from areal_like.net.dealer import AsyncClient
from areal_like.net.transport import FrameWriter, Server, new_socket
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory

TIMEOUT_MS = 20_000  # loopback on a loaded 2-core box: generous, frames take milliseconds


def small_group(seed: int) -> P.TrajectoryGroup:
    traj = Trajectory.of(prompt_ids=np.arange(3, dtype=np.int32),
                        output_ids=np.arange(5, dtype=np.int32) + seed,
                        behav_logp=-np.ones(5, dtype=np.float32),
                        versions=np.zeros(5, dtype=np.int32),
                        reward=1.0, finish_reason="stop")
    return P.TrajectoryGroup(group_id=f"g-{seed}", server_id="s", lease_id="l", prompt_index=seed,
                             epoch=0, trajectories=[traj])


@pytest.fixture
def router(free_port):
    sock = new_socket(zmq.Context.instance(), zmq.ROUTER, None)
    port = free_port()
    sock.bind(f"tcp://127.0.0.1:{port}")
    try:
        yield sock, f"tcp://127.0.0.1:{port}"
    finally:
        sock.close(linger=0)


def recv_all(sock: zmq.Socket) -> list[bytes]:
    assert sock.poll(TIMEOUT_MS), "nothing arrived"
    return sock.recv_multipart()


def test_a_refused_noblock_send_queues_no_partial_message(router):
    """A DEALER with no peer refuses at once (zmq.Again on the first part); nothing of that message
    may be left queued to prefix the next one."""
    sock, address = router
    dealer = new_socket(zmq.Context.instance(), zmq.DEALER, None)
    try:
        writer = FrameWriter()
        with pytest.raises(zmq.Again):
            writer.send(dealer, [b"lost"], small_group(2), zmq.NOBLOCK)
        dealer.connect(address)
        writer.send(dealer, [b"kept"], small_group(3), zmq.NOBLOCK)
        got = recv_all(sock)
        assert got[1:] == [b"kept", P.encode(small_group(3))]
        assert not sock.poll(200)
    finally:
        dealer.close(linger=0)


def test_asyncio_sockets_keep_their_own_send(free_port):
    """zmq.asyncio sockets are not plain zmq.Socket: FrameWriter sends them with send_multipart."""
    address = f"tcp://127.0.0.1:{free_port()}"
    server = Server(address)
    ctx = zmq.asyncio.Context.instance()

    async def go() -> None:
        dealer = new_socket(ctx, zmq.DEALER, None)
        dealer.connect(address)
        try:
            await FrameWriter().send(dealer, [b"rid"], small_group(4), zmq.NOBLOCK)
        finally:
            await asyncio.sleep(0)
            got = server.recv(TIMEOUT_MS / 1000)
            dealer.close(linger=0)
        assert got is not None and got[1] == b"rid" and got[2].group_id == "g-4"

    try:
        asyncio.run(go())
    finally:
        server.close()


def test_request_many_pipelines_and_matches_replies_by_request(free_port):
    """AsyncClient.request_many puts every request on the wire before any reply, and returns the
    replies in request order whatever order they come back in; a reply that does not decode is a
    ProtocolError for its own request only; an unanswered call gives None for each request (and a
    fresh socket: a late reply to the old one is never taken for a new request's)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    server = Server(address)
    received: list = []

    def answer_in_reverse() -> None:
        # all three before the first reply
        received.extend(server.recv(TIMEOUT_MS / 1000) for _ in range(3))
        for peer, req_id, msg in reversed(received):
            if msg.group_id == "g-1":
                server._sock.send_multipart([peer, req_id, b"\x00not a message"])
            else:
                server.send(peer, req_id, P.Ack(ref=msg.group_id, status="accepted"))

    async def go() -> None:
        client = AsyncClient(address, timeout_s=TIMEOUT_MS / 1000)
        try:
            thread = threading.Thread(target=answer_in_reverse, daemon=True)
            thread.start()
            first, bad, last = await client.request_many([small_group(i) for i in range(3)])
            thread.join(TIMEOUT_MS / 1000)
            assert None not in received and (first.ref, last.ref) == ("g-0", "g-2")
            assert isinstance(bad, P.ProtocolError)
            old = client._sock
            assert await client.request_many([small_group(7), small_group(8)],
                                             timeout_s=0.2) == [None, None]
            assert client._sock is not old
            with pytest.raises(TimeoutError):
                await client.request(small_group(9), timeout_s=0.2)
        finally:
            client.close()

    try:
        asyncio.run(go())
    finally:
        server.close()
