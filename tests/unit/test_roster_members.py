"""Who is on the buffer's roster (buffer/control.py)."""

from __future__ import annotations

import logging

from service_harness import Clock, start, step

from areal_like.settings.config import BufferConfig
from areal_like.wire import protocol as P
from buffer import control
from buffer.control import ControlPlane


def _control(clock, heartbeat_timeout_s: float = 5.0, **kw) -> ControlPlane:
    return ControlPlane("tcp://x", heartbeat_timeout_s, clock, logging.getLogger("test"), **kw)


def _members(cp: ControlPlane) -> list[str]:
    return sorted(m.server_id for m in cp.roster_reply(P.RosterRequest()).members)


def _hello(sid: str, incarnation: str, fresh: bool = False) -> P.Register:
    return P.Register(server_id=sid, engine_url="http://x", policy_version=0, fresh=fresh,
                      incarnation=incarnation)


class _CountingRoster(dict):

    lookups = 0

    def __contains__(self, key) -> bool:
        type(self).lookups += 1
        return super().__contains__(key)


def test_a_register_costs_the_same_however_many_ids_the_buffer_remembers(monkeypatch):
    """A Register reads the roster a bounded number of times; INCARNATIONS_KEEP departed kept."""
    clock = Clock(0.0)
    cp = _control(clock)
    for i in range(300):
        cp.register(_hello(f"s{i}", f"{i:04x}"))
    clock.t = 6.0
    cp.register(_hello("late", "ffff"))
    assert len(cp.expire()) == 300
    cp.roster = _CountingRoster(cp.roster)
    for i in range(1000):
        cp.register(_hello(f"n{i}", f"{i:04x}"))
    assert _CountingRoster.lookups <= 2 * 1000
    monkeypatch.setattr(control, "INCARNATIONS_KEEP", 100)
    clock.t = 12.0
    cp.heartbeat(P.Heartbeat(server_id="s299", policy_version=0))  # unknown: stays off
    cp.register(_hello("s299", "012b"))  # back on the roster: not departed any more
    assert len(cp.expire()) == 1001 and "s299" not in cp.departed
    assert list(cp.departed) == [f"n{i}" for i in range(900, 1000)]  # "late" left first
    assert set(cp.incarnations) == {*cp.departed, "s299"}


def test_a_server_that_stops_on_request_leaves_at_once():
    released = []
    cp = _control(Clock(0.0), 15.0, release=lambda keep, why, level=logging.WARNING:
                  released.append(([s for s in ("a", "b") if not keep(s)], why, level)))
    cp.register(_hello("a", "1111", fresh=True))
    cp.register(_hello("b", "2222", fresh=True))
    released.clear()
    ack = cp.heartbeat(P.Heartbeat(server_id="b", policy_version=0, leaving=True))
    assert ack.known is False and _members(cp) == ["a"]
    # a stop on request is routine: its leases go back at INFO, a dead server's at WARNING
    assert released == [(["b"], "b stopped on request", logging.INFO)]
    assert cp.expire() == []  # gone already: no second removal
    cp.register(_hello("b", "3333", fresh=True))  # started again later
    assert _members(cp) == ["a", "b"]


def test_a_server_behind_the_staleness_bound_stays_on_the_roster(tmp_path):
    svc = start(tmp_path, BufferConfig(max_staleness=0, groups_per_step=1))
    try:
        step(svc, P.Register(server_id="s", engine_url="http://x", policy_version=0))
        step(svc, P.VersionUpdate(policy_version=1))  # s's engine never loaded v1
        credits = step(svc, P.CreditRequest(server_id="s", max_credits=1))
        assert (credits.credits, credits.reason) == ([], "stale_engine")
        roster = step(svc, P.RosterRequest())
        assert [m.server_id for m in roster.members] == ["s"]  # the next push names it
        assert roster.members[0].policy_version == 0
        step(svc, P.Heartbeat(server_id="s", policy_version=1))  # it loaded v1
        assert len(step(svc, P.CreditRequest(server_id="s", max_credits=1)).credits) == 1
    finally:
        svc.wal.close()
