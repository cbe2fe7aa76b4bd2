"""Only ranks holding the job's engine key and the group's secret name join a weight group.

Rank 0 hosts the rendezvous behind areal_like/net/store_gate.py. Strangers (an idle connection,
garbage, a TCPStore client guessing the name without the token, another job's member, a client
listing keys) get no rank and no key; the real rank joins within the deadline and a broadcast
arrives; the port answers on loopback only. Without a key nothing is hosted or joined. A
torch-rendezvous engine (SGLang) joins through its rollout server's door, which admits this user.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

import psutil
import pytest
import torch

from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE
from areal_like.net.distributed import destroy_weight_group, free_port, init_weight_group
from areal_like.net.security import SecurityError
from areal_like.net.store_gate import GATES, StoreDoor

# the group's rendezvous deadline (a loaded machine starts Python processes slowly)
CONNECT_S = 60.0
STRANGER_S = 15.0  # the guessing stranger's own rendezvous deadline
SECRET_NAME = "areal_like_weights-5f0c1d2e3a4b59687a8b9cadbecf0011"
KEY = secrets.token_hex(16)  # the job's engine key (a member gets it in its environment)
JOB = {ENGINE_KEY_ENV: KEY}

MEMBER = r"""
import os, sys, torch, torch.distributed as dist
from areal_like.net.distributed import init_weight_group
port, name, timeout_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
world = int(sys.argv[4]) if len(sys.argv) > 4 else 2  # of 3: it joins only (no broadcast)
try:
    pg = init_weight_group("gloo", "127.0.0.1", port, world, 1, name, timeout_s=timeout_s,
                           key=os.environ["AREAL_LIKE_ENGINE_API_KEY"])
except Exception as e:
    print("refused", type(e).__name__, flush=True)
    sys.exit(0)
t = torch.zeros(4)
if world == 2:
    dist.broadcast(t, src=0, group=pg)
print("joined", t.tolist(), flush=True)
"""

LISTER = (r"""
import sys
from datetime import timedelta
from torch.distributed import TCPStore
try:  # what a stranger does first: list the store's keys, whose prefix is the group's secret name
    store = TCPStore("127.0.0.1", int(sys.argv[1]), 2, False, """
                     r"""timedelta(seconds=float(sys.argv[2])), use_libuv=True)
    print("listed", store.list_keys(), flush=True)
except Exception as e:
    print("refused", type(e).__name__, flush=True)
""")

RAW = r"""
import socket, sys, time
deadline = time.monotonic() + 60
while True:  # rank 0's thread may not listen yet on a loaded machine
    try:
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=60)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
if sys.argv[2] == "garbage":
    s.sendall(b"\xff" * 4096)
print("connected", flush=True)
time.sleep(3600)  # hold the connection until the test stops this process
"""


def other_ipv4() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def host_rank0(port: int, tensor: torch.Tensor, result: dict) -> threading.Thread:
    """Rank 0 of a group of two in a thread: join, broadcast tensor; result: pg or error."""
    def rank0() -> None:
        try:
            pg = init_weight_group("gloo", "127.0.0.1", port, 2, 0, SECRET_NAME,
                                   timeout_s=CONNECT_S, connect_timeout_s=CONNECT_S, key=KEY)
            torch.distributed.broadcast(tensor, src=0, group=pg)
            result["pg"] = pg
        except Exception as e:  # reported by the caller's assertions
            result["error"] = e

    host = threading.Thread(target=rank0, daemon=True)
    host.start()
    return host


def test_only_the_named_members_join_and_strangers_cannot_stall_it(spawn_python):
    port = free_port()
    result: dict = {}
    host = host_rank0(port, torch.arange(4, dtype=torch.float32), result)
    strangers = [spawn_python(RAW, [port, kind]) for kind in ("idle", "garbage")]
    for proc in strangers:  # the store is up (they connected) before anyone real joins
        assert proc.stdout.readline().strip() == "connected", proc.stderr.read()
    guesser = spawn_python(MEMBER, [port, "areal_like_weights", STRANGER_S], env=JOB)
    # another job's member: knows the secret name (its plan was relayed), holds another key
    other_job = spawn_python(MEMBER, [port, SECRET_NAME, STRANGER_S],
                             env={ENGINE_KEY_ENV: secrets.token_hex(16)})
    lister = spawn_python(LISTER, [port, STRANGER_S])
    if (address := other_ipv4()) is not None:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=10).close()
    out, err = other_job.communicate(timeout=STRANGER_S + 60)
    assert out.strip().startswith("refused"), (out, err[-2000:])
    member = spawn_python(MEMBER, [port, SECRET_NAME, CONNECT_S], env=JOB)
    out, err = member.communicate(timeout=CONNECT_S + 60)
    assert out.strip() == "joined [0.0, 1.0, 2.0, 3.0]", err[-2000:]
    host.join(timeout=CONNECT_S)
    assert "error" not in result and "pg" in result, result
    out, err = guesser.communicate(timeout=STRANGER_S + 60)
    assert out.strip().startswith("refused"), (out, err[-2000:])
    out, err = lister.communicate(timeout=STRANGER_S + 60)
    assert out.strip().startswith("refused") and SECRET_NAME not in out + err, (out, err[-2000:])
    destroy_weight_group(result["pg"])


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_without_the_jobs_key_hosts_no_group_and_joins_none(rank):
    """Without the engine key rank 0 or a member fails at once, naming the key's source."""
    port = free_port()
    with pytest.raises(SecurityError) as refused:
        init_weight_group("gloo", "127.0.0.1", port, 2, rank, SECRET_NAME, timeout_s=5.0, key=None)
    assert ENGINE_KEY_ENV in str(refused.value) and str(KEY_FILE) in str(refused.value)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()


class _Lost(RuntimeError):
    pass


def test_rank0_gives_up_on_a_rendezvous_when_its_check_raises_and_the_joined_member_fails_at_once(
        spawn_python, capfd, caplog):
    """Rank 0's check raising fails rank 0 and the joined rank 1 at once; no C++ stack."""
    caplog.set_level(logging.DEBUG, logger="areal_like.net.distributed")
    port = free_port()
    member = spawn_python(MEMBER, [port, SECRET_NAME, CONNECT_S, 3], env=JOB)
    result: dict = {}

    def check() -> None:
        # the store has answered rank 1: it is in
        if (gate := GATES.get(port)) is not None and gate.answered:
            raise _Lost("rank 2 lost")

    def rank0() -> None:
        try:
            result["pg"] = init_weight_group("gloo", "127.0.0.1", port, 3, 0, SECRET_NAME,
                                             timeout_s=CONNECT_S, connect_timeout_s=CONNECT_S,
                                             check=check, check_every_s=0.2, key=KEY)
        except Exception as e:
            result["error"] = e

    host = threading.Thread(target=rank0, daemon=True)
    host.start()
    out, err = member.communicate(timeout=CONNECT_S / 2)  # well before its own join would time out
    host.join(timeout=CONNECT_S / 2)
    assert not host.is_alive() and isinstance(result.get("error"), _Lost), result
    assert out.strip().startswith("refused"), (out, err[-2000:])
    with pytest.raises(ConnectionRefusedError):  # the store is closed
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    written = capfd.readouterr().err
    assert "frame #" not in written and "recvValue" not in written, written[-3000:]
    assert "frame #0: " in caplog.text and "recvValue" in caplog.text


SGLANG_STYLE = (r"""
import sys, torch, torch.distributed as dist
from datetime import timedelta
from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper,
                                                _world, rendezvous)
door_port, name, timeout_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
t = timedelta(seconds=timeout_s)  # torch's own tcp:// rendezvous and group, as SGLang's """
    r"""init_custom_process_group makes them
raw, rank, world = next(rendezvous(f"tcp://127.0.0.1:{door_port}", 1, 2, timeout=t))
pg, _ = _new_process_group_helper(world, rank, [], Backend("gloo"), PrefixStore(name, raw),
                                  group_name=name, timeout=t)
_world.pg_group_ranks[pg] = {i: i for i in range(world)}
x = torch.zeros(3)
dist.broadcast(x, src=0, group=pg)
print("joined", x.tolist(), flush=True)
""")


def test_an_engine_joins_through_its_servers_door_and_the_door_admits_this_user_only(spawn_python):
    port = free_port()
    result: dict = {}
    # what the rollout server opens for its SGLang engine
    door = StoreDoor("127.0.0.1", port, SECRET_NAME, key=KEY)
    host = host_rank0(port, torch.tensor([7.0, 8.0, 9.0]), result)
    try:
        if os.geteuid() == 0:  # another user on the engine's node: the door closes on it unanswered
            other = spawn_python(OTHER_USER, [door.port])
            out, err = other.communicate(timeout=CONNECT_S)
            assert out.strip() == "closed b''" and door.refused == 1, (out, err[-2000:])
        engine = spawn_python(SGLANG_STYLE, [door.port, SECRET_NAME, CONNECT_S])
        out, err = engine.communicate(timeout=CONNECT_S + 60)
        assert out.strip() == "joined [7.0, 8.0, 9.0]", err[-2000:]
        host.join(timeout=CONNECT_S)
        assert "pg" in result, result
        destroy_weight_group(result["pg"])
    finally:
        door.close()


OTHER_USER = r"""
import encodings.idna, os, socket, sys  # idna: imported while the files are still readable
os.setgid(65534); os.setuid(65534)  # nobody
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
s.sendall(b"anything")
try:
    got = s.recv(100)
except ConnectionResetError:  # closed with our bytes unread
    got = b""
print("closed", got, flush=True)
"""

