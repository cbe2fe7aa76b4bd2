"""Transport copy discipline over loopback TCP: zero-copy views, the kept encode buffer, bounds."""

from __future__ import annotations

import gc
import sys
import time

import numpy as np
import pytest
import zmq

from areal_like.net import transport
from areal_like.net.dealer import Client
from areal_like.net.transport import FrameWriter, Server, new_socket
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory

REQUEST_TIMEOUT_S = 20.0  # loopback on a loaded 2-core box: generous, answers take milliseconds


def group(seed: int, tokens: int = 4096, n: int = 4) -> P.TrajectoryGroup:
    rng = np.random.default_rng(seed)
    trajs = [Trajectory.of(prompt_ids=rng.integers(0, 1000, 16, dtype=np.int32),
                          output_ids=rng.integers(0, 1000, tokens, dtype=np.int32),
                          behav_logp=-rng.random(tokens, dtype=np.float32),
                          versions=np.full(tokens, seed, dtype=np.int32), reward=float(seed),
                          finish_reason="stop")
             for _ in range(n)]
    return P.TrajectoryGroup(group_id=f"g-{seed}", server_id="s", lease_id=str(seed),
                             prompt_index=seed, epoch=0, trajectories=trajs)


def same_group(a: P.TrajectoryGroup, b: P.TrajectoryGroup) -> bool:
    return a.group_id == b.group_id and all(
        np.array_equal(getattr(x, f), getattr(y, f)) for x, y in zip(a.trajectories, b.trajectories)
        for f in ("prompt_ids", "output_ids", "behav_logp", "versions"))


@pytest.fixture
def server_and_dealer(free_port):
    address = f"tcp://127.0.0.1:{free_port()}"
    server = Server(address)
    dealer = new_socket(zmq.Context.instance(), zmq.DEALER, None)
    dealer.connect(address)
    try:
        yield server, dealer
    finally:
        dealer.close(linger=0)
        server.close()


def receive(server: Server, n: int) -> list:
    got = []
    while len(got) < n:
        item = server.recv_request(REQUEST_TIMEOUT_S)
        assert item is not None, f"received {len(got)} of {n} requests"
        got.append(item[:4])
    return got


def test_decoded_arrays_and_the_payload_outlive_the_received_frame(server_and_dealer):
    server, dealer = server_and_dealer
    writer = FrameWriter()
    sent = group(1)
    writer.send(dealer, [b"r1"], sent)
    [(_peer, req_id, msg, payload)] = receive(server, 1)
    assert req_id == b"r1" and isinstance(msg, P.TrajectoryGroup)
    arr = msg.trajectories[0].output_ids
    assert not arr.flags.owndata and not arr.flags.writeable  # a view of ZMQ's buffer, not a copy
    assert isinstance(arr.base, memoryview) and isinstance(arr.base.obj, zmq.Frame)
    kept_payload = payload  # the buffer daemon logs the payload and replays it with decode
    del payload
    gc.collect()
    for seed in range(2, 12):  # new frames reuse whatever memory was freed meanwhile
        writer.send(dealer, [b"r"], group(seed))
    others = receive(server, 10)
    del others
    gc.collect()
    assert same_group(msg, sent)  # the arrays still read the first frame's bytes
    del msg
    gc.collect()
    assert same_group(P.decode(kept_payload), sent) and P.decode(bytes(kept_payload)) is not None


def test_kept_buffer_never_corrupts_queued_frames(server_and_dealer):
    server, dealer = server_and_dealer
    writer = FrameWriter()
    sent = [group(seed, tokens=512 * (seed + 1)) for seed in range(6)]
    for i, g in enumerate(sent):  # all queued before the server reads any
        writer.send(dealer, [str(i).encode()], g)
    buffer = writer._buf
    got = receive(server, len(sent))
    assert [r for _, r, _, _ in got] == [str(i).encode() for i in range(len(sent))]
    assert all(same_group(m, g) for (_, _, m, _), g in zip(got, sent))
    writer.send(dealer, [b"x"], group(9))
    assert writer._buf is buffer  # one kept buffer: no allocation per frame
    receive(server, 1)


def test_frames_above_the_kept_size_hand_their_buffer_over(server_and_dealer, monkeypatch):
    """A refused oversized message's grown buffer is not kept either (the limit is hundreds of
    MB)."""
    server, dealer = server_and_dealer
    monkeypatch.setattr(transport, "SCRATCH_KEEP_BYTES", 64 * 1024)
    monkeypatch.setattr(P, "MAX_FRAME_BYTES", 256 * 1024)
    writer = FrameWriter()
    big, small = group(5), P.Ack(ref="r", status="ok")  # big: ~200 KB
    first = writer._buf
    writer.send(dealer, [b"big"], big)
    assert writer._buf is not first and len(writer._buf) == 0  # libzmq owns the old one now
    kept = writer._buf
    writer.send(dealer, [b"small"], small)
    assert writer._buf is kept
    (_, _, m1, _), (_, _, m2, _) = receive(server, 2)
    assert same_group(m1, big) and isinstance(m2, P.Ack) and m2.ref == "r"
    with pytest.raises(P.ProtocolError, match="exceeds"):
        writer.send(dealer, [b"huge"], group(5, tokens=8192))  # ~400 KB
    assert sys.getsizeof(writer._buf) <= transport.SCRATCH_KEEP_BYTES
    assert server.recv(0.2) is None  # nothing was sent
    writer.send(dealer, [b"after"], small)
    assert receive(server, 1)[0][1] == b"after"


def test_invalid_message_sends_nothing(server_and_dealer):
    server, dealer = server_and_dealer
    writer = FrameWriter()
    bad = P.Stats(values={"x": object()})
    with pytest.raises(P.ProtocolError) as info:
        writer.send(dealer, [b"bad"], bad)
    assert info.value.field == "frame"
    assert server.recv(0.2) is None
    client = Client(server.address, timeout_s=0.2)
    try:
        with pytest.raises(P.ProtocolError):
            client.request(bad)
    finally:
        client.close()
    assert server.recv(0.2) is None


def test_a_frame_above_the_incoming_limit_never_reaches_the_server(free_port, monkeypatch):
    """Past INCOMING_LIMIT_FACTOR x the frame limit libzmq cuts the peer; below: a ProtocolError."""
    monkeypatch.setattr(P, "MAX_FRAME_BYTES", 128 * 1024)  # a small limit: the bound follows it
    server = Server(f"tcp://127.0.0.1:{free_port()}")
    big, other = (new_socket(zmq.Context.instance(), zmq.DEALER, None) for _ in range(2))
    try:
        for sock in (big, other):
            sock.connect(server.address)
        big.send_multipart([b"moderate", b"\x00" * (200 * 1024)])
        (_, req_id, error, _), = receive(server, 1)
        assert req_id == b"moderate" and isinstance(error, P.ProtocolError)
        assert "204800 bytes exceeds the limit of 131072" in str(error)

        big.send_multipart([b"giant", b"\x00" * (transport.INCOMING_LIMIT_FACTOR * 128 * 1024 + 1)])
        other.send_multipart([b"other", P.encode(P.Ack(ref="r", status="ok"))])
        seen = [item[1] for item in receive(server, 1)]
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        # the cut peer reconnects and is heard
        while b"again" not in seen and time.monotonic() < deadline:
            big.send_multipart([b"again", P.encode(P.Ack(ref="r", status="ok"))])
            while (item := server.recv(0.5)) is not None:
                seen.append(item[1])
        assert b"other" in seen and b"again" in seen and b"giant" not in seen
    finally:
        big.close(linger=0)
        other.close(linger=0)
        server.close()
