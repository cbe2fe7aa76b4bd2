"""Who may talk to the buffer: CURVE keys, the allow-list and the refusal count (threat model: areal_like/SECURITY.md).

A job's keys live in one directory (``security.keys_dir``, ``<run_dir>/keys`` by default), made by
``make_keys`` (``areal-like keys RUN_DIR``; ``areal-like run`` makes them itself):

    server.key, server.key_secret          the buffer's keypair (its ROUTER and PUB sockets)
    clients/<name>.key, .key_secret        one keypair per kind of client (CLIENT_NAMES)

Every file is ZeroMQ's own certificate format (``zmq.auth.create_certificates``), mode 0600 in a
0700 directory. The public ``clients/*.key`` files are the allow-list: the buffer's ZAP handler
(``zmq.auth.thread.ThreadAuthenticator``) admits a CURVE client only if its public key is one of
them. A node needs ``server.key`` and its own client keypair, the buffer node ``server.key_secret``
and ``clients/*.key``; copying the whole directory is simplest.

How it is used: each daemon calls ``setup(cfg, role)`` once at start, which loads its keys and
makes them the process's ``active`` keys; the transport calls ``apply(sock)`` on every socket it
creates. ``apply`` makes ROUTER and PUB sockets CURVE servers (one authenticator per ZeroMQ
context, started before the first bind) and DEALER and SUB sockets CURVE clients; with no active
keys (``security.curve=false``, or a process that never called ``setup``) sockets stay plain.

What a refused peer sees: nothing. A client with no CURVE, a wrong server key or a key not on the
allow-list fails the handshake, so no message of it reaches the buffer and no reply or announcement
reaches it; its requests time out. The buffer counts each failed handshake (a socket monitor on
every server socket; ``on_refused`` callbacks), by reason: ``unknown_key`` (a valid CURVE client
whose key is not allowed) or ``handshake`` (no CURVE, the wrong server key, garbage). A refused
client reconnects every ~100 ms (ZeroMQ's reconnect interval), so one stranger counts many times.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("security")

SERVER = "server"
CLIENT_NAMES = ("rollout", "trainer")  # rollout servers; trainer rank 0 (and tools that act for it)
ZAP_DOMAIN = "areal-like"
_SERVER_KINDS = (zmq.ROUTER, zmq.PUB)
_CLIENT_KINDS = (zmq.DEALER, zmq.SUB)
# Monitor events that mean a peer was refused, by reason (HANDSHAKE_FAILED_AUTH: the ZAP handler said no)
_REFUSAL_EVENTS = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "unknown_key", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake",
                   zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake"}
REFUSAL_REASONS = ("unknown_key", "handshake")


class SecurityError(RuntimeError):
    """Keys missing or unreadable; the message names the file and how to make it."""


@dataclass(frozen=True)
class Keys:
    """One process's CURVE material. Server: its keypair and the allow-list directory; client: the
    server's public key and its own keypair."""

    role: str  # SERVER or a client name
    public: bytes
    secret: bytes
    server_public: bytes
    allow_dir: Path | None = None  # server only: the public client keys


_active: Keys | None = None
_auths: dict[int, ThreadAuthenticator] = {}  # id(context) -> its running authenticator
_refused_callbacks: list[Callable[[str], None]] = []
_lock = threading.Lock()


def make_keys(keys_dir: str | Path, clients: tuple[str, ...] = CLIENT_NAMES) -> list[Path]:
    """Write the server keypair and one keypair per client name into ``keys_dir`` (mode 0700, files
    0600). Keys that exist are kept (a run that restarts keeps its keys). Returns the files written."""
    keys_dir = Path(keys_dir)
    written = []
    for name, where in [(SERVER, keys_dir), *((c, keys_dir / "clients") for c in clients)]:
        if (where / f"{name}.key_secret").exists():
            continue
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=where, prefix=".new-") as tmp:  # same filesystem: renames are atomic
            os.chmod(tmp, 0o700)
            public, secret = zmq.auth.create_certificates(tmp, name)
            for src in (Path(public), Path(secret)):
                os.chmod(src, 0o600)
                dst = where / src.name
                os.replace(src, dst)
                written.append(dst)
    for d in (keys_dir, keys_dir / "clients"):
        if d.exists():
            os.chmod(d, 0o700)
    return written


def load(keys_dir: str | Path, role: str) -> Keys:
    """The keys ``role`` (SERVER or a client name) needs from ``keys_dir``; SecurityError naming what is missing."""
    keys_dir = Path(keys_dir)
    server_public = _read(keys_dir / f"{SERVER}.key", keys_dir)[0]
    if role == SERVER:
        public, secret = _read(keys_dir / f"{SERVER}.key_secret", keys_dir)
        allow = keys_dir / "clients"
        if not allow.is_dir() or not zmq.auth.load_certificates(allow):
            raise SecurityError(f"no client keys in {allow}: nobody could connect (areal-like keys RUN_DIR makes them)")
        return Keys(role, public, secret, server_public, allow)
    public, secret = _read(keys_dir / "clients" / f"{role}.key_secret", keys_dir)
    return Keys(role, public, secret, server_public)


def _read(path: Path, keys_dir: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise SecurityError(f"{path} is missing: make the job's keys with `areal-like keys RUN_DIR` (or set "
                            f"security.keys_dir; security.curve=false turns authentication off) [keys_dir={keys_dir}]")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"{path} is not a ZeroMQ certificate: {e}") from None
    if path.suffix == ".key_secret" and not secret:
        raise SecurityError(f"{path} holds no secret key")
    return public, secret


def activate(keys: Keys | None) -> None:
    """Make ``keys`` this process's (None: plain sockets). Sockets made before keep what they had."""
    global _active
    _active = keys


def active() -> Keys | None:
    return _active


@contextmanager
def using(keys: Keys | None) -> Iterator[None]:
    """``activate(keys)`` for the block, then back to what was active (sockets made in it keep the keys)."""
    before = _active
    activate(keys)
    try:
        yield
    finally:
        activate(before)


def setup(cfg, role: str, logger: logging.Logger | None = None) -> Keys | None:
    """Daemon start: load and activate ``role``'s keys when ``cfg.security.curve``, else say loudly that
    the job's ZeroMQ traffic is open. Raises SecurityError when keys are missing."""
    logger = logger or log
    sec = cfg.security
    if not sec.curve:
        logger.warning("security.curve=false: ZeroMQ traffic is NOT authenticated or encrypted; any process that "
                       "can reach the buffer's ports can join this job (use only on a trusted network)")
        activate(None)
        return None
    keys = load(cfg.resolve_path(sec.keys_dir), role)
    activate(keys)
    logger.info("CURVE on: %s keys from %s", role, cfg.resolve_path(sec.keys_dir))
    return keys


def on_refused(callback: Callable[[str], None]) -> None:
    """Call ``callback(reason)`` (from a monitor thread) for every refused handshake on a server socket."""
    _refused_callbacks.append(callback)


def apply(sock: zmq.Socket) -> None:
    """The transport's hook: make ``sock`` a CURVE server or client with the active keys (before bind/connect)."""
    keys = _active
    if keys is None:
        return
    kind = sock.type
    if kind in _SERVER_KINDS:
        if keys.allow_dir is None:
            raise SecurityError(f"a {keys.role} process cannot serve CURVE: it holds no server key")
        _authenticator(sock.context, keys)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        _watch(sock)
    elif kind in _CLIENT_KINDS:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def _authenticator(ctx: zmq.Context, keys: Keys) -> None:
    """One running ZAP handler per context (ZAP is per context), allowing exactly the keys in allow_dir."""
    with _lock:
        if id(ctx) in _auths:
            return
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("security.zap"))
        auth.start()
        auth.configure_curve(domain=ZAP_DOMAIN, location=str(keys.allow_dir))
        _auths[id(ctx)] = auth


def _watch(sock: zmq.Socket) -> None:
    """Count refused handshakes on ``sock`` in a thread of their own; it ends when the socket closes."""
    events = 0
    for event in _REFUSAL_EVENTS:
        events |= event
    monitor = sock.get_monitor_socket(events)
    threading.Thread(target=_monitor_loop, args=(monitor,), name="zap-monitor", daemon=True).start()


def _monitor_loop(monitor: zmq.Socket) -> None:
    try:
        while True:
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_MONITOR_STOPPED:
                return
            reason = _REFUSAL_EVENTS.get(event)
            if reason is not None:
                for callback in list(_refused_callbacks):
                    callback(reason)
    except zmq.ZMQError:  # the context is being terminated
        return
    finally:
        monitor.close(linger=0)

