"""Who may talk to the buffer: CURVE keys, the ZAP allow-list, same-node ``ipc://`` endpoints and
the refusal count. The threat model and the key files: areal_like/SECURITY.md.

Invariants: keys are values (``setup`` once per daemon, then passed to every socket; ``apply``
before bind/connect); every tcp:// endpoint of a server is CURVE behind the allow-list of
``clients/*.key`` (None: plain, ``security.curve=false``); an ipc:// endpoint has no CURVE and
admits only this user's peers (0700 directory, uid from SO_PEERCRED); an admitted CURVE client's
ZAP User-Id is its key's name (``role_of``); every refused handshake is counted (``on_refused``).
"""

from __future__ import annotations

import contextlib
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
# monitor events that mean a peer was refused, by reason (FAILED_AUTH: the ZAP handler said no)
_REFUSAL_EVENTS = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "unknown_key",
                   zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake",
                   zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake"}
REFUSAL_REASONS = ("unknown_key", "handshake", "role")  # role: transport.Server


class SecurityError(RuntimeError):
    """Keys missing, unreadable or readable by others; the message names the file and what to
    do."""


@dataclass(frozen=True)
class Keys:
    """One process's CURVE keypair, the server's public key and (server only) the allow-list."""

    role: str  # SERVER or a client name
    public: bytes
    secret: bytes = field(repr=False)  # never in a log line or a traceback's locals
    server_public: bytes
    allow_dir: Path | None = None


_auths: dict[int, ThreadAuthenticator] = {}  # id(context) -> its running authenticator
_refused_callbacks: list[Callable[[str], None]] = []
_lock = threading.Lock()


def make_keys(keys_dir: str | Path, clients: tuple[str, ...] = CLIENT_NAMES) -> list[Path]:
    """Write the missing keypairs (server, one per client) into ``keys_dir`` (0700, files 0600)."""
    keys_dir = Path(keys_dir)
    written = []
    for name, where in [(SERVER, keys_dir), *((c, keys_dir / "clients") for c in clients)]:
        if (where / f"{name}.key_secret").exists():
            owner_only(where / f"{name}.key_secret")  # kept: refused now, not by a daemon later
            continue
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=where, prefix=".new-") as tmp:  # atomic renames
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
    """The keys ``role`` needs from ``keys_dir``; SecurityError naming what is missing."""
    keys_dir = Path(keys_dir)
    server_public = _read(keys_dir / f"{SERVER}.key", keys_dir)[0]
    if role == SERVER:
        public, secret = _read(keys_dir / f"{SERVER}.key_secret", keys_dir)
        allow = keys_dir / "clients"
        if not allow.is_dir() or not zmq.auth.load_certificates(allow):
            raise SecurityError(f"no client keys in {allow}: nobody could connect "
                                "(areal-like keys RUN_DIR makes them)")
        return Keys(role, public, secret, server_public, allow)
    public, secret = _read(keys_dir / "clients" / f"{role}.key_secret", keys_dir)
    return Keys(role, public, secret, server_public)


def _read(path: Path, keys_dir: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise SecurityError(f"{path} is missing: make the job's keys with "
                            "`areal-like keys RUN_DIR` (or set security.keys_dir; "
                            "security.curve=false turns authentication off) "
                            f"[keys_dir={keys_dir}]")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"{path} is not a ZeroMQ certificate: {e}") from None
    if path.suffix == ".key_secret" and not secret:
        raise SecurityError(f"{path} holds no secret key")
    if secret:
        owner_only(path)
    return public, secret


def owner_only(path: Path) -> None:
    """SecurityError when the secret key file ``path`` gives its group or others any access, as ssh
    refuses such a private key (a plain ``scp`` leaves a copy 0644); FileNotFoundError if none."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise SecurityError(f"{path} has mode {mode:04o}: other users may read the secret key in "
                            f"it; chmod 600 {path}")


def setup(cfg, role: str, logger: logging.Logger | None = None) -> Keys | None:
    """Daemon start: ``role``'s keys, or None (loudly) with ``security.curve=false``."""
    logger = logger or log
    sec = cfg.security
    if not sec.curve:
        logger.warning("security.curve=false: ZeroMQ traffic is NOT authenticated or encrypted; "
                       "any process that can reach the buffer's ports can join this job (use only "
                       "on a trusted network)")
        return None
    keys = load(cfg.resolve_path(sec.keys_dir), role)
    logger.info("CURVE on: %s keys from %s", role, cfg.resolve_path(sec.keys_dir))
    return keys


def on_refused(callback: Callable[[str], None]) -> Callable[[], None]:
    """Call ``callback(reason)`` (from a monitor thread) for every refused peer, until the
    returned function is called."""
    _refused_callbacks.append(callback)

    def unwatch() -> None:
        with contextlib.suppress(ValueError):  # once is enough
            _refused_callbacks.remove(callback)
    return unwatch


def role_of(frame: zmq.Frame) -> str | None:
    """The role of the CURVE client that sent ``frame``; None without CURVE."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


def refused(reason: str) -> None:
    """Count one refused peer (``on_refused`` callbacks)."""
    for callback in list(_refused_callbacks):
        callback(reason)


def apply(sock: zmq.Socket, keys: Keys | None) -> None:
    """Make ``sock`` a CURVE server or client (by its kind) before it binds or connects."""
    server = sock.type in _SERVER_KINDS
    if keys is None or not (server or sock.type in _CLIENT_KINDS):
        return
    if server and keys.allow_dir is None:
        raise SecurityError(f"a {keys.role} process cannot serve CURVE: it holds no server key")
    if server:
        _authenticator(sock.context, keys)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    else:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    if server:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        _watch(sock)


def _authenticator(ctx: zmq.Context, keys: Keys | None) -> None:
    """One running ZAP handler per context, holding the allow-list of the last ``keys`` served."""
    with _lock:
        auth = _auths.get(id(ctx))
        if auth is None:
            auth = _auths[id(ctx)] = _Authenticator(ctx, log=logging.getLogger("security.zap"))
            auth.start()
        if keys is not None and keys.allow_dir is not None and auth.allow_dir != keys.allow_dir:
            auth.configure_curve(domain=ZAP_DOMAIN, location=str(keys.allow_dir))
            auth.roles, auth.allow_dir = client_roles(keys.allow_dir), keys.allow_dir


def client_roles(allow_dir: Path) -> dict[bytes, str]:
    """Public key -> client name (``clients/<name>.key``)."""
    roles = {}
    for path in sorted(Path(allow_dir).glob("*.key")):
        public, _ = zmq.auth.load_certificate(path)
        roles[zmq.utils.z85.decode(public)] = path.stem
    return roles


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler plus the rule of same-node endpoints (``handle_zap_message``)."""

    roles: dict[bytes, str] = {}
    allow_dir: Path | None = None

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.roles.get(bytes(client_public_key), "")

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 6 and msg[2] == LOCAL_ZAP_DOMAIN.encode():
            uid = peer_uid(msg[3])
            ok = msg[5] == b"NULL" and uid == os.geteuid()
            if not ok:
                self.log.warning("refused an ipc peer: uid %s, mechanism %s "
                                 "(this job runs as uid %d)", uid,
                                 msg[5].decode(errors="replace"), os.geteuid())
            # User-Id "": no role (role_of gives None); a CURVE client's is its key's name
            self._send_zap_reply(msg[1], b"200" if ok else b"400",
                                 b"OK" if ok else b"not this job's user", "")
            return
        await super().handle_zap_message(msg)


def peer_uid(zap_address: bytes) -> int | None:
    """The uid in an ipc:// peer's ZAP address (``host:uid:gid:pid``); None when it holds none."""
    parts = zap_address.decode("ascii", "replace").rsplit(":", 3)
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


def private_dir(path: str | Path) -> Path:
    """``path`` checked to be a directory only this user can enter (made 0700 when missing)."""
    path = Path(path)
    if not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise SecurityError(f"{path} must be a directory (not a symlink or a file) to hold the "
                            "job's sockets")
    if st.st_uid != os.geteuid():
        raise SecurityError(f"{path} is owned by uid {st.st_uid}, not by this process's user "
                            f"(uid {os.geteuid()}): its sockets could be someone else's")
    if st.st_mode & 0o077:
        raise SecurityError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: other users could "
                            "reach the job's sockets in it; it must be 0700 (chmod 700)")
    return path


def ipc_path(address: str) -> Path | None:
    """The socket path of an ``ipc://`` address (checked); None for any other."""
    if not address.startswith("ipc://"):
        return None
    path = Path(address[len("ipc://"):])
    if not path.is_absolute():
        raise SecurityError(f"{address}: a same-node socket path must be absolute")
    if len(os.fsencode(path)) > IPC_PATH_MAX:
        raise SecurityError(f"{address}: the path is {len(os.fsencode(path))} bytes, over "
                            f"AF_UNIX's {IPC_PATH_MAX}; use a shorter directory")
    return path


def bind(sock: zmq.Socket, address: str) -> None:
    """Bind ``sock`` on ``address``: tcp:// as ``apply`` set it, ipc:// without CURVE (socket
    0600 in a private directory, peers of this user only)."""
    path = ipc_path(address)
    if path is None:
        sock.bind(address)
        return
    private_dir(path.parent)
    _authenticator(sock.context, None)
    was_curve = sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
    # libzmq takes no empty domain back
    domain = sock.getsockopt(zmq.ZAP_DOMAIN) or ZAP_DOMAIN.encode()
    if not was_curve:
        _watch(sock)  # ``apply`` watches CURVE servers; refused ipc peers are counted either way
    # NULL mechanism for this endpoint only (options apply at bind)
    sock.setsockopt(zmq.CURVE_SERVER, 0)
    sock.setsockopt(zmq.ZAP_DOMAIN, LOCAL_ZAP_DOMAIN.encode())
    try:
        sock.bind(address)  # libzmq removes a socket file left by an earlier run first
        os.chmod(path, 0o600)
    finally:  # later binds as before (a NULL peer under the CURVE domain passes pyzmq's handler)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain)
        if was_curve:
            sock.setsockopt(zmq.CURVE_SERVER, 1)  # its keys are still set


def check_local(address: str) -> Path | None:
    """The socket path of an ``ipc://`` address, its directory checked to be this user's alone
    (``private_dir``); None for any other. A daemon calls it before it logs ``started``, so a
    directory others may enter is a refused start (exit 2), not a stop after it ran."""
    path = ipc_path(address)
    if path is not None:
        private_dir(path.parent)
    return path


def connect(sock: zmq.Socket, address: str) -> None:
    """Connect ``sock`` to ``address``: ipc:// without CURVE once its directory is checked to be
    this user's (the socket stays so: a later tcp endpoint is refused, never sent in clear)."""
    if check_local(address) is None:
        sock.connect(address)
        return
    sock.setsockopt(zmq.CURVE_SERVER, 0)  # NULL mechanism (options apply at connect)
    sock.connect(address)


def _watch(sock: zmq.Socket) -> None:
    """Count refused handshakes on ``sock`` in a thread that ends when the socket closes."""
    monitor = sock.get_monitor_socket(sum(_REFUSAL_EVENTS))
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
