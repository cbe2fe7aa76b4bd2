"""trainer/weight_members.py's re-push, rendezvous watch and first-server wait, scripted."""

from __future__ import annotations

import time

import pytest

from areal_like.wire import protocol as P
from trainer.weight_members import (
    REPUSH_MIN_S,
    MembersLost,
    RendezvousWatch,
    merge_repush,
    repush_targets,
)
from trainer.weight_sync import SyncReport


class ScriptedBuffer:

    def __init__(self, *replies: P.Message):
        self.replies, self.sent = list(replies), []

    def request(self, msg, timeout_s=None):
        self.sent.append(msg)
        return self.replies.pop(0)

    def close(self):
        pass


def _roster(*ids: str) -> P.Roster:
    return P.Roster(members=[P.RosterEntry(server_id=s, engine_url="", engine_ranks=1,
                                           policy_version=0)
                             for s in ids], policy_version=3)


def _report(members, done=()) -> SyncReport:
    r = SyncReport(version=4, members=list(members), done=list(done))
    r.dropped = sorted(set(members) - set(done))
    return r


def _later(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


@pytest.mark.parametrize("case, targets", [
    ("survivor", ["b"]),  # a died (gone from the roster), b failed with it, c had it already
    ("nobody_lost", []), ("nobody_dropped", []), ("no_time_left", []), ("no_survivor", [])])
def test_re_push_targets(case, targets):
    report = _report(["a", "b", "c"] if case == "survivor" else ["a", "b"],
                     done={"survivor": ["c"], "nobody_dropped": ["a", "b"]}.get(case, []))
    roster = {"survivor": _roster("b", "c"), "no_survivor": _roster()}.get(case, _roster("a", "b"))
    deadline = _later(REPUSH_MIN_S / 2) if case == "no_time_left" else _later()
    buffer = ScriptedBuffer(roster)
    assert repush_targets(buffer, report, set(), deadline) == targets
    if case in ("nobody_dropped", "no_time_left"):
        assert buffer.sent == []  # decided without asking the buffer


def test_merge_keeps_one_report_per_version():
    report = _report(["a", "b", "c"], done=["c"])
    report.error, report.bytes, report.loaded = "broadcast failed", 100, {"c": "first"}
    again = SyncReport(version=4, members=["b"], done=["b"], bytes=100, pause_s={"b": 0.2},
                       error="", plan_id="again", loaded={"b": "again"})
    merge_repush(report, again)
    assert (report.done, report.dropped, report.repushed) == (["b", "c"], ["a"], ["b"])
    assert report.loaded == {"b": "again", "c": "first"}  # each names the adapter it loaded (LoRA)
    assert (report.bytes == 200 and report.pause_s == {"b": 0.2}
            and report.error == "broadcast failed")


def test_the_watch_raises_for_a_failed_sync_a_departure_or_its_end():
    # x: not a member of this plan; ``failed``: the drive's members whose sync already failed
    with pytest.raises(MembersLost) as lost:
        RendezvousWatch(ScriptedBuffer(_roster("a", "b")), ["a", "b"], _later(), _later(),
                        failed=lambda: ["x", "b"])()
    assert lost.value.lost == ["b"]
    with pytest.raises(MembersLost) as lost:
        RendezvousWatch(ScriptedBuffer(_roster("b")), ["a", "b"], _later(), _later(), failed=list)()
    assert lost.value.lost == ["a"]
    RendezvousWatch(ScriptedBuffer(_roster("a", "b")), ["a", "b"], _later(), _later(),
                    failed=list)()  # everyone there: no error
    buffer = ScriptedBuffer()  # no reply scripted: a request would fail
    with pytest.raises(TimeoutError):
        RendezvousWatch(buffer, ["a", "b"], _later(), time.monotonic(), failed=list)()
    assert buffer.sent == []


def test_the_initial_push_waits_for_the_servers_and_gives_up_at_its_timeout(monkeypatch):
    from trainer import weight_members as wm

    monkeypatch.setattr(wm.time, "sleep", lambda s: None)
    buffer = ScriptedBuffer(_roster(), _roster(), _roster("rollout-0"))
    assert wm.await_registered(buffer, 1, timeout_s=30.0) is True and len(buffer.sent) == 3
    empty = ScriptedBuffer(*[_roster()] * 3)
    assert wm.await_registered(empty, 1, timeout_s=0.0) is False and len(empty.sent) == 1
    assert wm.await_registered(ScriptedBuffer(), 1, timeout_s=30.0,
                               should_stop=lambda: True) is False
    # two wanted: one evaluating out of the syncs counts, a member twice does not
    evaluating = P.Roster(members=_roster("rollout-1").members, policy_version=0,
                          evaluating=["rollout-0"])
    both = ScriptedBuffer(_roster("rollout-1"), P.Roster(members=_roster("rollout-1").members,
                                                  policy_version=0, evaluating=["rollout-1"]),
                   evaluating)
    assert wm.await_registered(both, 2, timeout_s=30.0) is True and len(both.sent) == 3


def test_a_stop_during_the_wait_for_servers_is_not_said_to_be_too_few_servers(caplog):
    """A stop during the wait still pushes (other ranks wait in it) but logs no 'too few'."""
    import contextlib
    import logging
    import threading
    from types import SimpleNamespace

    from trainer.loop import Trainer

    class Pushed(Exception):
        pass

    def after_step(version, wait=True):
        raise Pushed

    stop = threading.Event()
    fake = SimpleNamespace(
        cfg=SimpleNamespace(first_engine_wait_s=150.0, first_engines=1), rank=0, version=0,
        broadcaster=SimpleNamespace(client=ScriptedBuffer()), stop_requested=stop,
        log=logging.getLogger("trainer"), phase=lambda name: contextlib.nullcontext(),
        engines=SimpleNamespace(after_step=after_step))
    stop.set()
    with caplog.at_level(logging.WARNING, "trainer"), pytest.raises(Pushed):
        Trainer.initial_push(fake)
    assert not [r for r in caplog.records if "rollout servers registered" in r.getMessage()]
    stop.clear()  # the wait's own timeout is still reported
    fake.cfg.first_engine_wait_s, fake.broadcaster.client = 1e-9, ScriptedBuffer(_roster())
    with caplog.at_level(logging.WARNING, "trainer"), pytest.raises(Pushed):
        Trainer.initial_push(fake)
    assert [r for r in caplog.records if "rollout servers registered" in r.getMessage()]
