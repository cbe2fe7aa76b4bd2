"""``free_port`` hands out ports a later bind to port 0 cannot take."""

from __future__ import annotations

import socket

import pytest

from areal_like.net.distributed import free_port

FIXED_LOW = 10000  # free_port's ports come from [FIXED_LOW, the kernel's ephemeral range)


def ephemeral_low() -> int | None:
    """The lowest port the kernel hands to a bind on port 0 (Linux), else None."""
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def test_ports_are_below_the_ephemeral_range_distinct_and_free():
    low = ephemeral_low()
    if low is None or low - FIXED_LOW < 1000:
        pytest.skip("no room below this kernel's ephemeral port range")
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(FIXED_LOW <= p < low for p in ports), ports
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))  # it really is free


def test_binds_to_port_zero_never_get_a_handed_out_port():
    if ephemeral_low() is None:
        pytest.skip("not Linux")
    handed = {free_port() for _ in range(20)}
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(200)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        assert not handed & {s.getsockname()[1] for s in socks}
    finally:
        for s in socks:
            s.close()


class _RepeatingKernel:
    """A kernel that hands a just-closed port out again on a bind to port 0; others are taken."""

    PORTS: list[int] = []

    def __init__(self, *args):
        self.port = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, addr):
        if addr[1]:
            raise OSError(98, "Address already in use")
        self.port = self.PORTS.pop(0)

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_the_port_zero_fallback_never_hands_a_port_out_twice(monkeypatch):
    # above any range free_port picks from itself (< 32768 on Linux): none handed out before
    _RepeatingKernel.PORTS = [61000, 61000, 61001]
    monkeypatch.setattr(socket, "socket", _RepeatingKernel)
    assert [free_port(), free_port()] == [61000, 61001]
    assert _RepeatingKernel.PORTS == []
