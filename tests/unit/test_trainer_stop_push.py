"""A trainer told to stop while a weight push waits on the members' reports stops waiting at once
(trainer/loop.py ``Trainer.request_stop``): its launcher killed -9, every daemon gets SIGTERM, the
buffer is gone in a second, and run() waits for the push in flight before it can stop; it waited
out the push's ``deadline_s`` (60 s, holding job.lock) polling the dead buffer."""

from __future__ import annotations

import json
import threading

import torch

from areal_like.settings.config import WeightSyncConfig, load_config
from areal_like.wire import protocol as P
from trainer.loop import Trainer
from trainer.weight_sync import WeightBroadcaster

DEADLINE_S = 60.0  # the push's own deadline: what a stop must not wait out
STOP_S = 10.0  # the push ends this soon after the stop request


class _Silent:
    """One member, a plan acknowledged, and never a report from it (the buffer gone mid-push)."""

    def __init__(self):
        self.polled = threading.Event()

    def request(self, msg, timeout_s=None):
        if isinstance(msg, P.RosterRequest):
            entry = P.RosterEntry(server_id="a", engine_url="", engine_ranks=1, policy_version=0)
            return P.Roster(members=[entry], policy_version=0)
        if isinstance(msg, P.SyncStatusRequest):
            self.polled.set()
            return P.SyncStatus(policy_version=msg.policy_version, done=[], failed=[])
        return P.Ack(ref=str(getattr(msg, "policy_version", "")), status="ok")


class _Config:
    def save_pretrained(self, path: str) -> None:
        with open(f"{path}/config.json", "w") as f:
            json.dump({}, f)


def test_a_stop_request_ends_a_push_waiting_on_the_members(tmp_path):
    trainer = Trainer.from_run(load_config([f"run_dir={tmp_path}"]))
    wb = WeightBroadcaster(WeightSyncConfig(path="disk", deadline_s=DEADLINE_S),
                           buffer_address="tcp://127.0.0.1:9", rank=0, device=torch.device("cpu"))
    wb.client.close()
    wb.client = buffer = _Silent()
    trainer.broadcaster = wb
    model = torch.nn.Linear(2, 2)
    model.config = _Config()
    reports = []
    push = threading.Thread(target=lambda: reports.append(wb.push(model, 1)), daemon=True)
    push.start()
    try:
        assert buffer.polled.wait(DEADLINE_S / 2)
        trainer.request_stop()
        push.join(STOP_S)
        assert not push.is_alive(), "the push waited on the members after the stop request"
    finally:
        wb.stopping.set()
        push.join()
        wb.client = None
        wb.close()
    assert reports[0].dropped == ["a"]
