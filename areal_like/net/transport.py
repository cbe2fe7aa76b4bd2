"""ZeroMQ request/reply (DEALER -> ROUTER) to the buffer. Timeouts, ``req_id`` echoes, receive
bounds: areal_like/DESIGN.md section 3 ("Transport"); sockets' security: areal_like/SECURITY.md.

Invariants: nothing here retries (every message is idempotent, the caller re-sends); every socket
is made by ``new_socket`` with the keys it was given (no process state); ``Server`` never blocks
on a send and hands an undecodable frame to the daemon as a ``ProtocolError``.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import zmq

from areal_like.net import security
from areal_like.net.auth import BIND_HOST_ENV
from areal_like.net.peers import is_trainer_peer
from areal_like.wire import protocol
from areal_like.wire.protocol import Message, ProtocolError, decode, encode_into

# a healthy buffer answers in milliseconds; 10 s means it is gone or wedged
DEFAULT_TIMEOUT_S = 10.0
SNDHWM = 1000  # frames queued per peer before sends fail fast
INCOMING_LIMIT_FACTOR = 2  # receive bound (MAXMSGSIZE) = this x protocol.MAX_FRAME_BYTES
REFUSE_WINDOW_BYTES = 64 * 1024 * 1024  # a tighter Server still receives and refuses up to this
SCRATCH_KEEP_BYTES = 4 * 1024 * 1024  # bigger frames hand their buffer over, not copied and kept
MAX_HANDLED_PER_RECV = 64  # refused frames one recv handles before it returns None
# ints: OR-ing zmq's IntFlag enums runs enum.py per frame
_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)


class TransportError(RuntimeError):
    """A request could not be sent or answered."""


class TransportTimeout(TransportError, TimeoutError):
    """The peer did not answer in time (dead, restarting or overloaded)."""


def bind_address(address: str) -> str:
    """What a server binds for a connect address (``tcp://*:port`` or AREAL_LIKE_BIND_HOST's)."""
    if address.startswith("tcp://"):
        host_port = address[len("tcp://"):]
        _, port = host_port.rsplit(":", 1)
        return f"tcp://{os.environ.get(BIND_HOST_ENV, '*')}:{port}"
    return address


def listening_on(address: str) -> str:
    """Where a server given ``address`` listens (``bind_address``), for a log line; with the
    address its clients are told when that is another (``tcp://*:5555 (clients connect to
    tcp://10.77.0.1:5555)``)."""
    bound = bind_address(address)
    return bound if bound == address else f"{bound} (clients connect to {address})"


class FrameWriter:
    """Encodes messages into one kept buffer and sends them. One per socket user, not thread
    safe; on an asyncio socket only with NOBLOCK (sent at once or failed, so the buffer is free
    again when ``send`` returns)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def encode(self, msg: Message) -> bytearray:
        """``msg`` encoded into the kept buffer (valid until the next call)."""
        frame = self._buf
        try:
            encode_into(msg, frame)
        except ProtocolError:
            if len(frame) > SCRATCH_KEEP_BYTES:  # do not keep an oversized allocation
                self._buf = bytearray()
            raise
        return frame

    def send(self, sock: zmq.Socket, head: list[bytes], msg: Message, flags: int = 0) -> Any:
        """Send ``[*head, encode(msg)]``; ProtocolError before anything is sent."""
        frame = self.encode(msg)
        if len(frame) <= SCRATCH_KEEP_BYTES:
            return _send_copied(sock, head, frame, int(flags))
        self._buf = bytearray()  # libzmq owns this one until it is sent; never written again
        return sock.send_multipart([*head, frame], flags=flags, copy=False)


def _send_copied(sock: zmq.Socket, head: list[bytes], frame: bytearray, flags: int) -> Any:
    """Send ``[*head, frame]``, ``frame`` copied before this returns (the writer keeps its
    buffer)."""
    if type(sock) is zmq.Socket:  # parts one by one, cheaper than send_multipart's checks
        for part in head:  # a multipart message is queued whole: only the first send can fail
            sock.send(part, flags | _SNDMORE)
        return sock.send(frame, flags)
    return sock.send_multipart([*head, frame], flags=flags, copy=True)  # asyncio socket


_CONTEXTS: dict[int, zmq.Context] = {}


def context(io_threads: int = 1) -> zmq.Context:
    """The process's ZeroMQ context with ``io_threads`` (>= 1) I/O threads, made once per count."""
    if io_threads == 1:
        return zmq.Context.instance()
    if (ctx := _CONTEXTS.get(io_threads)) is None or ctx.closed:
        ctx = _CONTEXTS[io_threads] = zmq.Context(io_threads=io_threads)
    return ctx


def decoded(payload, max_bytes: int | None = None) -> Message | ProtocolError:
    """``decode(payload)``, or the ProtocolError that says why not."""
    try:
        return decode(payload, max_bytes)
    except ProtocolError as e:
        return e


def local_addresses(directory: str | os.PathLike) -> tuple[str, str]:
    """The buffer's same-node (request/reply, publish) ``ipc://`` addresses in ``directory``."""
    return f"ipc://{os.path.abspath(directory)}/router", f"ipc://{os.path.abspath(directory)}/pub"


def recv_parts(sock: zmq.Socket, flags: int) -> list[zmq.Frame]:
    """``sock.recv_multipart(flags, copy=False)`` without asking for RCVMORE per part."""
    parts = [sock.recv(flags, copy=False)]
    while parts[-1].more:
        parts.append(sock.recv(flags, copy=False))
    return parts


def new_socket(ctx: zmq.Context, kind: int, keys: security.Keys | None,
               receive_bound: int | None = None) -> zmq.Socket:
    """A socket with linger 0, high-water marks, a receive bound and CURVE with ``keys``."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SNDHWM)
    sock.setsockopt(zmq.RCVHWM, SNDHWM)
    bound = (INCOMING_LIMIT_FACTOR * protocol.MAX_FRAME_BYTES if receive_bound is None
             else receive_bound)
    sock.setsockopt(zmq.MAXMSGSIZE, bound)
    security.apply(sock, keys)  # before bind/connect
    return sock


def bind_both(sock: zmq.Socket, address: str, local_address: str | None) -> None:
    """Bind ``address`` and ``local_address`` (ipc://, for same-node peers); on any error the
    socket is closed, so no port stays bound behind a refused directory."""
    try:
        security.bind(sock, bind_address(address))
        if local_address:
            security.bind(sock, local_address)
    except BaseException:
        sock.close(linger=0)
        raise


LOCAL_MEMBER = "local"  # the member name of a peer without a CURVE key (Server.recv_request)
# what Server.recv_request returns: peer, req_id, message (or why not), payload, member
Request = tuple[bytes, bytes, Message | ProtocolError, bytes, str]


class Server:
    """ROUTER side of request/reply. ``recv`` yields (peer, req_id, message-or-ProtocolError).
    ``max_frame_bytes``: the largest frame decoded; ``io_threads``: of its context (CURVE's
    cipher runs there, one connection per thread)."""

    def __init__(self, address: str, *, keys: security.Keys | None = None,
                 max_frame_bytes: int | None = None, local_address: str | None = None,
                 io_threads: int = 1):
        self.address, self.local_address = address, local_address
        self.max_frame_bytes = max_frame_bytes
        bound = None
        if max_frame_bytes is not None:  # >= 1: buffer.max_frame_bytes, else the job's
            bound = min(INCOMING_LIMIT_FACTOR * protocol.MAX_FRAME_BYTES,
                        max(INCOMING_LIMIT_FACTOR * max_frame_bytes, REFUSE_WINDOW_BYTES))
        self._ctx = context(io_threads)
        self._sock = new_socket(self._ctx, zmq.ROUTER, keys, bound)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished peers are dropped
        bind_both(self._sock, address, local_address)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._writer = FrameWriter()

    def recv(self, timeout_s: float) -> tuple[bytes, bytes, Message | ProtocolError] | None:
        """Wait up to ``timeout_s`` for one request; None on timeout."""
        got = self.recv_request(timeout_s)
        return None if got is None else got[:3]

    def recv_request(self, timeout_s: float) -> Request | None:
        """``recv`` plus the undecoded payload (a read-only view of ZMQ's buffer) and the sender's
        role (its CURVE key's name), or ``LOCAL_MEMBER`` for a peer without a key."""
        deadline = time.monotonic() + timeout_s
        for _ in range(MAX_HANDLED_PER_RECV):  # a refused frame is handled here; wait on
            frames = self._recv_frames(max(0.0, deadline - time.monotonic()))
            if frames is None:
                return None
            if (request := self._request(frames)) is not None:
                return request
            if time.monotonic() >= deadline:  # a flood never holds the caller past its deadline
                return None
        return None

    def _request(self, frames: list[zmq.Frame]):
        """(peer, req_id, message-or-error, payload, member) of a request; None for a refused
        one."""
        if len(frames) != 3:
            error = ProtocolError("expected [req_id, payload]", "frame")
            role = security.role_of(frames[-1])
            req_id = frames[1].bytes if len(frames) > 1 else b""
            return frames[0].bytes, req_id, error, b"", role or LOCAL_MEMBER
        peer, req_id, payload = frames[0].bytes, frames[1].bytes, frames[2].buffer
        role = security.role_of(frames[2])
        if is_trainer_peer(peer) and role not in (None, "trainer"):
            security.refused("role")  # another role under the trainer's peer id: unanswered
            return None
        return peer, req_id, decoded(payload, self.max_frame_bytes), payload, role or LOCAL_MEMBER

    def _recv_frames(self, timeout_s: float) -> list[zmq.Frame] | None:
        """The next frames (zero copy); a queued request is taken without polling first."""
        if (got := self._take()) is not None or timeout_s <= 0:
            return got
        if not self._poller.poll(int(timeout_s * 1000)):
            return None
        return self._take()  # the poll may have returned for a ``wake_on`` descriptor

    def _take(self) -> list[zmq.Frame] | None:
        """One queued message, NOBLOCK."""
        try:
            return recv_parts(self._sock, _NOBLOCK)
        except zmq.Again:
            return None

    def wake_on(self, fd: int) -> None:
        """A wait in ``recv`` also ends (None) when ``fd`` is readable; the caller drains it."""
        self._poller.register(fd, zmq.POLLIN)

    def send(self, peer: bytes, req_id: bytes, msg: Message) -> None:
        """Reply to ``peer``'s request; never blocks (a reply it cannot queue is dropped)."""
        with contextlib.suppress(zmq.Again):
            self._writer.send(self._sock, [peer, req_id], msg, zmq.NOBLOCK)

    def close(self) -> None:
        self._sock.close(linger=0)

