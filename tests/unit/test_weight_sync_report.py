"""Which report a step's record gets (trainer/WEIGHT_SYNC.md "Overlap"): an overlapped push
returns the previous push's report; a blocking push in between (the resync on a data stall)
must not take the place of a report no record has carried yet; and each push's deadline counts
from when it starts its own work."""

from __future__ import annotations

import time

import torch

from areal_like.settings.config import WeightSyncConfig
from areal_like.wire import protocol as P
from trainer.engine_lag import EngineSchedule
from trainer.weight_sync import SyncReport, WeightBroadcaster

DEADLINE_S = 2.0


class _Buffer:
    def request(self, msg, timeout_s=None):
        if isinstance(msg, P.RosterRequest):
            entry = P.RosterEntry(server_id="a", engine_url="", engine_ranks=1, policy_version=0)
            return P.Roster(members=[entry], policy_version=0)
        return P.Ack(ref="", status="ok")


class _Scripted(WeightBroadcaster):
    """The real push, background finish and hand-off of reports; each attempt's members scripted
    (``dropped`` in order), so no group forms."""

    def __init__(self, dropped: list[list[str]]):
        super().__init__(WeightSyncConfig(), buffer_address="tcp://127.0.0.1:9", rank=0,
                         device=torch.device("cpu"))
        self.client.close()
        self.client, self.script = _Buffer(), dropped

    def _attempt(self, params, buckets, report: SyncReport, deadline, *, alone, only=None):
        report.dropped = self.script.pop(0)
        report.error = "TimeoutError: deadline" if report.dropped else ""
        self.sender.skip()
        return set()


def test_a_resync_after_a_failed_overlapped_push_leaves_its_report_to_the_next_record():
    wb = _Scripted([[], ["a"], [], []])
    engines = EngineSchedule(WeightSyncConfig(), wb, torch.nn.Linear(4, 4), final_version=10)
    try:
        engines.after_step(0)  # the setup push, blocking
        assert engines.after_step(1, wait=False).version == 0  # v1 goes on in the background
        engines.repush(1)  # no data for v1: pushed again, blocking, and it lands
        record = engines.after_step(2, wait=False)  # what step 2's record carries
    finally:
        wb.client = None
        wb.close()
    assert (record.version, record.dropped) == (1, ["a"]), record
    assert record.error


class _Timed(_Scripted):
    """v1's members take the whole deadline; each attempt notes the time it had left."""

    def __init__(self):
        super().__init__([["a"], []])
        self.left: dict[int, float] = {}

    def _attempt(self, params, buckets, report: SyncReport, deadline, *, alone, only=None):
        self.left[report.version] = deadline - time.monotonic()
        if report.version == 1:
            time.sleep(max(0.0, deadline - time.monotonic()))  # an engine frozen past it
        return super()._attempt(params, buckets, report, deadline, alone=alone, only=only)


def test_an_overlapped_push_gets_its_whole_deadline_after_waiting_for_the_one_before():
    """The next push's deadline counted from before it waited for the overlapped push still
    running: after one push ran out its deadline the next one had none left, and every member,
    the healthy ones too, was dropped from that version as well."""
    wb = _Timed()
    wb.cfg = WeightSyncConfig(deadline_s=DEADLINE_S)
    model = torch.nn.Linear(4, 4)
    try:
        wb.push(model, 1, wait=False)
        wb.push(model, 2, wait=False)
        wb.join()
    finally:
        wb.client = None
        wb.close()
    assert wb.left[2] > DEADLINE_S / 2, wb.left
