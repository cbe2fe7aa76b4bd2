"""Path disk against the push's deadline (trainer/weight_sync.py, trainer/weight_local.py): a
plan's deadline is what is left when the plan goes out, after its sender wrote the payloads (a
whole HF directory), so the members never wait past the trainer's deadline; and a re-push to the
survivors of a lost member sends the directory already written instead of writing it again."""

from __future__ import annotations

import json
import time

import torch

from areal_like.net.metrics import Metrics
from areal_like.settings.config import WeightSyncConfig
from areal_like.wire import protocol as P
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
    assert arrived + plan.deadline_s <= t0 + cfg.deadline_s + 0.2, (plan.deadline_s, arrived - t0)


class _Counting:
    def __init__(self):
        self.writes = 0

    def save_pretrained(self, path: str) -> None:
        self.writes += 1
        with open(f"{path}/config.json", "w") as f:
            json.dump({}, f)


class _LosesOne(_Buffer):
    """Members a and b; after the first plan a leaves the roster and b reports failure (the
    group-less paths re-push too); b loads the second plan."""

    def request(self, msg, timeout_s=None):
        n = len(self.plans)
        if isinstance(msg, P.RosterRequest):
            ids = ["a", "b"] if n == 0 else ["b"]
            members = [P.RosterEntry(server_id=s, engine_url="", engine_ranks=1, policy_version=0)
                       for s in ids]
            return P.Roster(members=members, policy_version=0)
        if isinstance(msg, P.SyncStatusRequest):
            return P.SyncStatus(policy_version=msg.policy_version, done=["b"] if n == 2 else [],
                                failed=["b"] if n == 1 else [])
        return super().request(msg, timeout_s)


def test_a_re_push_on_the_disk_path_sends_the_directory_it_wrote():
    cfg = WeightSyncConfig(path="disk", deadline_s=20.0)
    wb = WeightBroadcaster(cfg, buffer_address="tcp://127.0.0.1:9", rank=0,
                           device=torch.device("cpu"))
    wb.client.close()
    wb.client = buffer = _LosesOne()
    model = torch.nn.Linear(2, 2)
    model.config = _Counting()
    try:
        report = wb.push(model, 1)
    finally:
        wb.client = None
        wb.close()
    assert report.done == ["b"] and report.repushed == ["b"], report
    first, again = (plan for plan, _ in buffer.plans)
    assert [m.server_id for m in again.members] == ["b"]
    assert again.payloads == first.payloads and model.config.writes == 1


class _FrozenFirst(_Buffer):
    """Member a never reports v1 (an engine frozen during it) and loads v2 at once."""

    def request(self, msg, timeout_s=None):
        if isinstance(msg, P.SyncStatusRequest) and msg.policy_version == 1:
            return P.SyncStatus(policy_version=1, done=[], failed=[])
        return super().request(msg, timeout_s)


def test_a_push_cut_at_its_deadline_is_counted_for_its_alert():
    """Alert WeightSyncOverDeadline read the gauge of the last sync's seconds, which the next step
    overwrites (a step of a small model takes less than a scrape interval): a sync cut at its
    deadline was mostly never scraped. Each push that took 90% of its deadline or more (one that
    was cut at it: 59.9 s of 60 s measured with an engine frozen) is counted when it ends."""
    cfg = WeightSyncConfig(path="disk", deadline_s=1.0)
    metrics = Metrics()
    wb = WeightBroadcaster(cfg, buffer_address="tcp://127.0.0.1:9", rank=0,
                           device=torch.device("cpu"), metrics=metrics)
    wb.client.close()
    wb.client = _FrozenFirst()
    model = torch.nn.Linear(2, 2)
    model.config = _Counting()
    near = "areal_trainer_weight_sync_near_deadline_total"
    try:
        assert metrics.registry.get_sample_value(near) == 0  # served before any push
        cut, fast = wb.push(model, 1), wb.push(model, 2)
    finally:
        wb.client = None
        wb.close()
    assert cut.dropped == ["a"] and fast.done == ["a"], (cut, fast)
    assert cut.seconds >= 0.9 * cfg.deadline_s > fast.seconds
    assert metrics.registry.get_sample_value(near) == 1


class _Scripted(_Buffer):
    """Member a reports each plan as ``answers`` says, in order: "none" (never: frozen past the
    deadline), "done" or "failed" (at once)."""

    def __init__(self, answers: list[str]):
        super().__init__()
        self.answers = answers

    def request(self, msg, timeout_s=None):
        if isinstance(msg, P.SyncStatusRequest):
            answer = self.answers[len(self.plans) - 1]
            return P.SyncStatus(policy_version=msg.policy_version,
                                done=["a"] if answer == "done" else [],
                                failed=["a"] if answer == "failed" else [])
        return super().request(msg, timeout_s)


def test_re_pushes_that_can_never_meet_the_deadline_say_why_once_and_go_on(caplog):
    """A stall (no data, an engine behind) is answered by a re-push; when no push can finish
    within deadline_s (measured: 0.05 s on a quickstart job, each push cut in its rendezvous) the
    trainer re-pushed every few seconds forever, saying only that it re-pushes. The third re-push
    in a row cut at its deadline with no engine done logs one error naming the setting and the
    times, once per streak; the re-pushes go on (an outage of the engines looks the same, and
    ends). One that an engine loads, or that failed at once (a fault), starts the count again."""
    from trainer.engine_lag import STALL_PUSHES, EngineSchedule

    cfg = WeightSyncConfig(path="disk", deadline_s=0.3)
    wb = WeightBroadcaster(cfg, buffer_address="tcp://127.0.0.1:9", rank=0,
                           device=torch.device("cpu"))
    wb.client.close()
    wb.client = buffer = _Scripted(["none", "none", "done", "none", "failed", "none", "none",
                                    "none", "none"])
    model = torch.nn.Linear(2, 2)
    model.config = _Counting()
    engines = EngineSchedule(cfg, wb, model, final_version=10)

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]

    try:
        for _ in range(5):  # two cut, one loaded, one cut, one failed at once
            engines.repush(1)
        for _ in range(STALL_PUSHES - 1):
            assert engines.repush(1).dropped == ["a"]
        assert errors() == []
        engines.repush(1)
        assert len(errors()) == 1
        assert engines.repush(1).dropped == ["a"]  # still re-pushing, not said again
    finally:
        wb.client = None
        wb.close()
    assert len(buffer.plans) == 9  # one plan a re-push
    (why,) = errors()
    assert why.startswith("weight sync: 3 pushes of version 1 in a row ran into "
                          "trainer.weight_sync.deadline_s=0.3 ("), why
    assert why.endswith(" s) and no engine loaded it (a dropped), so the data the trainer waits "
                        "for cannot come: raise trainer.weight_sync.deadline_s above what a push "
                        "takes here (or the engines are unreachable); re-pushing on"), why
