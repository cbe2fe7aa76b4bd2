"""Announcements: PUB (buffer) -> SUB (rollout servers). Lossy by design, a hint every
``HeartbeatAck`` repeats (areal_like/DESIGN.md section 3, "Transport"); small frames, on CURVE over
tcp:// like request/reply."""

from __future__ import annotations

import contextlib
import time

import zmq
import zmq.asyncio

from areal_like.net import security
from areal_like.net.transport import FrameWriter, bind_both, decoded, new_socket
from areal_like.wire.protocol import Message, ProtocolError


class Publisher:
    """PUB side of announcements."""

    def __init__(self, address: str, *, keys: security.Keys | None = None,
                 local_address: str | None = None):
        self.address, self.local_address = address, local_address
        self._sock = new_socket(zmq.Context.instance(), zmq.PUB, keys)  # keys: the buffer's
        bind_both(self._sock, address, local_address)
        self._writer = FrameWriter()

    def publish(self, msg: Message) -> None:
        with contextlib.suppress(zmq.Again):
            self._writer.send(self._sock, [], msg, zmq.NOBLOCK)

    def close(self) -> None:
        self._sock.close(linger=0)


class Subscriber:
    """SUB side; ``recv(timeout_s)`` returns a message or None. Undecodable frames are skipped."""

    def __init__(self, address: str, *, keys: security.Keys | None = None,
                 asyncio_ctx: bool = False):
        self.address = address
        ctx = zmq.asyncio.Context.instance() if asyncio_ctx else zmq.Context.instance()
        self._sock = new_socket(ctx, zmq.SUB, keys)  # keys: a client's (None: plain)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        security.connect(self._sock, address)

    def recv(self, timeout_s: float) -> Message | None:
        """The next valid announcement within ``timeout_s``, or None (undecodable frames are
        skipped)."""
        deadline = time.monotonic() + timeout_s
        while self._sock.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
            if not isinstance(msg := decoded(self._sock.recv()), ProtocolError):
                return msg
        return None

    async def arecv(self, timeout_s: float) -> Message | None:
        deadline = time.monotonic() + timeout_s
        while await self._sock.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
            if not isinstance(msg := decoded(await self._sock.recv()), ProtocolError):
                return msg
        return None

    def close(self) -> None:
        self._sock.close(linger=0)
