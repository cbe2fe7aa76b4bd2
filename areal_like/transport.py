"""ZeroMQ transport: reliable request/reply to the buffer, and publish/subscribe announcements.

Patterns and why:

* **Request/reply: DEALER (client) -> ROUTER (server).** The buffer binds one ROUTER; rollout
  servers and trainer rank 0 connect DEALERs. Every request carries a fresh ``req_id`` frame
  and the reply echoes it, so a late reply to an abandoned request is recognised and dropped.
  ``Client.request`` waits at most ``timeout_s`` and raises ``TransportTimeout``; after a
  timeout the socket is closed (LINGER 0, queued frames discarded) and a new one connects
  ("lazy pirate"), so a peer that died and came back on the same address is reached again.
  ZMQ itself never reports a dead peer: only timeouts do, which is why every blocking call here
  has one. Requests are *not* retried here: the caller decides whether a request is idempotent
  (every message of our protocol is, by design: groups are deduped by id, credits by lease).
* **High-water marks.** A DEALER queues up to SNDHWM frames while disconnected and then
  blocks; we send with NOBLOCK and treat a full queue as a timeout. A ROUTER *drops* replies to
  peers that are gone (or whose queue is full): harmless, because the client times out and
  re-sends, and the server side is idempotent.
* **Publish/subscribe: PUB (buffer) -> SUB (rollout servers)** for VersionUpdate and
  WeightSyncPlan. PUB drops messages for slow or absent subscribers and a new subscriber misses
  everything published before its subscription is live (the "slow joiner"). Announcements are
  therefore only a low-latency hint: the same facts are repeated in every HeartbeatAck, which is
  the guarantee.
* Trajectories never go over PUB/SUB: a group is kept by its sender until the buffer's Ack says
  it is in the write-ahead log.
* **Copies.** A message is encoded into a buffer its sender keeps (``FrameWriter``) and libzmq
  copies it into its own message while sending: a fresh buffer per frame would be regrown and
  faulted in every time, and pyzmq releases a frame sent without a copy through a garbage-collector
  thread, which costs about what the copy costs. Frames above ``SCRATCH_KEEP_BYTES`` (a big Batch)
  hand their buffer over without a copy instead, so an idle process does not pin it. Received
  frames are decoded in place: the arrays of a decoded message are read-only views of ZMQ's
  receive buffer, which they keep alive. benchmarks/bench_transport.py measures the path.
* **Incoming size bound.** Every socket sets ``MAXMSGSIZE`` to ``INCOMING_LIMIT_FACTOR`` x
  ``protocol.MAX_FRAME_BYTES`` (read when the socket is made), so a peer cannot make a daemon
  allocate an arbitrarily large frame before decode refuses it. A frame above the frame limit but
  within the bound is received and refused by decode (the Server hands the ProtocolError, naming
  the size, to the daemon, which answers with a rejection); a bigger one is cut by libzmq while
  reading its header: the frame never reaches the application, that peer's connection is dropped
  (its DEALER reconnects; the request times out) and every other peer is served as before.
  A ``Server`` may take a tighter limit (``max_frame_bytes``: the buffer's is sized to the job,
  areal_like/config.py ``request_frame_limit``): frames above it are refused from their length,
  never decoded, and its receive bound is ``INCOMING_LIMIT_FACTOR`` x that limit but at least
  ``REFUSE_WINDOW_BYTES``, so a sender that is merely misconfigured still gets a rejection naming
  the size (and the daemon counts it) instead of a silent cut; a frame there costs its size, briefly.

* **Authentication.** Every socket is made by ``_new_socket``, which hands it to
  ``security.apply``: with the process's CURVE keys active, ROUTER/PUB sockets are CURVE servers
  behind a ZAP allow-list and DEALER/SUB sockets CURVE clients (``areal_like/security.py``).
* **Same-node endpoints.** An ``ipc://`` address (a Unix socket; ``local_addresses``) is bound and
  connected through ``security.bind``/``security.connect``: no CURVE there, only peers of the job's
  own user, in a 0700 directory. ``Server`` and ``Publisher`` take one beside their tcp:// address
  (``local_address``), so same-node daemons skip the cipher and remote ones keep it.

Addresses are configuration (``tcp://host:port``, or ``ipc:///abs/path`` on one node); nothing here
assumes localhost. Servers bind (``tcp://*:port`` or a concrete interface), clients connect.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import zmq
import zmq.asyncio

from areal_like import protocol, security
from areal_like.protocol import Message, ProtocolError, decode, encode_into

DEFAULT_TIMEOUT_S = 10.0  # a healthy buffer answers in milliseconds; 10 s means it is gone or wedged
SNDHWM = 1000  # frames queued per peer before sends fail fast
# Receive bound (MAXMSGSIZE) = this x protocol.MAX_FRAME_BYTES: a frame a little over the limit still
# reaches decode and gets a rejection naming its size; a giant one is cut before it is allocated.
INCOMING_LIMIT_FACTOR = 2
REFUSE_WINDOW_BYTES = 64 * 1024 * 1024  # a Server with a tighter frame limit still receives and refuses up to this
SCRATCH_KEEP_BYTES = 4 * 1024 * 1024  # bigger frames hand their buffer over instead of being copied and kept
_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)  # ints: OR-ing zmq's IntFlag enums runs enum.py per frame


class TransportError(RuntimeError):
    pass


class TransportTimeout(TransportError, TimeoutError):
    """The peer did not answer in time (dead, restarting or overloaded)."""


def bind_address(address: str) -> str:
    """Map a connect address to what a server binds: ``tcp://host:port`` binds ``tcp://*:port``
    unless AREAL_LIKE_BIND_HOST pins an interface."""
    if address.startswith("tcp://"):
        host_port = address[len("tcp://"):]
        _, port = host_port.rsplit(":", 1)
        return f"tcp://{os.environ.get('AREAL_LIKE_BIND_HOST', '*')}:{port}"
    return address


class FrameWriter:
    """Encodes messages into one kept buffer and sends them (see "Copies" above).

    One per socket user; not thread safe (sockets are not either). On an asyncio socket only with
    NOBLOCK: zmq.asyncio then sends at once or fails, it never queues the parts for later, so the
    buffer is free again when ``send`` returns.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def send(self, sock: zmq.Socket, head: list[bytes], msg: Message, flags: int = 0) -> Any:
        """Send ``[*head, encode(msg)]``; an invalid message raises ProtocolError before anything is sent."""
        frame = self._buf
        try:
            encode_into(msg, frame)
        except ProtocolError:
            if len(frame) > SCRATCH_KEEP_BYTES:  # grown to an oversized frame: do not keep that allocation
                self._buf = bytearray()
            raise
        if len(frame) <= SCRATCH_KEEP_BYTES:
            if type(sock) is zmq.Socket:  # a plain socket: parts one by one (an asyncio socket needs its own send)
                flags = int(flags)
                for part in head:  # a multipart message is queued whole or not at all: only the first send can fail
                    sock.send(part, flags | _SNDMORE)
                return sock.send(frame, flags)  # copied before send returns
            return sock.send_multipart([*head, frame], flags=flags, copy=True)
        self._buf = bytearray()  # libzmq owns this one until it is sent; never written again
        return sock.send_multipart([*head, frame], flags=flags, copy=False)


def local_addresses(directory: str | os.PathLike) -> tuple[str, str]:
    """The buffer's same-node (request/reply, publish) ``ipc://`` addresses in ``directory``."""
    return f"ipc://{os.path.abspath(directory)}/router", f"ipc://{os.path.abspath(directory)}/pub"


def recv_parts(sock: zmq.Socket, flags: int) -> list[zmq.Frame]:
    """``sock.recv_multipart(flags, copy=False)`` without asking the socket for RCVMORE per part
    (a synchronous socket; only the first part can raise zmq.Again: a message arrives whole)."""
    parts = [sock.recv(flags, copy=False)]
    while parts[-1].more:
        parts.append(sock.recv(flags, copy=False))
    return parts


def new_socket(ctx: zmq.Context, kind: int, receive_bound: int | None = None) -> zmq.Socket:
    """A socket with this module's options (linger, high-water marks, incoming size bound: by default
    ``INCOMING_LIMIT_FACTOR`` x the frame limit)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SNDHWM)
    sock.setsockopt(zmq.RCVHWM, SNDHWM)
    bound = INCOMING_LIMIT_FACTOR * protocol.MAX_FRAME_BYTES if receive_bound is None else receive_bound
    sock.setsockopt(zmq.MAXMSGSIZE, bound)  # see "Incoming size bound"
    security.apply(sock)  # CURVE server or client with this process's keys (none: plain); before bind/connect
    return sock


def _bind_both(sock: zmq.Socket, address: str, local_address: str | None) -> None:
    """Bind ``address`` and, for same-node peers, ``local_address`` (ipc://, no CURVE: see "Same-node
    endpoints"); on any error the socket is closed, so no port stays bound behind a refused directory."""
    try:
        security.bind(sock, bind_address(address))
        if local_address:
            security.bind(sock, local_address)
    except BaseException:
        sock.close(linger=0)
        raise


class _Dealer:
    """A DEALER to ``address`` that is replaced by a fresh one after a timeout ("lazy pirate")."""

    def __init__(self, address: str, ctx: zmq.Context, timeout_s: float, identity: str | None):
        self.address, self.timeout_s, self.identity, self._ctx = address, timeout_s, identity, ctx
        self._sock: zmq.Socket | None = None
        self._writer = FrameWriter()
        self._connect()

    def _connect(self) -> None:
        self._sock = new_socket(self._ctx, zmq.DEALER)
        if self.identity:
            self._sock.setsockopt(zmq.IDENTITY, f"{self.identity}-{uuid.uuid4().hex[:6]}".encode())
        security.connect(self._sock, self.address)

    def reconnect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._connect()

    def _send(self, msg: Message) -> bytes:
        """Send ``msg`` under a fresh req_id (returned). A ProtocolError leaves the socket untouched."""
        if self._sock is None:
            raise TransportError(f"client for {self.address} is closed")
        req_id = uuid.uuid4().bytes
        try:
            self._writer.send(self._sock, [req_id], msg, zmq.NOBLOCK)  # asyncio: sent at once or Again
        except zmq.Again:
            self.reconnect()
            raise TransportTimeout(f"send queue to {self.address} is full") from None
        return req_id

    def _timed_out(self, msg: Message, timeout: float) -> TransportTimeout:
        self.reconnect()  # fresh socket: queued requests and late replies to this one are discarded
        return TransportTimeout(f"no reply from {self.address} within {timeout:.1f}s to {msg.TYPE}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class Client(_Dealer):
    """Synchronous request/reply client (one outstanding request at a time; not thread safe)."""

    def __init__(self, address: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, identity: str | None = None):
        super().__init__(address, zmq.Context.instance(), timeout_s, identity)

    def _connect(self) -> None:
        super()._connect()
        self._poller = zmq.Poller()  # kept: Socket.poll builds a new Poller on every call
        self._poller.register(self._sock, zmq.POLLIN)

    def request(self, msg: Message, timeout_s: float | None = None) -> Message:
        """Send ``msg`` and return the decoded reply. Raises TransportTimeout or ProtocolError."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        req_id = self._send(msg)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._poller.poll(max(1, int(remaining * 1000))):
                break
            frames = recv_parts(self._sock, 0)
            if len(frames) == 2 and frames[0].bytes == req_id:
                return decode(frames[1].buffer)
            # a late reply to an earlier, abandoned request: drop it and keep waiting
        raise self._timed_out(msg, timeout)


class AsyncClient(_Dealer):
    """asyncio twin of Client for daemons built on an event loop (rollout servers).

    Requests are serialised with a lock: one outstanding request per socket keeps req_id
    matching trivial, and the buffer answers in milliseconds.
    """

    def __init__(self, address: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, identity: str | None = None):
        self._lock = asyncio.Lock()
        super().__init__(address, zmq.asyncio.Context.instance(), timeout_s, identity)

    async def request(self, msg: Message, timeout_s: float | None = None) -> Message:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        async with self._lock:
            req_id = self._send(msg)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (remaining := deadline - loop.time()) > 0:
                if not await self._sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                    break
                frames = await self._sock.recv_multipart(copy=False)
                if len(frames) == 2 and frames[0].bytes == req_id:
                    return decode(frames[1].buffer)
            raise self._timed_out(msg, timeout)


class Server:
    """ROUTER side of request/reply. ``recv`` yields (peer, req_id, message-or-error).

    A frame that fails to decode is returned as a ProtocolError instead of a message, so the
    daemon can answer with a rejection naming the field and keep serving. ``max_frame_bytes``
    (default ``protocol.MAX_FRAME_BYTES``) is the largest frame decoded; see "Incoming size bound".
    """

    def __init__(self, address: str, *, max_frame_bytes: int | None = None, local_address: str | None = None):
        self.address, self.local_address = address, local_address
        self.max_frame_bytes = max_frame_bytes
        bound = None
        if max_frame_bytes is not None:
            if max_frame_bytes < 1:
                raise ValueError(f"max_frame_bytes must be >= 1, got {max_frame_bytes}")
            bound = min(INCOMING_LIMIT_FACTOR * protocol.MAX_FRAME_BYTES,
                        max(INCOMING_LIMIT_FACTOR * max_frame_bytes, REFUSE_WINDOW_BYTES))
        self._ctx = zmq.Context.instance()
        self._sock = new_socket(self._ctx, zmq.ROUTER, bound)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished peers are dropped
        _bind_both(self._sock, address, local_address)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._writer = FrameWriter()

    def recv(self, timeout_s: float) -> tuple[bytes, bytes, Message | ProtocolError] | None:
        """Wait up to ``timeout_s`` for one request; None on timeout."""
        got = self.recv_with_payload(timeout_s)
        return None if got is None else got[:3]

    def recv_nowait(self) -> tuple[bytes, bytes, Message | ProtocolError] | None:
        return self.recv(0)

    def recv_with_payload(self, timeout_s: float) -> tuple[bytes, bytes, Message | ProtocolError, bytes] | None:
        """Like ``recv`` but also returns the undecoded payload (the buffer logs it verbatim in
        its write-ahead log instead of re-encoding the message). The payload is received without
        a copy (a read-only view of ZMQ's buffer; decoded arrays keep it alive)."""
        frames = self._recv_frames(timeout_s)
        if frames is None:
            return None
        if len(frames) != 3:
            error = ProtocolError("expected [req_id, payload]", "frame")
            return frames[0].bytes, frames[1].bytes if len(frames) > 1 else b"", error, b""
        peer, req_id, payload = frames[0].bytes, frames[1].bytes, frames[2].buffer
        try:
            return peer, req_id, decode(payload, self.max_frame_bytes), payload
        except ProtocolError as e:
            return peer, req_id, e, payload

    def _recv_frames(self, timeout_s: float) -> list[zmq.Frame] | None:
        """The next request's frames (zero copy). A request already queued is taken without polling
        first (a busy server saves a poll per request); otherwise wait up to ``timeout_s``."""
        try:
            return recv_parts(self._sock, _NOBLOCK)
        except zmq.Again:
            pass
        if timeout_s <= 0 or not self._poller.poll(int(timeout_s * 1000)):
            return None
        try:  # NOBLOCK: the poll may have returned for a ``wake_on`` descriptor instead
            return recv_parts(self._sock, _NOBLOCK)
        except zmq.Again:
            return None

    def wake_on(self, fd: int) -> None:
        """A wait in ``recv`` also ends (returning None) as soon as ``fd`` is readable: how a
        background thread tells the loop that something is ready. The caller drains ``fd``."""
        self._poller.register(fd, zmq.POLLIN)

    def send(self, peer: bytes, req_id: bytes, msg: Message) -> None:
        """Reply to ``peer``'s request ``req_id``. Never blocks: a reply to a peer that is gone or
        whose queue is full is dropped (it times out and re-sends)."""
        try:
            self._writer.send(self._sock, [peer, req_id], msg, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self._sock.close(linger=0)


class Publisher:
    """PUB side of announcements (lossy by design; see module docstring)."""

    def __init__(self, address: str, *, local_address: str | None = None):
        self.address, self.local_address = address, local_address
        self._sock = new_socket(zmq.Context.instance(), zmq.PUB)
        _bind_both(self._sock, address, local_address)
        self._writer = FrameWriter()

    def publish(self, msg: Message) -> None:
        try:
            self._writer.send(self._sock, [], msg, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self._sock.close(linger=0)


class Subscriber:
    """SUB side; ``recv(timeout_s)`` returns a message or None. Undecodable frames are skipped."""

    def __init__(self, address: str, *, asyncio_ctx: bool = False):
        self.address = address
        ctx = zmq.asyncio.Context.instance() if asyncio_ctx else zmq.Context.instance()
        self._sock = new_socket(ctx, zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        security.connect(self._sock, address)

    def recv(self, timeout_s: float) -> Message | None:
        """The next valid announcement within ``timeout_s``, or None (undecodable frames are skipped)."""
        deadline = time.monotonic() + timeout_s
        while self._sock.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
            if (msg := _decoded_or_none(self._sock.recv())) is not None:
                return msg
        return None

    async def arecv(self, timeout_s: float) -> Message | None:
        deadline = time.monotonic() + timeout_s
        while await self._sock.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
            if (msg := _decoded_or_none(await self._sock.recv())) is not None:
                return msg
        return None

    def close(self) -> None:
        self._sock.close(linger=0)


def _decoded_or_none(frame: bytes) -> Message | None:
    try:
        return decode(frame)
    except ProtocolError:
        return None
