"""``free_port`` hands out ports a later bind to port 0 cannot take (a collision seen on a loaded CI
run: the buffer's publisher, bound to port 0, got the metrics port picked for a rollout server)."""

from __future__ import annotations

import socket

import pytest

from areal_like.net import distributed
from areal_like.net.distributed import free_port


def test_ports_are_below_the_ephemeral_range_distinct_and_free():
    low = distributed._ephemeral_low()
    if low is None or low - distributed._FIXED_LOW < 1000:
        pytest.skip("no room below this kernel's ephemeral port range")
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(distributed._FIXED_LOW <= p < low for p in ports), ports
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))  # it really is free


def test_binds_to_port_zero_never_get_a_handed_out_port():
    if distributed._ephemeral_low() is None:
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
    """A socket whose bind to port 0 gets the ports in ``PORTS`` in turn: a kernel that hands a
    just-closed port out again (it may, off Linux or in a narrow range)."""

    PORTS: list[int] = []

    def __init__(self, *args):
        self.port = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, addr):
        self.port = addr[1] or self.PORTS.pop(0)

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_the_port_zero_fallback_never_hands_a_port_out_twice(monkeypatch):
    monkeypatch.setattr(distributed, "_ephemeral_low", lambda: None)  # off Linux: the fallback
    monkeypatch.setattr(distributed, "_HANDED", set())
    monkeypatch.setattr(distributed.socket, "socket", _RepeatingKernel)
    _RepeatingKernel.PORTS = [41000, 41000, 41001]
    assert [free_port(), free_port()] == [41000, 41001]
    assert distributed._HANDED == {41000, 41001}
