"""Who reaches a weight group's rendezvous store: a ``StoreGate`` in front of it, a ``StoreDoor``
beside each member (the threat and the handshake: areal_like/SECURITY.md, "Ports").

torch's TCPStore serves and lists its keys to anyone, so rank 0 hosts it on loopback and the gate
pipes a connection to it only once it proved it holds the job's engine API key (the key the
trainer and every engine already share; bound to the group's name, so a proof for one group is no
proof for another). A member's torch client connects to a door on its own loopback (established
connections of its own user only, read from ``/proc/net/tcp``) that proves it for it. A gate or
door is made only with the key (``need_key``: a SecurityError naming where the key comes from).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import socket
import threading
import time

from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE
from areal_like.net.ratelog import RateLimitedLog
from areal_like.net.security import SecurityError

log = logging.getLogger("store_gate")
_refusals = RateLimitedLog(log, every_s=60.0)  # a stranger can connect at will

MAGIC = b"areal-like store gate/2\n"
NONCE_BYTES = PROOF_BYTES = 32
HANDSHAKE_S = 10.0  # a connection not proven by then is closed, however slow
MAX_UNPROVEN = 64  # connections proving themselves at once; more are closed at once
ACCEPT_RETRY_S = 0.05  # after a failed accept (out of descriptors), before the next
CONNECT_RETRY_S = 0.05  # a door: while the gate it leads to does not listen yet
LISTEN_BACKLOG = 128  # pending connections (engines' TP ranks join at once)
GATES: dict[int, StoreGate] = {}  # this process's open gates by port
_refused_lock = threading.Lock()
_refused_in_process = 0  # by every gate and door of this process


def refused_total() -> int:
    """Connections this process's gates and doors refused so far (its daemon's
    ``areal_refused_total{port="weight_sync"}``)."""
    return _refused_in_process


def need_key(key: str | None) -> str:
    """``key``, the job's engine API key, which every gate and door proves; SecurityError when
    there is none (a component started by hand without it)."""
    if not key:
        raise SecurityError(
            "a weight group's store gate and doors prove the job's engine API key, and this "
            f"process has none: set {ENGINE_KEY_ENV} to it, or start the process with the job's "
            f"run_dir, where <run_dir>/{KEY_FILE} holds it (made by `areal-like run`, or by the "
            "first of the job's daemons to start)")
    return key


def proof(key: str, group: str, who: bytes, *nonces: bytes) -> bytes:
    """HMAC-SHA256, keyed by the job's engine API key ``key``, of the group's name, ``who``
    (b"door" or b"gate") and the nonces."""
    secret = hashlib.sha256(b"areal-like store gate key\0" + key.encode()).digest()
    message = MAGIC + who + group.encode() + b"\0" + b"".join(nonces)
    return hmac.new(secret, message, hashlib.sha256).digest()


def listen_on(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` only (SO_REUSEADDR: past an earlier TIME_WAIT)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes from ``sock`` by ``deadline`` (time.monotonic()), however slowly they come."""
    out = bytearray()
    while len(out) < n:
        if (left := deadline - time.monotonic()) <= 0:
            raise TimeoutError("the handshake took too long")
        sock.settimeout(left)
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        out += chunk
    return bytes(out)


class _Relay:
    """A listener whose connections ``_admit`` (each in a thread) pipes to an upstream socket."""

    def __init__(self, listener: socket.socket, name: str):
        self.listener, self.port = listener, listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self.answered = 0  # bytes carried back from upstream (the store's answers, for a gate)
        self.refused = 0
        self._unproven = threading.BoundedSemaphore(MAX_UNPROVEN)
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name=name, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed, or out of descriptors (EMFILE) for a moment
                time.sleep(ACCEPT_RETRY_S)
                continue
            if not self._unproven.acquire(blocking=False):  # a flood: the newest waits for no one
                self._refuse(conn, "too many connections proving themselves at once")
                continue
            if not self._track(conn):
                self._unproven.release()
                return
            try:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            except RuntimeError:  # no thread to spare
                self._unproven.release()
                self._drop(conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            upstream = self._admit(conn, time.monotonic() + HANDSHAKE_S)
        except OSError:
            upstream = None
        finally:
            self._unproven.release()
        if upstream is None or not self._track(upstream):
            self._drop(conn)
            return
        for sock in (conn, upstream):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # store messages are small
        ended = [0]  # directions that ended: the second one drops both sockets
        threading.Thread(target=self._copy, args=(upstream, conn, ended, True), daemon=True).start()
        self._copy(conn, upstream, ended)

    def _copy(self, src: socket.socket, dst: socket.socket, ended: list[int],
              answers: bool = False) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(1 << 16):
                if answers:  # counted before it is passed on
                    self.answered += len(chunk)
                dst.sendall(chunk)
        with self._lock:
            ended[0] += 1
            last = ended[0] == 2
        if last:
            self._drop(src)
            self._drop(dst)
        else:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # the other direction may still carry a reply

    def _refuse(self, conn: socket.socket, why: str) -> None:
        """Close ``conn`` unanswered and count it; logged at most once a minute per gate or door
        kind."""
        global _refused_in_process
        self.refused += 1
        with _refused_lock:
            _refused_in_process += 1
        _refusals.warning(type(self).__name__,
                          "%s refused a connection from %s (%s; %d refused so far)",
                          type(self).__name__, _peer(conn), why, self.refused)
        with contextlib.suppress(OSError):
            conn.close()

    def _admit(self, conn: socket.socket, deadline: float) -> socket.socket | None:
        """The upstream socket to pipe ``conn`` to once it has proven itself; None: refused (each
        subclass)."""
        raise NotImplementedError

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                sock.close()
                return False
            self._open.add(sock)
            return True

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self) -> None:
        """Stop listening and cut every connection (a join in progress fails at once)."""
        with self._lock:
            self._closed = True
            socks, self._open = list(self._open), set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self.listener.close()
        for sock in socks:
            self._drop(sock)


class StoreGate(_Relay):
    """On ``host:port``: admits connections that prove ``key`` for ``group``, piped to the store on
    loopback ``store_port``; ``store`` (rank 0's store server) is kept while the gate is open."""

    def __init__(self, host: str, port: int, group: str, store_port: int, store: object = None, *,
                 key: str):
        self.group, self.key, self.store_port, self.store = group, need_key(key), store_port, store
        super().__init__(listen_on(host, port), f"store-gate-{port}")
        GATES[self.port] = self

    def close(self) -> None:
        if GATES.get(self.port) is self:
            del GATES[self.port]
        super().close()
        self.store = None  # the store server closes with its last reference

    def _admit(self, conn: socket.socket, deadline: float) -> socket.socket | None:
        challenge = os.urandom(NONCE_BYTES)
        try:
            ok = (recv_exact(conn, 1, deadline) == MAGIC[:1]
                  and recv_exact(conn, len(MAGIC) - 1, deadline) == MAGIC[1:])
            if ok:  # a door: its nonce, our challenge and our own proof; then its proof of both
                theirs = recv_exact(conn, NONCE_BYTES, deadline)
                conn.sendall(challenge + proof(self.key, self.group, b"gate", theirs, challenge))
                ok = hmac.compare_digest(recv_exact(conn, PROOF_BYTES, deadline),
                                         proof(self.key, self.group, b"door", theirs, challenge))
        except (OSError, ConnectionError):
            ok = False
        if not ok:
            self._refuse(conn, "no valid proof of the job's engine key for this group")
            return None
        return socket.create_connection(("127.0.0.1", self.store_port), timeout=HANDSHAKE_S)


class StoreDoor(_Relay):
    """On loopback (``port``): this user's connections, carried through the gate at ``host:port``
    with a proof of ``key`` for ``group``."""

    def __init__(self, host: str, port: int, group: str, *, key: str):
        self.target, self.group, self.key = (host, port), group, need_key(key)
        super().__init__(listen_on("127.0.0.1", 0), f"store-door-{port}")

    def _admit(self, conn: socket.socket, deadline: float) -> socket.socket | None:
        if (uid := peer_uid(conn)) != os.getuid():
            self._refuse(conn, f"uid {uid}, not ours")
            return None
        # a torch client speaks first (never MAGIC's first byte); peeked, as torch's store drops a
        # client whose first message arrives split
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        first = conn.recv(1, socket.MSG_PEEK)
        inner = first == MAGIC[:1]  # an engine's door behind its server's: it answers the gate
        if not first or inner and recv_exact(conn, len(MAGIC), deadline) != MAGIC:
            return None
        upstream = _connect(self.target, deadline)
        try:
            if inner:
                upstream.sendall(MAGIC)
            else:  # prove the key only after the gate proved it (a squatter learns nothing)
                ours = os.urandom(NONCE_BYTES)
                upstream.sendall(MAGIC + ours)
                challenge = recv_exact(upstream, NONCE_BYTES, deadline)
                if not hmac.compare_digest(recv_exact(upstream, PROOF_BYTES, deadline),
                                           proof(self.key, self.group, b"gate", ours, challenge)):
                    raise ConnectionError("the other end is not this group's store gate")
                upstream.sendall(proof(self.key, self.group, b"door", ours, challenge))
        except (OSError, ConnectionError) as e:
            log.warning("could not pass the weight group's store gate at %s:%s: %s",
                        *self.target, e)
            upstream.close()
            return None
        return upstream


def _connect(target: tuple[str, int], deadline: float) -> socket.socket:
    """A connection to the gate at ``target``, tried again until ``deadline`` while nothing
    listens there yet: a member may take its plan up before rank 0 opens the gate, and a client
    dropped for that retried on its own, logging torch's C++ stack trace each time."""
    while True:
        try:
            return socket.create_connection(target, timeout=HANDSHAKE_S)
        except ConnectionRefusedError:
            if time.monotonic() + CONNECT_RETRY_S >= deadline:
                raise
            time.sleep(CONNECT_RETRY_S)


def peer_uid(conn: socket.socket) -> int | None:
    """The uid owning the other end of loopback IPv4 ``conn`` (Linux's /proc/net/tcp or tcp6,
    IPv4-mapped); None when it cannot be told."""
    (peer_host, peer_port), (host, port) = conn.getpeername()[:2], conn.getsockname()[:2]
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        want = (_hex_endpoint(peer_host, peer_port, v6), _hex_endpoint(host, port, v6))
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    # established and still owned (a TIME_WAIT entry says uid 0, inode 0)
                    if (fields[1], fields[2]) == want and fields[3] == "01" and fields[9] != "0":
                        return int(fields[7])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return None


def _hex_endpoint(host: str, port: int, v6: bool) -> str:
    """An IPv4 ``host:port`` as /proc/net/tcp (``v6``: tcp6, IPv4-mapped) writes it."""
    raw = (bytes(10) + b"\xff\xff" if v6 else b"") + socket.inet_aton(host)
    words = "".join(f"{int.from_bytes(raw[i:i + 4], 'little'):08X}" for i in range(0, len(raw), 4))
    return f"{words}:{port:04X}"


def _peer(conn: socket.socket) -> str:
    try:
        return "%s:%s" % conn.getpeername()[:2]
    except OSError:
        return "?"
