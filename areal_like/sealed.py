"""Sealed bulk frames: CURVE-authenticated session keys, then AES-GCM on a plain tcp connection.

Why: CURVE (XSalsa20-Poly1305 inside libzmq's I/O thread) keeps about a fifth of the unencrypted
throughput for a 4,096-token group (benchmarks/README.md); AES-GCM with AES-NI seals the same
frame an order of magnitude faster. CURVE stays the authenticator: a client first asks for a
session over its CURVE connection (``HELLO``), the server answers on that connection with a fresh
random 128-bit AES key, a random session id and the port of its bulk endpoint (``WELCOME``), and
records the role the ZAP handler gave the client's key (``security.py``: the ZAP User-Id is the
client's name). From then on every request and reply travels on a second DEALER connected to that
port with no ZeroMQ security, each payload sealed here. Threat model: areal_like/SECURITY.md.

Sealed frame (one ZeroMQ frame; the req_id frame before it stays as it is)::

    session id (16) | counter (8, big-endian) | AES-GCM ciphertext of the encoded message | tag (16)

* AAD = session id | counter | req_id: a frame cannot be moved to another session, counter or request.
* nonce (12) = (direction (1: 0x01 client->server, 0x02 server->client) | 3 zero bytes | counter (8))
  XOR the session id's first 12 bytes. Each side counts its own frames from 1 under one key, and
  the direction byte keeps the two counters' nonces apart, so a nonce is never used twice with a
  key. The mask (random per session, like TLS 1.3's per-connection IV) gives every session nonces
  of its own: a key search cannot test one guess against many recorded sessions at once, as it
  could if every session's first frame ran through the same counter block.
* The server accepts a client frame only if its session is known, its tag checks and its counter
  is strictly greater than the last one it accepted (a replayed or reordered frame is refused);
  the client does the same for replies. Everything refused is dropped without an answer.
* Key size and lifetime: AES-128, with the nonce mask above about as strong per session as the
  Curve25519 exchange that hands the key out (~128 bits). What bounds a GCM key's use is its
  128-bit block, whatever the key size: a client shakes hands again once a session carried
  ``SESSION_BYTES`` (64 GiB, both directions; the server then forgets the session), and a channel
  opens nothing more once it carried twice that, which keeps an observer's advantage in telling
  the ciphertext from random at about 2^-63 (areal_like/SECURITY.md).
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HELLO = b"\x00areal-like/session-hello/2"  # never the start of a protocol frame (a msgpack map)
WELCOME = b"\x00areal-like/session/2"  # /2: 128-bit keys, masked nonces
REFUSED = b"\x00areal-like/session-refused/1"
TO_SERVER, TO_CLIENT = 0x01, 0x02
SID_BYTES, KEY_BYTES, COUNTER_BYTES, TAG_BYTES = 16, 16, 8, 16
HEAD_BYTES = SID_BYTES + COUNTER_BYTES
OVERHEAD_BYTES = HEAD_BYTES + TAG_BYTES  # a sealed frame's size over its plaintext's
SESSION_BYTES = 1 << 36  # a client shakes hands again once its session's key carried this much (see Key lifetime)
MAX_SESSIONS = 4096  # the least recently used is forgotten beyond this (its client re-handshakes after a timeout)
_COUNTER = struct.Struct(">Q")
_NO_TAG = bytes(TAG_BYTES)


class SealError(ValueError):
    """A frame that is not a valid sealed frame of this session (the reason is safe to log)."""


def nonce_mask(sid: bytes) -> int:
    return int.from_bytes(sid[:12], "big")


def nonce(mask: int, direction: int, counter: int) -> bytes:
    """(direction | 3 zero bytes | counter) XOR ``mask`` (``nonce_mask`` of the session id)."""
    return ((direction << 88 | counter) ^ mask).to_bytes(12, "big")


def aad(sid: bytes, counter: int, req_id: bytes) -> bytes:
    return sid + _COUNTER.pack(counter) + req_id


@dataclass(eq=False)
class Channel:
    """One side of a session: seals frames in ``send_dir`` and opens frames of the other direction."""

    sid: bytes
    key: bytes = field(repr=False)  # never in a log line or a traceback's locals
    send_dir: int
    sent: int = 0  # counter of the last frame sealed
    received: int = 0  # counter of the last frame accepted
    carried: int = 0  # plaintext bytes sealed and opened under the key, both directions
    _aead: AESGCM = field(init=False, repr=False)
    _recv_dir: int = field(init=False, repr=False)
    _mask: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._aead = AESGCM(self.key)
        self._mask = nonce_mask(self.sid)
        self._recv_dir = TO_CLIENT if self.send_dir == TO_SERVER else TO_SERVER

    def seal(self, req_id: bytes, plaintext) -> bytes:
        return bytes(self.seal_in_place(req_id, bytearray(HEAD_BYTES) + plaintext))

    def seal_in_place(self, req_id: bytes, buf: bytearray) -> bytearray:
        """Seal ``buf`` = HEAD_BYTES of room, then the plaintext: the header is written into the room,
        the plaintext encrypted where it lies (no second buffer, no copy) and the tag appended."""
        self.sent += 1
        head = self.sid + _COUNTER.pack(self.sent)
        end = len(buf)
        self.carried += end - HEAD_BYTES
        buf[:HEAD_BYTES] = head
        buf += _NO_TAG  # room for the tag (the kept buffer's allocation usually has it already)
        with memoryview(buf) as view:
            self._aead.encrypt_into(nonce(self._mask, self.send_dir, self.sent), view[HEAD_BYTES:end], head + req_id,
                                    view[HEAD_BYTES:])
        return buf

    def open(self, req_id: bytes, frame) -> memoryview:
        """The plaintext of ``frame``, decrypted where it lies (a frame received over tcp is libzmq's own
        writable buffer; a read-only buffer is copied first; an inproc frame may share the sender's
        memory, which is why sealing is tcp only, ``security.seals``): a read-only view into the frame,
        which decoded arrays keep alive. SealError if it is not this session's, forged or not newer; a frame refused for its tag
        holds garbage after the call and is only fit to be dropped."""
        view = memoryview(frame)
        if len(view) < HEAD_BYTES + TAG_BYTES or view[:SID_BYTES] != self.sid:
            raise SealError("unknown session")
        counter = _COUNTER.unpack_from(view, SID_BYTES)[0]
        if counter <= self.received:
            raise SealError("replayed")
        if self.carried >= 2 * SESSION_BYTES:
            raise SealError("key spent")
        if view.readonly:
            view = memoryview(bytearray(view))
        plain = view[HEAD_BYTES:-TAG_BYTES]
        try:
            self._aead.decrypt_into(nonce(self._mask, self._recv_dir, counter), view[HEAD_BYTES:],
                                    bytes(view[:HEAD_BYTES]) + req_id, plain)
        except InvalidTag:
            raise SealError("bad tag") from None
        self.received = counter
        self.carried += len(plain)
        return plain.toreadonly()


@dataclass(eq=False)
class Session:
    """The server's record of one client: its channel, the role CURVE gave it, the peer id it had on
    the CURVE connection (what the daemon sees as its peer) and where its replies go now."""

    channel: Channel
    role: str
    peer: bytes
    route: bytes | None = None  # routing id of its bulk connection (from its last accepted frame)


class SessionTable:
    """The server's sessions by id and by peer; one per CURVE peer (a new HELLO replaces the old)."""

    def __init__(self, max_sessions: int = MAX_SESSIONS):
        self.max_sessions = max_sessions
        self._by_sid: OrderedDict[bytes, Session] = OrderedDict()
        self._by_peer: dict[bytes, Session] = {}

    def create(self, role: str, peer: bytes) -> Session:
        if (old := self._by_peer.pop(peer, None)) is not None:
            self._by_sid.pop(old.channel.sid, None)
        while len(self._by_sid) >= self.max_sessions:
            _, evicted = self._by_sid.popitem(last=False)
            self._by_peer.pop(evicted.peer, None)
        session = Session(Channel(os.urandom(SID_BYTES), AESGCM.generate_key(KEY_BYTES * 8), TO_CLIENT), role, peer)
        self._by_sid[session.channel.sid] = session
        self._by_peer[peer] = session
        return session

    def open(self, route: bytes, req_id: bytes, frame) -> tuple[Session, bytes]:
        """(session, plaintext) of a client frame; SealError (unknown session, bad tag, replay)."""
        sid = bytes(memoryview(frame)[:SID_BYTES])
        session = self._by_sid.get(sid)
        if session is None:
            raise SealError("unknown session")
        plain = session.channel.open(req_id, frame)
        session.route = route
        self._by_sid.move_to_end(sid)  # least recently used first out: a live session is not evicted
        return session, plain

    def retire(self, session: Session) -> None:
        """Forget ``session`` (its key carried its budget: its client shakes hands again, as a new peer)."""
        self._by_sid.pop(session.channel.sid, None)
        if self._by_peer.get(session.peer) is session:
            del self._by_peer[session.peer]

    def for_peer(self, peer: bytes) -> Session | None:
        return self._by_peer.get(peer)

    def __len__(self) -> int:
        return len(self._by_sid)


def welcome(session: Session, bulk_port: int) -> bytes:
    return WELCOME + session.channel.sid + session.channel.key + struct.pack(">H", bulk_port)


def client_channel(reply: bytes) -> tuple[Channel, int]:
    """The client's channel and the bulk port from a WELCOME; SealError for a REFUSED or anything else."""
    if reply.startswith(REFUSED):
        raise SealError("session refused: " + reply[len(REFUSED):].decode("utf-8", "replace"))
    if not reply.startswith(WELCOME) or len(reply) != len(WELCOME) + SID_BYTES + KEY_BYTES + 2:
        other = reply.startswith(WELCOME.rsplit(b"/", 1)[0] + b"/") and not reply.startswith(WELCOME)
        raise SealError("not a session reply" + (" (the server speaks another version of the session protocol: "
                                                 "run one version of areal-like across the job)" if other else ""))
    body = reply[len(WELCOME):]
    port = struct.unpack(">H", body[SID_BYTES + KEY_BYTES:])[0]
    return Channel(body[:SID_BYTES], body[SID_BYTES:SID_BYTES + KEY_BYTES], TO_SERVER), port


def bulk_address(address: str, port: int) -> str:
    """The bulk endpoint a client connects: the host of its tcp:// ``address``, the port from WELCOME."""
    host = address[len("tcp://"):].rsplit(":", 1)[0]
    return f"tcp://{host}:{port}"
