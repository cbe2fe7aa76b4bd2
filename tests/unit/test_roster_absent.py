"""Members absent from a weight sync stay out of the later ones until they show life
(buffer/control.py; over real sockets: tests/integration/test_absent_members.py)."""

from __future__ import annotations

import logging

from areal_like.wire import protocol as P
from buffer.control import ControlPlane


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _plan(version: int, *ids: str) -> P.WeightSyncPlan:
    return P.WeightSyncPlan(policy_version=version, group_name="g", master_addr="127.0.0.1",
                            master_port=1, world_size=1 + len(ids), backend="gloo", reform=True,
                            members=[P.SyncMember(server_id=s, rank_offset=1 + i)
                                     for i, s in enumerate(ids)],
                            buckets=[], deadline_s=10.0, plan_id=f"p{version}")


def _members(cp: ControlPlane) -> list[str]:
    return sorted(m.server_id for m in cp.roster_reply(P.RosterRequest()).members)


def _register(cp: ControlPlane, sid: str, fresh: bool = False) -> None:
    cp.register(P.Register(server_id=sid, engine_url="http://x", policy_version=0, fresh=fresh))


def test_a_member_that_never_reports_is_out_until_it_shows_life(caplog):
    clock = _Clock()
    cp = ControlPlane("tcp://x", 5.0, clock, lambda m: None, logging.getLogger("test"))
    for sid in ("real", "fake"):
        _register(cp, sid)
    cp.take_plan(_plan(1, "real", "fake"))
    cp.sync_done(P.SyncDone(server_id="real", policy_version=1, ok=False))  # joined, group failed
    cp.settle_plan(0)  # an older version: the trainer is not done with the plan yet
    assert _members(cp) == ["fake", "real"]
    cp.settle_plan(1)
    assert _members(cp) == ["real"] and cp.roster_reply(P.RosterRequest()).absent == ["fake"]
    cp.settle_plan(1)  # settled once: one line
    assert sum("never reported" in r.getMessage() for r in caplog.records) == 1

    _register(cp, "fake")  # the same process again: no sign of life
    clock.now = 100.0
    cp.heartbeat(P.Heartbeat(server_id="real", policy_version=0))
    assert cp.expire() == ["fake"]  # silent: off the roster, still remembered as absent
    _register(cp, "fake")
    assert _members(cp) == ["real"]
    _register(cp, "fake", fresh=True)  # a new process
    assert _members(cp) == ["fake", "real"]

    cp.take_plan(_plan(2, "real", "fake"))
    cp.settle_plan(2)  # neither reported in time
    assert _members(cp) == []
    cp.sync_done(P.SyncDone(server_id="real", policy_version=2, ok=True))  # a late report
    assert _members(cp) == ["real"]
