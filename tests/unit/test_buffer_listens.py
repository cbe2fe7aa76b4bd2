"""The buffer's start line names the address it binds and, when another, the one clients use."""

from __future__ import annotations

import logging

from areal_like.net.auth import BIND_HOST_ENV
from areal_like.net.distributed import free_port
from areal_like.net.transport import listening_on
from areal_like.settings.config import BufferConfig, RunConfig
from buffer.service import BufferService

TEST_NET = "192.0.2.1"  # TEST-NET-1: an address clients are told, never one of this machine's


def test_the_start_line_names_the_bound_address_and_the_one_clients_are_told(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(BIND_HOST_ENV, "127.0.0.1")  # what the launcher sets (0.0.0.0 on Slurm)
    router, pub = free_port(), free_port()
    buf = BufferConfig(address=f"tcp://{TEST_NET}:{router}", pub_address=f"tcp://{TEST_NET}:{pub}")
    svc = BufferService.from_run(RunConfig(run_dir=str(tmp_path / "run"), buffer=buf))
    try:
        with caplog.at_level(logging.INFO, logger="buffer"):
            svc.start()
    finally:
        svc.stop()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("listening"))
    assert line.startswith(
        f"listening on tcp://127.0.0.1:{router} (clients connect to tcp://{TEST_NET}:{router}), "
        f"pub tcp://127.0.0.1:{pub} (clients connect to tcp://{TEST_NET}:{pub}); "), line


def test_an_address_bound_as_given_is_named_once(monkeypatch):
    monkeypatch.delenv(BIND_HOST_ENV, raising=False)
    assert listening_on("tcp://*:5555") == "tcp://*:5555"
    assert listening_on("tcp://10.77.0.1:5555") == (
        "tcp://*:5555 (clients connect to tcp://10.77.0.1:5555)")
    assert listening_on("ipc:///run/sock/router") == "ipc:///run/sock/router"
