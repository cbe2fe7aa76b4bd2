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

How it is used: keys are a value, never process state. Each daemon calls ``setup(cfg, role)`` once
at start and keeps the ``Keys`` (or None) in its facts; every socket and client it makes is given
them (``transport.Server``/``new_socket``, ``dealer.Client``, ``pubsub``), and the transport calls
``apply(sock, keys)`` on the socket before it binds or connects. ``apply`` makes ROUTER and PUB
sockets CURVE servers (one authenticator per ZeroMQ context, started before the first bind) and
DEALER and SUB sockets CURVE clients; with None (``security.curve=false``) sockets stay plain.

What a refused peer sees: nothing. A client with no CURVE, a wrong server key or a key not on the
allow-list fails the handshake, so no message of it reaches the buffer and no reply or announcement
reaches it; its requests time out. The buffer counts each failed handshake (a socket monitor on
every server socket; ``on_refused`` callbacks), by reason: ``unknown_key`` (a valid CURVE client
whose key is not allowed) or ``handshake`` (no CURVE, the wrong server key, garbage). A refused
client reconnects every ~100 ms (ZeroMQ's reconnect interval), so one stranger counts many times.

Same-node endpoints (``bind``/``connect`` with an ``ipc://`` address): no CURVE, because nothing
leaves the kernel and the cipher is the transport's biggest cost (benchmarks/bench_transport.py).
What stands in for the keys, checked on both sides: the socket lives in a directory owned by this
user with mode 0700 (``private_dir``; the socket file itself 0600), so only this user (and root)
can reach it, and the ZAP handler admits a peer only if the kernel's credentials for the
connection (SO_PEERCRED, which libzmq puts in the ZAP address as ``host:uid:gid:pid``) name this
process's user; a peer of another user is refused and counted as ``unknown_key``. ZeroMQ applies
security options when an endpoint is bound or connected, so one socket can serve CURVE on tcp://
and this on ipc://; every tcp:// endpoint keeps CURVE.

The ZAP handler names an admitted client by its key's file name (the ZAP User-Id: ``rollout`` or
``trainer``): the buffer acts on a request by the role of the key that sent it (``role_of``).
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("security")

SERVER = "server"
CLIENT_NAMES = ("rollout", "trainer")  # rollout servers; trainer rank 0 (and tools that act for it)
ZAP_DOMAIN = "areal-like"
LOCAL_ZAP_DOMAIN = "areal-like-local"  # ipc:// endpoints: peers of this user only, no CURVE
IPC_PATH_MAX = 107  # bytes of an AF_UNIX socket path (sun_path holds 108 with its NUL)
_SERVER_KINDS = (zmq.ROUTER, zmq.PUB)
_CLIENT_KINDS = (zmq.DEALER, zmq.SUB)
# Monitor events that mean a peer was refused, by reason (HANDSHAKE_FAILED_AUTH: the ZAP handler said no)
_REFUSAL_EVENTS = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "unknown_key", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake",
                   zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake"}
REFUSAL_REASONS = ("unknown_key", "handshake", "role")  # role: transport.Server


class SecurityError(RuntimeError):
    """Keys missing or unreadable; the message names the file and how to make it."""


@dataclass(frozen=True)
class Keys:
    """One process's CURVE material. Server: its keypair and the allow-list directory; client: the
    server's public key and its own keypair."""

    role: str  # SERVER or a client name
    public: bytes
    secret: bytes = field(repr=False)  # never in a log line or a traceback's locals
    server_public: bytes
    allow_dir: Path | None = None  # server only: the public client keys


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


def setup(cfg, role: str, logger: logging.Logger | None = None) -> Keys | None:
    """Daemon start: ``role``'s keys when ``cfg.security.curve`` (the daemon keeps them in its
    facts), else None after saying loudly that the job's ZeroMQ traffic is open. SecurityError when
    keys are missing."""
    logger = logger or log
    sec = cfg.security
    if not sec.curve:
        logger.warning("security.curve=false: ZeroMQ traffic is NOT authenticated or encrypted; any process that "
                       "can reach the buffer's ports can join this job (use only on a trusted network)")
        return None
    keys = load(cfg.resolve_path(sec.keys_dir), role)
    logger.info("CURVE on: %s keys from %s", role, cfg.resolve_path(sec.keys_dir))
    return keys


def on_refused(callback: Callable[[str], None]) -> None:
    """Call ``callback(reason)`` (from a monitor thread) for every refused handshake on a server socket."""
    _refused_callbacks.append(callback)


def role_of(frame: zmq.Frame) -> str | None:
    """The role of the CURVE client that sent ``frame`` (its key's name, the ZAP User-Id); None when
    it came without CURVE (a same-node ``ipc://`` peer, or security off)."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


def refused(reason: str) -> None:
    """Count one refused peer (``on_refused`` callbacks): the monitor threads' path, and the
    transport's (a request under another role's peer id)."""
    for callback in list(_refused_callbacks):
        callback(reason)


def apply(sock: zmq.Socket, keys: Keys | None) -> None:
    """The transport's hook: make ``sock`` a CURVE server or client with ``keys`` (None: plain),
    before it binds or connects."""
    if keys is None:
        return
    if sock.type in _SERVER_KINDS:
        if keys.allow_dir is None:
            raise SecurityError(f"a {keys.role} process cannot serve CURVE: it holds no server key")
        _authenticator(sock.context, keys)
        _set_curve(sock, keys)
        _watch(sock)
    elif sock.type in _CLIENT_KINDS:
        _set_curve(sock, keys)


def _set_curve(sock: zmq.Socket, keys: Keys) -> None:
    """CURVE options for endpoints bound or connected from now on (server or client by socket kind)."""
    if sock.type in _SERVER_KINDS:
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
    elif sock.type in _CLIENT_KINDS:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def _authenticator(ctx: zmq.Context, keys: Keys | None) -> None:
    """One running ZAP handler per context (ZAP is per context): CURVE clients with exactly the keys in
    allow_dir (server keys), ipc:// peers of this user. A daemon serves one job's keys; a process that
    serves another keys directory later (one test after another) gets that directory's allow-list."""
    with _lock:
        auth = _auths.get(id(ctx))
        if auth is None:
            auth = _auths[id(ctx)] = _Authenticator(ctx, log=logging.getLogger("security.zap"))
            auth.start()
        if keys is not None and keys.allow_dir is not None and auth.allow_dir != keys.allow_dir:
            auth.configure_curve(domain=ZAP_DOMAIN, location=str(keys.allow_dir))
            auth.roles, auth.allow_dir = client_roles(keys.allow_dir), keys.allow_dir


def client_roles(allow_dir: Path) -> dict[bytes, str]:
    """Public key -> client name (``clients/<name>.key``): the role the ZAP handler names a client by."""
    roles = {}
    for path in sorted(Path(allow_dir).glob("*.key")):
        public, _ = zmq.auth.load_certificate(path)
        roles[zmq.utils.z85.decode(public)] = path.stem
    return roles


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler (the CURVE allow-list) plus the rule of same-node endpoints; an admitted
    CURVE client's User-Id is its key's name (``client_roles``)."""

    roles: dict[bytes, str] = {}
    allow_dir: Path | None = None  # whose allow-list (and roles) it holds

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.roles.get(bytes(client_public_key), "")

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 6 and msg[2] == LOCAL_ZAP_DOMAIN.encode():
            uid = peer_uid(msg[3])
            ok = msg[5] == b"NULL" and uid == os.geteuid()
            if not ok:
                self.log.warning("refused an ipc peer: uid %s, mechanism %s (this job runs as uid %d)", uid,
                                 msg[5].decode(errors="replace"), os.geteuid())
            # User-Id "": no role (role_of gives None); a CURVE client's is its key's name
            self._send_zap_reply(msg[1], b"200" if ok else b"400", b"OK" if ok else b"not this job's user", "")
            return
        await super().handle_zap_message(msg)


def peer_uid(zap_address: bytes) -> int | None:
    """The uid in the ZAP address libzmq gives an ipc:// peer (``host:uid:gid:pid``, from SO_PEERCRED);
    None when it holds none (a libzmq built without SO_PEERCRED: such peers are refused)."""
    parts = zap_address.decode("ascii", "replace").rsplit(":", 3)
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


def private_dir(path: str | Path, create: bool = True) -> Path:
    """``path`` as a directory only this user can enter: not a symlink, owned by this user, no group or
    other permission bits; made so (0700) when missing and ``create``. SecurityError naming what is wrong."""
    path = Path(path)
    if create and not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SecurityError(f"{path} does not exist (the buffer makes it when it starts)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SecurityError(f"{path} must be a directory (not a symlink or a file) to hold the job's sockets")
    if st.st_uid != os.geteuid():
        raise SecurityError(f"{path} is owned by uid {st.st_uid}, not by this process's user (uid {os.geteuid()}): "
                            "its sockets could be someone else's")
    if st.st_mode & 0o077:
        raise SecurityError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: other users could reach the job's "
                            "sockets in it; it must be 0700 (chmod 700)")
    return path


def ipc_path(address: str) -> Path | None:
    """The socket path of an ``ipc://`` address (absolute, short enough for AF_UNIX); None for any other."""
    if not address.startswith("ipc://"):
        return None
    path = Path(address[len("ipc://"):])
    if not path.is_absolute():
        raise SecurityError(f"{address}: a same-node socket path must be absolute")
    if len(os.fsencode(path)) > IPC_PATH_MAX:
        raise SecurityError(f"{address}: the path is {len(os.fsencode(path))} bytes, over AF_UNIX's "
                            f"{IPC_PATH_MAX}; use a shorter directory")
    return path


def bind(sock: zmq.Socket, address: str) -> None:
    """Bind ``sock`` on ``address``: tcp:// with its CURVE settings (``apply``), ipc:// as a same-node
    endpoint (module docstring: private directory, socket 0600, peers of this user only, no CURVE)."""
    path = ipc_path(address)
    if path is None:
        sock.bind(address)
        return
    private_dir(path.parent)
    _authenticator(sock.context, None)
    was_curve = sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
    domain = sock.getsockopt(zmq.ZAP_DOMAIN) or ZAP_DOMAIN.encode()  # libzmq takes no empty domain back
    if not was_curve:
        _watch(sock)  # ``apply`` watches CURVE servers; refused ipc peers are counted either way
    sock.setsockopt(zmq.CURVE_SERVER, 0)  # NULL mechanism for this endpoint only (options apply at bind)
    sock.setsockopt(zmq.ZAP_DOMAIN, LOCAL_ZAP_DOMAIN.encode())
    try:
        sock.bind(address)  # libzmq removes a socket file left by an earlier run first
        os.chmod(path, 0o600)
    finally:  # later binds as before (a NULL peer under the CURVE domain passes pyzmq's handler)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain)
        if was_curve:
            sock.setsockopt(zmq.CURVE_SERVER, 1)  # its keys are still set


def connect(sock: zmq.Socket, address: str) -> None:
    """Connect ``sock`` to ``address``: tcp:// with its CURVE settings, ipc:// without CURVE once the
    socket's directory is checked to be this user's alone (so the server is this user's too). The
    socket stays without CURVE: a tcp endpoint connected later would be refused, never sent in clear."""
    path = ipc_path(address)
    if path is None:
        sock.connect(address)
        return
    private_dir(path.parent)
    sock.setsockopt(zmq.CURVE_SERVER, 0)  # NULL mechanism (options apply at connect)
    sock.connect(address)


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
                refused(reason)
    except zmq.ZMQError:  # the context is being terminated
        return
    finally:
        monitor.close(linger=0)
