"""Server.wake_on: a background thread (the WAL's fsync thread) ends the wait for requests."""

from __future__ import annotations

import os
import select
import threading
import time

import pytest

from areal_like.net.dealer import Client
from areal_like.net.distributed import free_port
from areal_like.net.transport import Server
from areal_like.wire import protocol as P
from buffer.wal import WriteAheadLog

pytestmark = pytest.mark.skipif(not hasattr(os, "eventfd"), reason="eventfd is Linux-only")

LONG_WAIT_S = 30.0  # a wait the wake-up must cut short


def test_a_readable_descriptor_ends_the_wait_and_requests_still_arrive():
    server = Server(f"tcp://127.0.0.1:{free_port()}")
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        server.wake_on(fd)
        threading.Timer(0.2, os.eventfd_write, (fd, 1)).start()
        t0 = time.monotonic()
        assert server.recv(LONG_WAIT_S) is None  # woken, no request
        assert time.monotonic() - t0 < LONG_WAIT_S / 2
        os.eventfd_read(fd)  # drained: the next wait is a real one
        client, replies = Client(server.address, timeout_s=LONG_WAIT_S), []
        asker = threading.Thread(target=lambda: replies.append(client.request(P.StatsRequest())))
        asker.start()
        got = server.recv(LONG_WAIT_S)
        assert got is not None and isinstance(got[2], P.StatsRequest)
        server.send(got[0], got[1], P.Stats(values={"n": 1}))
        asker.join(LONG_WAIT_S)
        client.close()
        assert replies and replies[0].values == {"n": 1}
    finally:
        server.close()
        os.close(fd)


def test_the_wal_signals_each_durable_ticket(tmp_path):
    wal = WriteAheadLog(tmp_path)  # fsync=always: the fsync thread signals
    list(wal.replay())
    wal.open({})
    try:
        wal.clear_wakeup()
        assert select.select([wal.wakeup_fd], [], [], 0)[0] == []
        wal.append_group("a", b"frame")
        ticket = wal.request_sync()
        assert select.select([wal.wakeup_fd], [], [], LONG_WAIT_S)[0] == [wal.wakeup_fd]
        assert wal.durable() >= ticket
        wal.clear_wakeup()
        assert select.select([wal.wakeup_fd], [], [], 0)[0] == []
    finally:
        wal.close()
    assert wal.wakeup_fd is None  # closed with the log
