"""A plan's deadline is what is left of the push's when the plan goes out (trainer/weight_sync.py):
the time its sender takes to make the payloads (path disk writes a whole HF directory) is spent
before, so the members never wait past the trainer's deadline."""

from __future__ import annotations

import json
import time

import torch

from areal_like import protocol as P
from areal_like.config import WeightSyncConfig
from trainer.weight_sync import WeightBroadcaster

WRITE_S = 0.6  # how long the stand-in model's directory takes to write


class _SlowConfig:
    def save_pretrained(self, path: str) -> None:
        time.sleep(WRITE_S)
        with open(f"{path}/config.json", "w") as f:
            json.dump({}, f)


class _Buffer:
    """Answers by message type; keeps each plan with the time it arrived."""

    def __init__(self):
        self.plans: list[tuple[P.WeightSyncPlan, float]] = []

    def request(self, msg, timeout_s=None):
        if isinstance(msg, P.RosterRequest):
            entry = P.RosterEntry(server_id="a", engine_url="", engine_ranks=1, policy_version=0)
            return P.Roster(members=[entry], policy_version=0)
        if isinstance(msg, P.WeightSyncPlan):
            self.plans.append((msg, time.monotonic()))
            return P.Ack(ref=str(msg.policy_version), status="ok")
        if isinstance(msg, P.SyncStatusRequest):
            return P.SyncStatus(policy_version=msg.policy_version, done=["a"], failed=[])
        return P.Ack(ref="", status="ok")


def test_the_plan_deadline_leaves_out_the_time_spent_making_the_payloads():
    cfg = WeightSyncConfig(path="disk", deadline_s=5.0)
    wb = WeightBroadcaster(cfg, buffer_address="tcp://127.0.0.1:9", rank=0,
                           device=torch.device("cpu"))
    wb.client.close()
    wb.client = buffer = _Buffer()
    model = torch.nn.Linear(2, 2)
    model.config = _SlowConfig()
    try:
        t0 = time.monotonic()
        report = wb.push(model, 1)
    finally:
        wb.client = None
        wb.close()
    assert report.done == ["a"], report
    (plan, arrived), = buffer.plans
    assert plan.path == "disk"
    # the members' deadline ends no later than the trainer's (t0 + deadline_s)
    assert arrived + plan.deadline_s <= t0 + cfg.deadline_s + 0.05, (plan.deadline_s, arrived - t0)
