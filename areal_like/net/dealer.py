"""The client side of request/reply, sync and asyncio (areal_like/DESIGN.md section 3)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import zmq
import zmq.asyncio

from areal_like.net import security
from areal_like.net.transport import (
    DEFAULT_TIMEOUT_S,
    FrameWriter,
    TransportError,
    TransportTimeout,
    decoded,
    new_socket,
    recv_parts,
)
from areal_like.wire.codec import ProtocolError
from areal_like.wire.protocol import Message, decode


class _Dealer:
    """A DEALER to ``address`` that is replaced by a fresh one after a timeout ("lazy pirate");
    every socket it makes, the fresh ones too, is a CURVE client with ``keys`` (None: plain)."""

    def __init__(self, address: str, ctx: zmq.Context, timeout_s: float, identity: str | None,
                 keys: security.Keys | None):
        self.address, self.timeout_s, self.identity, self._ctx = address, timeout_s, identity, ctx
        self._sock: zmq.Socket | None = None
        self._writer = FrameWriter()
        self._keys = keys
        self._connect()

    def _connect(self) -> None:
        self._sock = new_socket(self._ctx, zmq.DEALER, self._keys)
        if self.identity:
            self._sock.setsockopt(zmq.IDENTITY, f"{self.identity}-{uuid.uuid4().hex[:6]}".encode())
        security.connect(self._sock, self.address)
        self._on_socket()

    def _on_socket(self) -> None:
        """A new socket is in ``_sock`` (Client keeps a poller on it)."""

    def reconnect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._connect()

    def _send(self, msg: Message) -> bytes:
        """Send ``msg`` under a fresh req_id (returned). A ProtocolError leaves the socket
        untouched."""
        if self._sock is None:
            raise TransportError(f"client for {self.address} is closed")
        req_id = uuid.uuid4().bytes
        try:
            # asyncio: sent at once or Again
            self._writer.send(self._sock, [req_id], msg, zmq.NOBLOCK)
        except zmq.Again:
            self.reconnect()
            raise TransportTimeout(f"send queue to {self.address} is full") from None
        return req_id

    @staticmethod
    def _payload(req_id: bytes, frames: list[zmq.Frame]):
        """The reply's payload if ``frames`` answer ``req_id``, else None (a late reply)."""
        if len(frames) != 2 or frames[0].bytes != req_id:
            return None
        return frames[1].buffer

    def _timed_out(self, msg: Message, timeout: float) -> TransportTimeout:
        self.reconnect()  # fresh socket: queued requests and late replies to this one are discarded
        return TransportTimeout(f"no reply from {self.address} within {timeout:.1f}s to {msg.TYPE}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


# how often a wait for a reply looks at ``Client.cancel``: a daemon told to stop stops waiting
# within this, not after the request's timeout (a peer gone with the launcher never answers)
CANCEL_CHECK_S = 0.2


class Client(_Dealer):
    """Synchronous request/reply client (one outstanding request at a time; not thread safe).
    ``cancel``: once it returns True (its owner's stop event's ``is_set``, set from any thread),
    a wait for a reply ends within ``CANCEL_CHECK_S`` with TransportTimeout."""

    def __init__(self, address: str, *, keys: security.Keys | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, identity: str | None = None):
        super().__init__(address, zmq.Context.instance(), timeout_s, identity, keys)
        self.cancel: Callable[[], bool] | None = None

    def _on_socket(self) -> None:
        self._poller = zmq.Poller()  # kept: Socket.poll builds a new Poller on every call
        self._poller.register(self._sock, zmq.POLLIN)

    def request(self, msg: Message, timeout_s: float | None = None) -> Message:
        """Send ``msg`` and return the decoded reply. Raises TransportTimeout or ProtocolError."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        if (payload := self._wait(self._send(msg), deadline)) is None:
            if self.cancel is not None and self.cancel():
                self.reconnect()  # as after a timeout: a late reply is discarded
                raise TransportTimeout(f"stopped waiting for {self.address} to answer {msg.TYPE}: "
                                       "this process is stopping")
            raise self._timed_out(msg, timeout)
        return decode(payload)

    def _wait(self, req_id: bytes, deadline: float):
        """The payload of the reply to ``req_id``, or None at ``deadline`` or once ``cancel``."""
        while (remaining := deadline - time.monotonic()) > 0:
            if self.cancel is not None:
                if self.cancel():
                    return None
                remaining = min(remaining, CANCEL_CHECK_S)
            if not self._poller.poll(max(1, int(remaining * 1000))):
                continue
            if (payload := self._payload(req_id, recv_parts(self._sock, 0))) is not None:
                return payload
        return None


class AsyncClient(_Dealer):
    """asyncio twin of Client (rollout servers); calls are serialised with a lock, and one may
    pipeline several requests (``request_many``)."""

    def __init__(self, address: str, *, keys: security.Keys | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, identity: str | None = None):
        self._lock = asyncio.Lock()
        super().__init__(address, zmq.asyncio.Context.instance(), timeout_s, identity, keys)

    async def request(self, msg: Message, timeout_s: float | None = None) -> Message:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        (reply,) = await self.request_many([msg], timeout)
        if reply is None:
            raise TransportTimeout(f"no reply from {self.address} within {timeout:.1f}s "
                                   f"to {msg.TYPE}")
        if isinstance(reply, ProtocolError):
            raise reply
        return reply

    async def request_many(self, msgs: list[Message], timeout_s: float | None = None) -> list:
        """Send ``msgs`` at once; their replies in order, each a Message, a ProtocolError or None
        (none came: the socket is then replaced). ``timeout_s`` bounds the wait for the next reply;
        TransportTimeout when a send fails."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if not msgs:
            return []
        async with self._lock:
            payloads = await self._wait([self._send(msg) for msg in msgs], timeout)
            if None in payloads:
                self.reconnect()  # fresh socket: late replies to the unanswered ones are discarded
        return [None if p is None else decoded(p) for p in payloads]

    async def _wait(self, req_ids: list[bytes], timeout: float) -> list:
        """The payloads of the replies to ``req_ids``; None for those unanswered at the timeout."""
        loop, sock = asyncio.get_running_loop(), self._sock
        waiting = {req_id: i for i, req_id in enumerate(req_ids)}
        out: list = [None] * len(req_ids)
        deadline = loop.time() + timeout
        while waiting and (remaining := deadline - loop.time()) > 0:
            if not await sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                break
            frames = await sock.recv_multipart(copy=False)
            if len(frames) == 2 and (i := waiting.pop(frames[0].bytes, None)) is not None:
                out[i] = frames[1].buffer
                deadline = loop.time() + timeout  # progress: the next reply gets the whole timeout
        return out
