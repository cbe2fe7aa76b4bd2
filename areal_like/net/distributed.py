"""The weight-update process group between trainer rank 0 and the engines' ranks, built as SGLang
and verl build it (a TCP rendezvous, a PrefixStore named after the group,
``_new_process_group_helper``), since the engines are not in the trainer's world. Why each NCCL
setting: trainer/WEIGHT_SYNC.md; who can join: areal_like/SECURITY.md ("Ports").

Invariants: every wait is bounded (the rendezvous and the ranks' connection by
``connect_timeout_s``, every later op by ``timeout_s``); rank 0 hosts the store on loopback behind
a ``StoreGate`` on ``master_addr`` and members join through a ``StoreDoor``; rank 0 can abandon a
rendezvous (``check`` raised): closing the store server fails every join at once (torch's C++ log
of its own join's failure, a 20-line stack, goes to DEBUG: the caller says why); the store
server and gate live as long as the group (``destroy_weight_group``); an NCCL group is
non-blocking with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` while it is built, so a dead engine
aborts that group, never the trainer (``set_nccl_nonblocking_timeout`` before the first NCCL
call bounds the lazy communicator's creation).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta

from areal_like.net.store_gate import StoreDoor, StoreGate, listen_on

# after an abort: how long rank 0 waits for its own join to fail (it does at once)
ABANDON_JOIN_S = 5.0
# what torch's C++ code writes to fd 2: its log lines ([W1126 13:12:51.895 TCPStore.cpp:138] ...)
# and the stack under an error's message
_CPP_LINE = re.compile(r"(\[rank\d+\]:)?\[[IWE]\d{4} |Exception raised from .*\(most recent call "
                       r"first\):$|frame #\d+: |<omitting python frames>$|\s*$")
log = logging.getLogger(__name__)
_HOSTED: dict = {}  # group -> rank 0's store and gate, or a member's door (closed with the group)


# not the global generator: seeded alike, two ranks would pick alike
_RANDOM = random.SystemRandom()
_HANDED: set[int] = set()  # ports this process has handed out: never the same one twice
_FIXED_LOW = 10000  # free_port's ports come from [_FIXED_LOW, the kernel's ephemeral range)


def _ephemeral_low() -> int | None:
    """The lowest port the kernel hands to a bind on port 0 (Linux), else None."""
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a process to bind later: at random below the kernel's
    ephemeral range (where a bind to port 0 elsewhere cannot take it meanwhile), never twice."""
    low = _ephemeral_low()
    if low is not None and low - _FIXED_LOW >= 1000:
        for _ in range(200):
            port = _RANDOM.randrange(_FIXED_LOW, low)
            if port in _HANDED:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _HANDED.add(port)
            return port
    for _ in range(200):  # off Linux, a narrow range, or no luck: the kernel's pick, once only
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _HANDED:
            _HANDED.add(port)
            return port
    raise OSError(f"free_port: every port the kernel offered on {host} was handed out already")


def init_weight_group(backend: str, master_addr: str, master_port: int, world_size: int, rank: int,
                      group_name: str, timeout_s: float, connect_timeout_s: float | None = None,
                      check: Callable[[], None] | None = None, check_every_s: float = 0.5, *,
                      key: str):
    """Join (rank 0: host) the named group, its store's gate and doors proving ``key`` (the job's
    engine API key; none: SecurityError, ``store_gate.need_key``). Raises on timeout (a missing
    peer never hangs us), and on rank 0 whatever ``check`` raised (the rendezvous is then
    abandoned and its store closed)."""
    timeout = timedelta(seconds=timeout_s)
    connect = timedelta(seconds=connect_timeout_s if connect_timeout_s is not None else timeout_s)
    if rank == 0:
        return _host_group(backend, master_addr, master_port, world_size, group_name, timeout,
                           connect, check, check_every_s, key)
    from torch.distributed.distributed_c10d import rendezvous

    # answers rank 0's gate for our store client
    door = StoreDoor(master_addr, master_port, group_name, key=key)
    try:
        # under torchrun a tcp:// rendezvous would otherwise connect to the elastic agent's store
        with _env({"TORCHELASTIC_USE_AGENT_STORE": "False"}):
            raw, rank, world_size = next(rendezvous(f"tcp://127.0.0.1:{door.port}", rank,
                                                    world_size, timeout=connect))
        pg = _build_group(backend, raw, master_addr, world_size, rank, group_name, timeout, connect)
    except BaseException:
        door.close()
        raise
    _HOSTED[pg] = door  # our store connection runs through it while the group lives
    return pg


def join_through_door(backend: str, door_port: int, world_size: int, rank: int, group_name: str,
                      timeout_s: float):
    """Join the named group as ``rank`` by torch's plain TCP rendezvous on loopback, through a
    door the engine's rollout server opened (an engine in its own process: vLLM's weight-transfer
    engine, rollout_server/vllm_gloo.py, as SGLang does); the group's bounds as
    ``init_weight_group``'s."""
    from torch.distributed.distributed_c10d import rendezvous

    timeout = timedelta(seconds=timeout_s)
    with _env({"TORCHELASTIC_USE_AGENT_STORE": "False"}):
        raw, rank, world_size = next(rendezvous(f"tcp://127.0.0.1:{door_port}", rank, world_size,
                                                timeout=timeout))
    return _build_group(backend, raw, "127.0.0.1", world_size, rank, group_name, timeout, timeout)


def _host_group(backend: str, master_addr: str, master_port: int, world_size: int, group_name: str,
                timeout: timedelta, connect: timedelta, check: Callable[[], None] | None,
                check_every_s: float, key: str):
    """Rank 0: serve the store and join through a client of it in a helper thread, running
    ``check`` meanwhile; if it raises, close the server (every join fails) and re-raise."""
    from torch.distributed import TCPStore

    # loopback only: members come through the gate
    server = host_store("127.0.0.1", 0, world_size, connect)
    try:
        gate = StoreGate(master_addr, master_port, group_name, server.port, store=server, key=key)
    except BaseException:
        del server
        raise
    result: dict = {}
    abandoned = threading.Event()

    def join() -> None:
        try:
            raw = TCPStore("127.0.0.1", server.port, world_size, False, connect, use_libuv=True)
            pg = _build_group(backend, raw, master_addr, world_size, 0, group_name, timeout,
                              connect)
        except Exception as e:
            result["error"] = e
            return
        # formed after all (an abort raced the last join): nobody will use it
        if abandoned.is_set():
            _destroy(pg)
        result["pg"] = pg

    helper = threading.Thread(target=join, name=f"weight-group-{group_name[-8:]}", daemon=True)
    helper.start()
    try:
        while helper.is_alive():
            helper.join(check_every_s)
            if helper.is_alive() and check is not None:
                check()
    except BaseException:
        abandoned.set()
        gate.close()  # cuts the members' store connections
        with _cpp_log_to_debug():  # our own join's failure: the caller logs why we abandoned
            del server  # closes the store: every join in progress (the members', our own) fails
            helper.join(ABANDON_JOIN_S)
        raise
    if "error" in result:
        gate.close()
        raise result["error"]
    _HOSTED[result["pg"]] = gate  # and through it the store server
    return result["pg"]


@contextmanager
def _cpp_log_to_debug():
    """fd 2 into a file for the block, then torch's C++ lines in it to DEBUG and the rest back to
    fd 2. The TCPStore client logs a failed receive (a store closed under it) as a warning with a
    20-line C++ stack, straight to fd 2: no Python logger or warning filter sees it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            cpp = [ln for ln in lines if _CPP_LINE.match(ln)]
            if cpp:
                log.debug("torch's log of the abandoned rendezvous:\n%s", "".join(cpp).rstrip())
            os.write(2, "".join(ln for ln in lines if not _CPP_LINE.match(ln)).encode())


def _build_group(backend: str, raw, master_addr: str, world_size: int, rank: int, group_name: str,
                 timeout: timedelta, connect: timedelta):
    """The group over a connected store client ``raw``: gloo connects the ranks now, NCCL at its
    first op."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
    )

    raw.set_timeout(connect)  # gloo connects the ranks through the store now
    store = PrefixStore(group_name, raw)
    nccl = Backend(backend) == Backend.NCCL
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"} if nccl else {}
    with _env(env), gloo_toward(None if nccl else master_addr):
        pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                          group_name=group_name,
                                          backend_options=_nccl_options(timeout) if nccl else None,
                                          timeout=timeout)
    raw.set_timeout(timeout)  # NCCL exchanges its unique id through the store at the first op
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def host_store(master_addr: str, master_port: int, world_size: int, timeout: timedelta):
    """Rank 0's rendezvous TCPStore server on ``master_addr`` only; it does not wait for the ranks
    (rank 0 can close it while they join)."""
    from torch.distributed import TCPStore

    sock = listen_on(master_addr, master_port)  # the store's server takes the descriptor over
    return TCPStore(master_addr, master_port, world_size, True, timeout, wait_for_workers=False,
                    master_listen_fd=sock.detach(), use_libuv=True)


def address_toward(address: str) -> str | None:
    """This node's address on the interface it reaches ``address`` through: ``address`` itself
    when it is local, else the one its route leaves by (None: not resolvable, or no route)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(address, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)  # UDP: looks the route up, sends nothing
            return s.getsockname()[0]
    except OSError:
        return None


def interface_toward(address: str) -> str | None:
    """The local interface this node reaches ``address`` through (None: not resolvable, or no
    route)."""
    local = address_toward(address)
    return None if local is None else interface_of(local)


def resolves_to_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to here is a loopback one (False: unresolvable)."""
    import ipaddress

    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)


def reachable_host(host: str, head: str | None) -> str:
    """Where a server that the job's other nodes must reach listens: ``host``, unless it names a
    loopback address here (a node's own host name that /etc/hosts maps to 127.0.1.1, as on many
    machines) while ``head``, the job's head node, is not loopback; then this node's address on
    its interface toward ``head`` (as ``gloo_toward`` picks for gloo). The any-address stays."""
    if not head or host in ("", "0.0.0.0", "::") or resolves_to_loopback(head):
        return host
    if not resolves_to_loopback(host):
        return host
    return address_toward(head) or host


@contextmanager
def gloo_toward(address: str | None):
    """For the block, gloo groups made here listen on, and tell their peers, the interface this
    node reaches ``address`` (the rendezvous' host) through. Left to itself gloo takes the address
    the host's name resolves to, which on many machines (``127.0.1.1 host`` in /etc/hosts, a
    container's ``127.0.0.1 host``) is loopback: ranks on other nodes are then told to connect to
    their own loopback and the group never forms. A GLOO_SOCKET_IFNAME the user set wins; gloo
    reads it when a group is made."""
    iface = (interface_toward(address) if address and "GLOO_SOCKET_IFNAME" not in os.environ
             else None)
    with _env({"GLOO_SOCKET_IFNAME": iface} if iface else {}):
        yield


def interface_of(address: str) -> str | None:
    """The name of the local interface that holds ``address`` (None: not a local address)."""
    import psutil

    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(address, None)}
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] in wanted for a in addrs):
            return name
    return None


NCCL_NONBLOCKING_TIMEOUT = "TORCH_NCCL_NONBLOCKING_TIMEOUT"


def set_nccl_nonblocking_timeout(deadline_s: float) -> int:
    """Bound torch's wait for a non-blocking NCCL communicator by ``deadline_s`` (whole seconds,
    returned); before this process's first NCCL call, when torch reads it once."""
    seconds = max(1, math.ceil(deadline_s))
    os.environ[NCCL_NONBLOCKING_TIMEOUT] = str(seconds)
    return seconds


def _nccl_options(timeout: timedelta):
    from torch.distributed import ProcessGroupNCCL

    opts = ProcessGroupNCCL.Options()
    opts._timeout = timeout
    if hasattr(opts, "config") and hasattr(opts.config, "blocking"):  # NCCL >= 2.14
        opts.config.blocking = 0
    return opts


@contextmanager
def _env(values: dict[str, str]):
    """Set environment variables for the block, then restore what was there."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def destroy_weight_group(pg) -> None:
    if pg is not None:
        _destroy(pg)
        # rank 0: the store and its gate; a member: its door
        if (kept := _HOSTED.pop(pg, None)) is not None:
            kept.close()


def _destroy(pg) -> None:
    import torch.distributed as dist

    # a group broken by a dead peer may refuse a clean teardown
    with contextlib.suppress(Exception):
        dist.destroy_process_group(pg)
