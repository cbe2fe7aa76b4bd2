"""A stop request ends a trainer's waits on gone members and buffers (Trainer.request_stop)."""

from __future__ import annotations

import socket
import threading

import torch
from test_weight_plan_deadline import CountingConfig, broadcaster

from areal_like.net.distributed import free_port
from areal_like.net.transport import Server
from areal_like.settings.config import WeightSyncConfig, load_config
from areal_like.wire import protocol as P
from trainer.data import BatchSource
from trainer.engine_drive import EngineDrive
from trainer.loop import Trainer
from trainer.weight_sync import WeightBroadcaster

DEADLINE_S = 60.0  # the push's own deadline: what a stop must not wait out
STOP_S = 10.0  # the push ends this soon after the stop request


def test_a_stop_request_ends_a_push_waiting_on_the_members(tmp_path):
    trainer = Trainer.from_run(load_config([f"run_dir={tmp_path}"]))
    frozen = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    trainer.broadcaster = wb = broadcaster(WeightSyncConfig(path="disk", deadline_s=DEADLINE_S),
                                           {"a": f"http://127.0.0.1:{frozen.getsockname()[1]}"},
                                           EngineDrive())
    model = torch.nn.Linear(2, 2)
    model.config = CountingConfig()
    reports = []
    push = threading.Thread(target=lambda: reports.append(wb.push(model, 1)), daemon=True)
    push.start()
    frozen.settimeout(DEADLINE_S / 2)
    try:
        called, _ = frozen.accept()  # the sync of a is under way
        with called:
            request = b""
            while b"\r\n" not in request and (chunk := called.recv(4096)):
                request += chunk
            assert request.startswith(b"POST /begin"), request
            trainer.request_stop()
            push.join(STOP_S)
            assert not push.is_alive(), "the push waited on the members after the stop request"
    finally:
        wb.stopping.set()
        push.join()
        wb.client = None
        wb.close()
        frozen.close()
    assert reports[0].dropped == ["a"] and reports[0].done == []


def test_a_stop_request_ends_the_version_announce_waiting_on_a_gone_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr("trainer.weight_sync.BUFFER_REQUEST_TIMEOUT_S", DEADLINE_S)
    address = f"tcp://127.0.0.1:{free_port()}"
    gone = Server(address)  # binds; never replies
    trainer = Trainer.from_run(load_config([f"run_dir={tmp_path}"]))
    wb = WeightBroadcaster(WeightSyncConfig(path="disk", deadline_s=DEADLINE_S),
                           buffer_address=address, rank=0, device=torch.device("cpu"))
    trainer.broadcaster = wb
    reports = []
    announce = threading.Thread(target=lambda: reports.append(wb.announce(1)), daemon=True)
    try:
        _ends_on_stop(gone, announce, P.VersionUpdate, trainer.request_stop)
    finally:
        wb.stopping.set()
        announce.join()
        wb.close()
        gone.close()
    assert "stopped waiting" in reports[0].error, reports[0].error


def test_a_stop_request_ends_the_batch_request_waiting_on_a_gone_buffer():
    address = f"tcp://127.0.0.1:{free_port()}"
    gone = Server(address)  # binds; never replies
    stop = threading.Event()
    source = BatchSource(address, 2, wait_s=DEADLINE_S, buffer_timeout_s=DEADLINE_S, rank=0,
                         should_stop=stop.is_set)
    batches = []
    wait = threading.Thread(target=lambda: batches.append(source.next_batch(0)), daemon=True)
    try:
        _ends_on_stop(gone, wait, P.BatchRequest, stop.set)
    finally:
        stop.set()
        wait.join()
        source.client.close()
        gone.close()
    assert batches == [None]


def _ends_on_stop(gone, waiting: threading.Thread, request: type, stop) -> None:
    """waiting sends request to gone (never answers); stop() must end it within STOP_S."""
    waiting.start()
    got = gone.recv(DEADLINE_S / 2)
    assert got is not None and isinstance(got[2], request)  # in flight
    stop()
    waiting.join(STOP_S)
    assert not waiting.is_alive(), f"the {request.__name__} waited on the gone buffer past the stop"
