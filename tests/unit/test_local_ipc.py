"""Same-node ipc:// endpoints: what protects them (uid check, 0700 dir); tcp keeps CURVE."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq

from areal_like.daemon import STARTED
from areal_like.net import security
from areal_like.net.dealer import Client
from areal_like.net.distributed import free_port
from areal_like.net.transport import Server, TransportTimeout, local_addresses
from areal_like.settings.config import RunConfig, load_config
from areal_like.wire import protocol as P
from launch.topology import with_local_ipc
from rollout_server.server import RolloutServer
from tests.conftest import child_env

ANSWER_S = 20.0  # generous: the machine is shared; only refusals wait this long
NOBODY = 65534


def _cfg(*overrides: str) -> RunConfig:
    return load_config(list(overrides))


@pytest.fixture
def keys(tmp_path):
    security.make_keys(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def refusals():
    """Reasons of refused handshakes, and an event set on each."""
    seen, event = [], threading.Event()

    def record(reason: str) -> None:
        seen.append(reason)
        event.set()

    unwatch = security.on_refused(record)
    yield seen, event
    unwatch()


def serve_acks(server: Server, stop: threading.Event) -> threading.Thread:
    """Answer every request on server with an accepted Ack until stop."""
    def loop() -> None:
        while not stop.is_set():
            if (got := server.recv(0.05)) is not None:
                server.send(got[0], got[1],
                            P.Ack(ref="", status="accepted", reason=type(got[2]).__name__))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_private_dir_is_made_0700_and_others_are_refused(tmp_path):
    made = security.private_dir(tmp_path / "a" / "sock")
    assert made.is_dir() and (made.stat().st_mode & 0o777) == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(security.SecurityError, match=r"mode 0755.*must be 0700"):
        security.private_dir(open_dir)
    (tmp_path / "link").symlink_to(made)
    with pytest.raises(security.SecurityError, match="must be a directory"):
        security.private_dir(tmp_path / "link")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_private_dir_owned_by_another_user_is_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, NOBODY, NOBODY)
    with pytest.raises(security.SecurityError, match=f"owned by uid {NOBODY}"):
        security.private_dir(other)


def test_ipc_addresses_and_peer_credentials_are_read_exactly(tmp_path):
    assert security.ipc_path("tcp://127.0.0.1:5555") is None
    assert security.ipc_path("ipc:///run/x/router") == Path("/run/x/router")
    with pytest.raises(security.SecurityError, match="must be absolute"):
        security.ipc_path("ipc://relative/router")
    with pytest.raises(security.SecurityError, match="over AF_UNIX's 107"):
        security.ipc_path("ipc:///" + "d" * 120)
    assert local_addresses("/run/job/sock") == ("ipc:///run/job/sock/router",
                                                "ipc:///run/job/sock/pub")
    # libzmq's ZAP address of an ipc peer is host:uid:gid:pid (SO_PEERCRED);
    # a tcp peer's holds no uid
    assert security.peer_uid(b"localhost:1000:100:4242") == 1000
    assert security.peer_uid(b"127.0.0.1") is None and security.peer_uid(b"") is None


def test_tcp_keeps_curve_while_ipc_serves_this_user_without_it(tmp_path, keys, refusals):
    tcp, (router, _pub) = f"tcp://127.0.0.1:{free_port()}", local_addresses(tmp_path / "sock")
    server = Server(tcp, keys=security.load(keys, security.SERVER), local_address=router)
    stop = threading.Event()
    thread = serve_acks(server, stop)
    try:
        assert (tmp_path / "sock").stat().st_mode & 0o777 == 0o700
        assert Path(router[len("ipc://"):]).stat().st_mode & 0o777 == 0o600
        member = security.load(keys, "rollout")  # a member: CURVE on tcp, nothing on ipc
        curve = Client(tcp, keys=member, timeout_s=ANSWER_S)
        local = Client(router, keys=member, timeout_s=ANSWER_S)
        assert curve.request(P.StatsRequest()).reason == "StatsRequest"
        # the ipc endpoint speaks no CURVE
        assert local.request(P.StatsRequest()).reason == "StatsRequest"
        # no keys: ipc still serves this user, tcp refuses it
        plain_local, plain_tcp = Client(router, timeout_s=ANSWER_S), Client(tcp, timeout_s=2.0)
        assert plain_local.request(P.StatsRequest()).reason == "StatsRequest"
        with pytest.raises(TransportTimeout):
            plain_tcp.request(P.StatsRequest())
        assert refusals[1].wait(ANSWER_S) and "handshake" in refusals[0]
        for c in (curve, local, plain_local, plain_tcp):
            c.close()
    finally:
        stop.set()
        thread.join()
        server.close()


def test_a_socket_directory_others_can_enter_is_refused_before_anything_binds(tmp_path, keys):
    (tmp_path / "sock").mkdir(mode=0o755)
    os.chmod(tmp_path / "sock", 0o755)
    port = free_port()
    with pytest.raises(security.SecurityError, match="mode 0755"):
        Server(f"tcp://127.0.0.1:{port}", keys=security.load(keys, security.SERVER),
               local_address=local_addresses(tmp_path / "sock")[0])
    probe = zmq.Context.instance().socket(zmq.ROUTER)  # the tcp port is released with the socket
    # libzmq closes a socket in its I/O thread, after close() returns
    deadline = time.monotonic() + ANSWER_S
    while True:
        try:
            probe.bind(f"tcp://127.0.0.1:{port}")
            break
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    probe.close(linger=0)
    # and a client will not connect there
    with pytest.raises(security.SecurityError, match="mode 0755"):
        Client(local_addresses(tmp_path / "sock")[0])


HUNG_S = 30.0  # past its wait, a knocking child that has not exited is hung


def knock_as(uid: int, address: str, wait_s: float) -> int:
    """Fork a child as uid knocking on address: 0 no reply in wait_s, 1 a reply, 2 an error (a
    child hung by the fork is killed after HUNG_S and forked again)."""
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # the child: no pytest, no inherited ZeroMQ context
            code = 2
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                sock = zmq.Context().socket(zmq.DEALER)
                sock.linger = 0
                sock.connect(address)
                sock.send_multipart([b"0" * 16, P.encode(P.StatsRequest())])
                code = 1 if sock.poll(int(wait_s * 1000)) else 0
            finally:
                os._exit(code)
        exited = os.pidfd_open(pid)
        try:
            ready, _, _ = select.select([exited], [], [], wait_s + HUNG_S)
        finally:
            os.close(exited)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        if ready:
            return os.waitstatus_to_exitcode(status)
    raise AssertionError("the knocking child hung three times "
                         f"(killed after {wait_s + HUNG_S:g}s each)")


@pytest.mark.skipif(os.geteuid() != 0, reason="a process of another user needs root to start")
@pytest.mark.parametrize("curve", [True, False], ids=["curve_on", "curve_off"])
def test_a_process_of_another_user_is_refused_even_when_the_kernel_lets_it_in(
        keys, refusals, curve):
    """Another user let in by the kernel is still refused (and counted) by the uid check."""
    # not under pytest's 0700 tmp root: nobody must reach it
    sock_dir = Path(tempfile.mkdtemp(prefix="ipc-"))
    tcp, (router, _pub) = f"tcp://127.0.0.1:{free_port()}", local_addresses(sock_dir)
    server = Server(tcp, keys=security.load(keys, security.SERVER) if curve else None,
                    local_address=router)
    got: list = []
    stop, arrived = threading.Event(), threading.Event()

    def collect() -> None:
        while not stop.is_set():
            if (m := server.recv(0.05)) is not None:
                got.append(m)
                arrived.set()

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    try:
        os.chmod(sock_dir, 0o711)
        os.chmod(router[len("ipc://"):], 0o666)
        assert knock_as(NOBODY, router, 3.0) == 0  # sent, and no reply came
        assert refusals[1].wait(ANSWER_S), "the other user's handshake was not refused"
        assert "unknown_key" in refusals[0]
        assert got == []  # nothing of it reached the server's loop
        assert knock_as(os.geteuid(), router, 0.1) == 0  # the same knock as this job's user ...
        assert arrived.wait(ANSWER_S) and isinstance(got[0][2], P.StatsRequest)  # ... is let in
    finally:
        stop.set()
        thread.join()
        server.close()
        for f in sock_dir.iterdir():
            f.unlink()
        sock_dir.rmdir()


def test_a_one_node_run_points_every_daemon_at_the_same_node_sockets(tmp_path):
    cfg = _cfg(f"run_dir={tmp_path}")
    local = with_local_ipc(cfg)
    router, pub = local_addresses(tmp_path / "sock")
    assert local.buffer.local_dir == str(tmp_path / "sock")
    assert (local.rollout.buffer_address == local.trainer.buffer_address == router
            and local.rollout.pub_address == pub)
    assert local.buffer.address == cfg.buffer.address  # tcp stays (tools, other nodes), with CURVE
    assert with_local_ipc(_cfg(f"run_dir={tmp_path}", "security.local_ipc=false")) == _cfg(
        f"run_dir={tmp_path}", "security.local_ipc=false")
    chosen = with_local_ipc(_cfg(f"run_dir={tmp_path}", f"buffer.local_dir={tmp_path / 'mine'}"))
    assert chosen.rollout.buffer_address == local_addresses(tmp_path / "mine")[0]
    deep = tmp_path / ("d" * 100)
    # would not fit AF_UNIX: tcp + CURVE
    assert with_local_ipc(_cfg(f"run_dir={deep}")).buffer.local_dir == ""


def test_a_buffer_given_a_socket_directory_others_can_enter_refuses_in_one_line(tmp_path, keys):
    """A 0755 buffer.local_dir: one line naming it and chmod 700, exit 2."""
    (tmp_path / "local").mkdir(mode=0o755)
    os.chmod(tmp_path / "local", 0o755)
    proc = subprocess.run(
        [sys.executable, "-m", "buffer", f"run_dir={tmp_path}", f"security.keys_dir={keys}",
         f"buffer.address=tcp://127.0.0.1:{free_port()}",
         f"buffer.pub_address=tcp://127.0.0.1:{free_port()}", f"buffer.metrics_port={free_port()}",
         f"buffer.local_dir={tmp_path / 'local'}"],
        capture_output=True, text=True, timeout=120, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "has mode 0755" in errors[0] and "chmod 700" in errors[0], errors


def test_a_rollout_server_given_a_socket_directory_others_can_enter_refuses_to_start(
        tmp_path, caplog):
    """A rollout server checks the socket dir first: exit 2, no started, no engine."""
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    router, pub = local_addresses(tmp_path / "open")
    for given in ({"buffer_address": router}, {"pub_address": pub}):
        caplog.clear()
        cfg = _cfg(f"run_dir={tmp_path / 'run'}", "security.curve=false",
                   "trainer.logprob_guard_tol=0")
        for key, address in given.items():
            setattr(cfg.rollout, key, address)
        cfg.rollout.metrics_port = -1  # no /metrics server (the daemon's hook)
        server = RolloutServer.from_run(cfg)
        with caplog.at_level(logging.INFO, logger="rollout"):
            assert server.serve() == 2
        messages = [r.getMessage() for r in caplog.records]
        assert STARTED not in messages, messages
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "has mode 0755" in errors[0], errors
        assert not server.engine_url, "the engine started before the refusal"
