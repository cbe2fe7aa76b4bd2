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

