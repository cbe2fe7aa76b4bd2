"""The weight group's store gate and door (areal_like/net/store_gate.py) over real sockets."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from areal_like.net import store_gate
from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE
from areal_like.net.distributed import free_port
from areal_like.net.security import SecurityError
from areal_like.net.store_gate import MAGIC, NONCE_BYTES, StoreDoor, StoreGate, peer_uid

GROUP = "areal_like_weights-00112233445566778899aabbccddeeff"
KEY = "the-jobs-engine-api-key"
DEADLINE_S = 30.0  # what a test waits at most for an answer that must come


@pytest.fixture()
def echo():
    """A stand-in for the store: answers every connection's bytes reversed, once 6 have come."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            data = b""
            while len(data) < 6 and (chunk := conn.recv(100)):
                data += chunk
            conn.sendall(data[::-1])
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(DEADLINE_S)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("key", [None, ""])
def test_no_gate_or_door_without_the_jobs_key_and_the_error_says_where_it_comes_from(echo, key):
    port = free_port()
    for make in (lambda: StoreGate("127.0.0.1", port, GROUP, echo, key=key),
                 lambda: StoreDoor("127.0.0.1", port, GROUP, key=key)):
        with pytest.raises(SecurityError) as refused:
            make().close()
        assert ENGINE_KEY_ENV in str(refused.value) and str(KEY_FILE) in str(refused.value)
    with pytest.raises(ConnectionRefusedError):  # nothing was left listening
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S).close()


def test_a_door_waits_for_a_gate_that_opens_after_its_client_came_and_carries_its_bytes(
        echo, monkeypatch):
    """No drop, no C++ stacks; then the bytes pass unchanged both ways."""
    refused = threading.Event()
    connect = socket.create_connection

    def watched(*args, **kwargs):
        try:
            return connect(*args, **kwargs)
        except ConnectionRefusedError:
            refused.set()
            raise

    monkeypatch.setattr(socket, "create_connection", watched)
    port = free_port()
    door, gate = StoreDoor("127.0.0.1", port, GROUP, key=KEY), None
    try:
        with socket.create_connection(("127.0.0.1", door.port), timeout=DEADLINE_S) as s:
            s.sendall(b"\x00store")
            assert refused.wait(DEADLINE_S)  # the door found no gate yet
            gate = StoreGate("127.0.0.1", port, GROUP, echo, key=KEY)
            assert s.recv(100) == b"erots\x00"
        assert gate.refused == door.refused == 0 and gate.answered == 6
    finally:
        door.close()
        if gate is not None:
            gate.close()


@pytest.mark.parametrize("group, key", [(GROUP, GROUP), (GROUP, "another job's key"),
                                        ("another group", KEY)])
def test_the_groups_name_alone_another_key_or_another_group_and_a_torch_client_get_nothing(
        echo, group, key):
    port = free_port()
    gate, door = (StoreGate("127.0.0.1", port, GROUP, echo, key=KEY),
                  StoreDoor("127.0.0.1", port, group, key=key))
    before = store_gate.refused_total()  # what the daemon's metrics read, for the whole process
    try:
        with socket.create_connection(("127.0.0.1", door.port), timeout=DEADLINE_S) as s:
            # the door cannot pass the gate: the client's connection is closed
            s.sendall(b"\x00store")
            assert closed_by_peer(s)
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as s:
            # a torch client's first message, straight to the gate
            s.sendall(b"\x00\xce\xf7\x85\x3c")
            assert closed_by_peer(s)
        assert gate.answered == 0 and gate.refused >= 1
        assert store_gate.refused_total() - before == gate.refused + door.refused
    finally:
        door.close()
        gate.close()


def test_a_slow_sender_is_cut_off_at_the_handshake_deadline_in_all(monkeypatch, echo):
    monkeypatch.setattr(store_gate, "HANDSHAKE_S", 1.0)
    port = free_port()
    gate = StoreGate("127.0.0.1", port, GROUP, echo, key=KEY)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as s:
            t0, closed = time.monotonic(), False
            slow = MAGIC + bytes(NONCE_BYTES + 32)  # a whole handshake's worth: 8.8 s at this pace
            for byte in slow:  # each byte well within any per-read timeout
                try:
                    s.sendall(bytes([byte]))
                    s.settimeout(0.1)
                    closed = s.recv(100) == b""
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                if closed:
                    break
            assert closed and time.monotonic() - t0 < len(slow) * 0.1 / 2, (
                "not cut off at the deadline")
        assert gate.refused == 1 and gate.answered == 0
    finally:
        gate.close()


def test_connections_past_the_cap_are_closed_at_once(monkeypatch, echo):
    monkeypatch.setattr(store_gate, "MAX_UNPROVEN", 2)
    port = free_port()
    gate = StoreGate("127.0.0.1", port, GROUP, echo, key=KEY)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) for _ in range(2)]
    try:
        deadline = time.monotonic() + DEADLINE_S
        # the two idle ones hold both places until HANDSHAKE_S; a third is refused meanwhile
        while True:
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as s:
                if closed_by_peer(s) and gate.refused:
                    break
            assert time.monotonic() < deadline, "no connection was refused past the cap"
    finally:
        for s in idle:
            s.close()
        gate.close()


def test_a_door_proves_nothing_to_a_listener_that_cannot_prove_the_name():
    squatter = socket.create_server(("127.0.0.1", 0))
    got: dict = {}

    def impostor() -> None:  # reads the door's hello, answers with a challenge and a made-up proof
        conn, _ = squatter.accept()
        conn.settimeout(DEADLINE_S)
        hello = b""
        while len(hello) < len(MAGIC) + NONCE_BYTES and (chunk := conn.recv(100)):
            hello += chunk
        conn.sendall(os.urandom(NONCE_BYTES) + os.urandom(32))
        rest = b""
        try:
            while chunk := conn.recv(100):
                rest += chunk
        except OSError:
            pass
        got["hello"], got["after"] = hello, rest

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    door = StoreDoor("127.0.0.1", squatter.getsockname()[1], GROUP, key=KEY)
    try:
        with socket.create_connection(("127.0.0.1", door.port), timeout=DEADLINE_S) as s:
            s.sendall(b"\x00secret key of the group/")  # what a member's store client would send
            assert closed_by_peer(s)
        thread.join(DEADLINE_S)
        # no proof, not a byte of the client's
        assert got["hello"].startswith(MAGIC) and got["after"] == b""
    finally:
        door.close()
        squatter.close()


def test_peer_uid_names_the_owner_of_a_live_connection_only():
    server = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.create_connection(server.getsockname(), timeout=DEADLINE_S)
        conn, _ = server.accept()
        assert peer_uid(conn) == os.getuid()
        client.close()  # its entry lingers (FIN_WAIT2 / TIME_WAIT) with uid 0 and no inode
        assert peer_uid(conn) is None
        conn.close()
    finally:
        server.close()
