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
  areal_like/job_facts.py ``request_frame_limit``): frames above it are refused from their length,
  never decoded, and its receive bound is ``INCOMING_LIMIT_FACTOR`` x that limit but at least
  ``REFUSE_WINDOW_BYTES``, so a sender that is merely misconfigured still gets a rejection naming
  the size (and the daemon counts it) instead of a silent cut; a frame there costs its size, briefly.

* **Authentication.** Every socket is made by ``new_socket`` with the ``keys`` its maker was given
  (a daemon's facts hold them; ``security.Keys`` or None), and handed to ``security.apply``: with
  keys, ROUTER/PUB sockets are CURVE servers behind a ZAP allow-list and DEALER/SUB sockets CURVE
  clients (``areal_like/net/security.py``); None makes a plain socket. No socket reads process
  state.
* **CURVE's cost, spread.** CURVE encrypts every frame on tcp:// and its cipher is the
  transport's biggest cost. ZeroMQ runs it in the context's I/O threads, one connection on one
  thread, so a ``Server`` made with ``io_threads`` > 1 (the buffer's: ``buffer.io_threads``, sized
  from its cores) decrypts many senders' streams in parallel (benchmarks/bench_buffer.py, "CURVE
  capacity").
* **Same-node endpoints.** An ``ipc://`` address (a Unix socket; ``local_addresses``) is bound and
  connected through ``security.bind``/``security.connect``: no CURVE there, only peers of the job's
  own user, in a 0700 directory. ``Server`` and ``Publisher`` take one beside their tcp:// address
  (``local_address``), so same-node daemons skip the cipher and remote ones keep it.

Addresses are configuration (``tcp://host:port``, or ``ipc:///abs/path`` on one node); nothing here
assumes localhost. Servers bind (``tcp://*:port`` or a concrete interface), clients connect.
"""

from __future__ import annotations

import os
import time
from typing import Any

import zmq

from areal_like.net import security
from areal_like.net.peers import is_trainer_peer
from areal_like.wire import protocol
from areal_like.wire.protocol import Message, ProtocolError, decode, encode_into

DEFAULT_TIMEOUT_S = 10.0  # a healthy buffer answers in milliseconds; 10 s means it is gone or wedged
SNDHWM = 1000  # frames queued per peer before sends fail fast
# Receive bound (MAXMSGSIZE) = this x protocol.MAX_FRAME_BYTES: a frame a little over the limit still
# reaches decode and gets a rejection naming its size; a giant one is cut before it is allocated.
INCOMING_LIMIT_FACTOR = 2
REFUSE_WINDOW_BYTES = 64 * 1024 * 1024  # a Server with a tighter frame limit still receives and refuses up to this
SCRATCH_KEEP_BYTES = 4 * 1024 * 1024  # bigger frames hand their buffer over instead of being copied and kept
MAX_HANDLED_PER_RECV = 64  # refused frames one recv handles before it returns None
# ints: OR-ing zmq's IntFlag enums runs enum.py per frame
_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)


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

    def encode(self, msg: Message) -> bytearray:
        """``msg`` encoded into the kept buffer (valid until the next call); ProtocolError if invalid."""
        frame = self._buf
        try:
            encode_into(msg, frame)
        except ProtocolError:
            if len(frame) > SCRATCH_KEEP_BYTES:  # grown to an oversized frame: do not keep that allocation
                self._buf = bytearray()
            raise
        return frame

    def send(self, sock: zmq.Socket, head: list[bytes], msg: Message, flags: int = 0) -> Any:
        """Send ``[*head, encode(msg)]``; an invalid message raises ProtocolError before anything is sent."""
        frame = self.encode(msg)
        if len(frame) <= SCRATCH_KEEP_BYTES:
            return _send_copied(sock, head, frame, int(flags))
        self._buf = bytearray()  # libzmq owns this one until it is sent; never written again
        return sock.send_multipart([*head, frame], flags=flags, copy=False)


def _send_copied(sock: zmq.Socket, head: list[bytes], frame: bytearray, flags: int) -> Any:
    """Send ``[*head, frame]``, ``frame`` copied before this returns (the writer keeps its buffer)."""
    if type(sock) is zmq.Socket:  # a plain socket: parts one by one, cheaper than send_multipart's checks
        for part in head:  # a multipart message is queued whole or not at all: only the first send can fail
            sock.send(part, flags | _SNDMORE)
        return sock.send(frame, flags)
    return sock.send_multipart([*head, frame], flags=flags, copy=True)  # an asyncio socket needs its own send


_CONTEXTS: dict[int, zmq.Context] = {}


def context(io_threads: int = 1) -> zmq.Context:
    """The process's ZeroMQ context with ``io_threads`` I/O threads (1: ``zmq.Context.instance()``);
    made once per count and kept, as ZAP handlers and sockets are per context."""
    if io_threads < 1:
        raise ValueError(f"io_threads must be >= 1, got {io_threads}")
    if io_threads == 1:
        return zmq.Context.instance()
    if (ctx := _CONTEXTS.get(io_threads)) is None or ctx.closed:
        ctx = _CONTEXTS[io_threads] = zmq.Context(io_threads=io_threads)
    return ctx


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


def new_socket(ctx: zmq.Context, kind: int, keys: security.Keys | None,
               receive_bound: int | None = None) -> zmq.Socket:
    """A socket with this module's options (linger, high-water marks, incoming size bound: by default
    ``INCOMING_LIMIT_FACTOR`` x the frame limit) and CURVE with ``keys`` (None: plain)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SNDHWM)
    sock.setsockopt(zmq.RCVHWM, SNDHWM)
    bound = INCOMING_LIMIT_FACTOR * protocol.MAX_FRAME_BYTES if receive_bound is None else receive_bound
    sock.setsockopt(zmq.MAXMSGSIZE, bound)  # see "Incoming size bound"
    security.apply(sock, keys)  # CURVE server or client (None: plain); before bind/connect
    return sock


def bind_both(sock: zmq.Socket, address: str, local_address: str | None) -> None:
    """Bind ``address`` and, for same-node peers, ``local_address`` (ipc://, no CURVE: see "Same-node
    endpoints"); on any error the socket is closed, so no port stays bound behind a refused directory."""
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
    """ROUTER side of request/reply. ``recv`` yields (peer, req_id, message-or-error).

    A frame that fails to decode is returned as a ProtocolError instead of a message, so the
    daemon can answer with a rejection naming the field and keep serving. ``max_frame_bytes``
    (default ``protocol.MAX_FRAME_BYTES``) is the largest frame decoded; see "Incoming size bound".
    ``io_threads`` > 1: the socket lives in a context with that many I/O threads (one per process
    and count, like ``zmq.Context.instance()``; see "CURVE's cost, spread"). ``keys``: the server's
    CURVE keys (``security.load(..., SERVER)``), None for a plain socket.
    """

    def __init__(self, address: str, *, keys: security.Keys | None = None,
                 max_frame_bytes: int | None = None, local_address: str | None = None,
                 io_threads: int = 1):
        self.address, self.local_address = address, local_address
        self.max_frame_bytes = max_frame_bytes
        bound = None
        if max_frame_bytes is not None:
            if max_frame_bytes < 1:
                raise ValueError(f"max_frame_bytes must be >= 1, got {max_frame_bytes}")
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
        got = self.recv_with_payload(timeout_s)
        return None if got is None else got[:3]

    def recv_nowait(self) -> tuple[bytes, bytes, Message | ProtocolError] | None:
        return self.recv(0)

    def recv_with_payload(self, timeout_s: float) -> tuple[bytes, bytes, Message | ProtocolError, bytes] | None:
        """Like ``recv`` but also returns the undecoded payload (the buffer logs it verbatim in
        its write-ahead log instead of re-encoding the message). The payload is received without
        a copy (a read-only view of ZMQ's buffer; decoded arrays keep it alive)."""
        got = self.recv_request(timeout_s)
        return None if got is None else got[:4]

    def recv_request(self, timeout_s: float) -> Request | None:
        """Like ``recv_with_payload`` plus the sender's member name: the role of its CURVE key (the
        ZAP User-Id, ``rollout`` or ``trainer``), or ``LOCAL_MEMBER`` for
        a peer without a key (same-node ``ipc://``, whose uid the ZAP handler checked, or
        ``security.curve=false``)."""
        deadline = time.monotonic() + timeout_s
        for _ in range(MAX_HANDLED_PER_RECV):  # a refused frame is handled here; wait on
            frames = self._recv_frames(max(0.0, deadline - time.monotonic()))
            if frames is None:
                return None
            if (request := self._request(frames)) is not None:
                return request
            if time.monotonic() >= deadline:  # a stranger's flood never holds the caller past its deadline
                return None
        return None

    def _request(self, frames: list[zmq.Frame]):
        """(peer, req_id, message-or-error, payload, member) of a request; None for a refused one."""
        if len(frames) != 3:
            error = ProtocolError("expected [req_id, payload]", "frame")
            role = security.role_of(frames[-1])
            req_id = frames[1].bytes if len(frames) > 1 else b""
            return frames[0].bytes, req_id, error, b"", role or LOCAL_MEMBER
        peer, req_id, payload = frames[0].bytes, frames[1].bytes, frames[2].buffer
        role = security.role_of(frames[2])
        if is_trainer_peer(peer) and role not in (None, "trainer"):
            security.refused("role")  # another role's key under the trainer's peer id: dropped unanswered
            return None
        return peer, req_id, self._decoded(payload), payload, role or LOCAL_MEMBER

    def _decoded(self, payload) -> Message | ProtocolError:
        try:
            return decode(payload, self.max_frame_bytes)
        except ProtocolError as e:
            return e

    def _recv_frames(self, timeout_s: float) -> list[zmq.Frame] | None:
        """The next frames (zero copy). A request already queued is taken without polling first (a
        busy server saves a poll per request); otherwise wait up to ``timeout_s``."""
        if (got := self._take()) is not None or timeout_s <= 0 or not self._poller.poll(int(timeout_s * 1000)):
            return got
        return self._take()  # NOBLOCK: the poll may have returned for a ``wake_on`` descriptor instead

    def _take(self) -> list[zmq.Frame] | None:
        """One queued message, NOBLOCK."""
        try:
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

