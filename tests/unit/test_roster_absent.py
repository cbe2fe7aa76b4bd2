"""Members absent from a weight sync stay out of the later ones until they show life
(buffer/control.py; over real sockets: tests/integration/test_absent_members.py)."""

from __future__ import annotations

import logging

import msgspec
from service_harness import start, step

from areal_like.settings.config import BufferConfig
from areal_like.wire import protocol as P
from buffer import control
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


def _control(clock) -> ControlPlane:
    return ControlPlane("tcp://x", 5.0, clock, lambda m: None, logging.getLogger("test"))


def _hello(sid: str, incarnation: str, fresh: bool = False) -> P.Register:
    return P.Register(server_id=sid, engine_url="http://x", policy_version=0, fresh=fresh,
                      incarnation=incarnation)


def _pending(cp: ControlPlane, sid: str) -> str | None:
    plan = cp.heartbeat(P.Heartbeat(server_id=sid, policy_version=0)).pending_plan
    return None if plan is None else plan.plan_id


def _failed(cp: ControlPlane, version: int) -> list[str]:
    return cp.sync_status(P.SyncStatusRequest(policy_version=version)).failed


def test_a_retried_first_registration_keeps_the_plan_and_a_new_process_loses_it():
    """A first Register (``fresh``) retried after its answer was lost is the same process again
    (same incarnation): still a member of the plan published in between. Another incarnation
    under the id is a new process: failed for the plan, never handed it."""
    cp = _control(_Clock())
    first = _hello("a", "1111", fresh=True)
    cp.register(first)
    cp.register(_hello("b", "2222", fresh=True))
    cp.take_plan(_plan(1, "a", "b"))
    cp.register(first)  # the retry: its first attempt had arrived
    assert _failed(cp, 1) == [] and _pending(cp, "a") == "p1"
    cp.register(_hello("b", "3333", fresh=True))  # b relaunched
    assert _failed(cp, 1) == ["b"] and _pending(cp, "b") is None and _pending(cp, "a") == "p1"


def test_a_member_back_after_its_expiry_gets_no_plan_made_before_it_came_back():
    """A member the buffer expired during a plan has failed it (the trainer counts it lost); the
    same process registering again is not handed that plan, nor one whose member list was read
    before the expiry and published while it was off the roster; a plan published once it is
    back is its own. A report it sends anyway still counts."""
    clock = _Clock()
    cp = _control(clock)
    cp.register(_hello("a", "1111", fresh=True))
    cp.register(_hello("b", "2222", fresh=True))
    cp.take_plan(_plan(1, "a", "b"))
    clock.now = 6.0  # a silent past the heartbeat timeout (5 s); b beats
    cp.heartbeat(P.Heartbeat(server_id="b", policy_version=0))
    assert cp.expire() == ["a"] and _failed(cp, 1) == ["a"]
    cp.take_plan(_plan(2, "a", "b"))  # the trainer read the roster before a left it
    assert _failed(cp, 2) == ["a"] and _pending(cp, "b") == "p2"
    cp.register(_hello("a", "1111"))  # the same process (it was frozen), within both deadlines
    assert _pending(cp, "a") is None and _members(cp) == ["a", "b"]
    cp.sync_done(P.SyncDone(server_id="a", policy_version=1, ok=True))  # it had taken v1 up
    assert cp.sync_status(P.SyncStatusRequest(policy_version=1)).done == ["a"]
    cp.take_plan(_plan(3, "a", "b"))
    assert _pending(cp, "a") == "p3" and _failed(cp, 3) == []


class _CountingRoster(dict):
    """A roster that counts its membership tests."""

    lookups = 0

    def __contains__(self, key) -> bool:
        type(self).lookups += 1
        return super().__contains__(key)


def test_a_register_costs_the_same_however_many_ids_the_buffer_remembers():
    """A Register reads the roster a bounded number of times, not once per remembered id (20k
    distinct ids registering one after the other made the buffer quadratic); the ids kept off
    the roster are the ``INCARNATIONS_KEEP`` that left it last, and a departed id that comes back
    is on the roster again, no longer counted as departed."""
    clock = _Clock()
    cp = _control(clock)
    for i in range(300):
        cp.register(_hello(f"s{i}", f"{i:04x}"))
    clock.now = 6.0
    cp.register(_hello("late", "ffff"))
    assert len(cp.expire()) == 300
    cp.roster = _CountingRoster(cp.roster)
    for i in range(1000):
        cp.register(_hello(f"n{i}", f"{i:04x}"))
    assert _CountingRoster.lookups <= 2 * 1000
    keep = control.INCARNATIONS_KEEP
    control.INCARNATIONS_KEEP = 100
    try:
        clock.now = 12.0
        cp.heartbeat(P.Heartbeat(server_id="s299", policy_version=0))  # unknown: stays off
        cp.register(_hello("s299", "012b"))  # back on the roster: not departed any more
        assert len(cp.expire()) == 1001 and "s299" not in cp.departed
    finally:
        control.INCARNATIONS_KEEP = keep
    assert list(cp.departed) == [f"n{i}" for i in range(900, 1000)]  # "late" left first
    assert set(cp.incarnations) == {*cp.departed, "s299"}


def test_a_member_expired_after_it_was_handed_the_plan_has_not_failed_it():
    """Silence after the member took the plan up (its engine may be receiving) is no failure of
    the plan: the broadcast under way goes on for the others and its own report counts. A member
    expired before it was handed the plan has failed it."""
    clock = _Clock()
    cp = _control(clock)
    for sid, token in (("a", "1111"), ("b", "2222"), ("c", "3333")):
        cp.register(_hello(sid, token))
    cp.take_plan(_plan(1, "a", "b", "c"))
    assert _pending(cp, "a") == "p1" and _pending(cp, "c") == "p1"  # a and c take it up
    clock.now = 6.0  # a and b silent past the heartbeat timeout (5 s)
    cp.heartbeat(P.Heartbeat(server_id="c", policy_version=0))
    assert cp.expire() == ["a", "b"] and _failed(cp, 1) == ["b"]
    cp.sync_done(P.SyncDone(server_id="a", policy_version=1, ok=True))
    assert cp.sync_status(P.SyncStatusRequest(policy_version=1)).done == ["a"]
    cp.take_plan(_plan(2, "c"))
    clock.now = 12.0
    assert cp.expire() == ["c"] and _failed(cp, 2) == ["c"]  # handed v1, not v2


def test_a_versions_results_are_those_of_its_latest_plan():
    """A trainer resumed from a checkpoint pushes its weights under the label the buffer last
    announced, which the crashed trainer had pushed (and a later one too): the members' reports of
    the earlier plan of that label are not reports of this one (they serve other weights)."""
    cp = ControlPlane("tcp://x", 5.0, _Clock(), lambda m: None, logging.getLogger("test"))
    for sid in ("a", "b"):
        _register(cp, sid)
    old = _plan(5, "a", "b")
    cp.take_plan(old)
    for sid in ("a", "b"):
        cp.sync_done(P.SyncDone(server_id=sid, policy_version=5, ok=True, plan_id=old.plan_id))
    cp.take_plan(_plan(6, "a", "b"))  # the crashed trainer's last push, never answered
    relabel = P.WeightSyncPlan(**{**msgspec.structs.asdict(old), "plan_id": "resumed"})
    cp.take_plan(relabel)
    assert cp.sync_status(P.SyncStatusRequest(policy_version=5)).done == []
    cp.take_plan(relabel)  # the same plan again (a retried request) keeps what was reported
    cp.sync_done(P.SyncDone(server_id="a", policy_version=5, ok=False, plan_id=old.plan_id))  # late
    cp.sync_done(P.SyncDone(server_id="b", policy_version=5, ok=True, plan_id="resumed"))
    cp.take_plan(relabel)
    status = cp.sync_status(P.SyncStatusRequest(policy_version=5))
    assert (status.done, status.failed) == (["b"], [])


def test_a_server_that_stops_on_request_leaves_at_once():
    """A last Heartbeat with ``leaving`` (a rollout server's graceful stop) takes it off the roster
    and releases its leases now, not ``heartbeat_timeout_s`` later; a plan it was not yet handed
    fails for it, so the trainer's push stops waiting for it."""
    released = []
    cp = ControlPlane("tcp://x", 15.0, _Clock(), lambda m: None, logging.getLogger("test"),
                      release=lambda keep, why, level=logging.WARNING: released.append(
                          ([s for s in ("a", "b") if not keep(s)], why, level)))
    cp.register(_hello("a", "1111", fresh=True))
    cp.register(_hello("b", "2222", fresh=True))
    released.clear()
    cp.take_plan(_plan(1, "a", "b"))
    ack = cp.heartbeat(P.Heartbeat(server_id="b", policy_version=0, leaving=True))
    assert ack.known is False and _members(cp) == ["a"]
    # a stop on request is routine: its leases go back at INFO, a dead server's at WARNING
    assert released == [(["b"], "b stopped on request", logging.INFO)] and _failed(cp, 1) == ["b"]
    assert cp.expire() == []  # gone already: no second removal
    cp.register(_hello("b", "3333", fresh=True))  # started again later: a member as any other
    assert _members(cp) == ["a", "b"]


def test_a_member_that_missed_a_plan_and_fell_behind_the_bound_is_back_when_it_asks_for_credits(
        tmp_path):
    """A rollout server frozen past the deadline (a stall, SIGSTOP) never took its plan up, so it
    has no report to send; beyond the staleness bound it gets no credits, so no group to deliver:
    it stayed out of every later plan, and at eta = 0 with one server the job waited forever."""
    svc = start(tmp_path, BufferConfig(max_staleness=0, groups_per_step=1))
    step(svc, P.Register(server_id="s", engine_url="http://x", policy_version=0))
    step(svc, _plan(1, "s"), peer=b"trainer-ws-t")
    step(svc, P.VersionUpdate(policy_version=1), peer=b"trainer-ws-t")  # s never answered
    roster = step(svc, P.RosterRequest(), peer=b"trainer-ws-t")
    assert roster.members == [] and roster.absent == ["s"]
    credits = step(svc, P.CreditRequest(server_id="s", max_credits=1))
    assert (credits.credits, credits.reason) == ([], "stale_engine")
    roster = step(svc, P.RosterRequest(), peer=b"trainer-ws-t")
    assert [m.server_id for m in roster.members] == ["s"]  # the next push names it again


def test_sync_results_stay_bounded_between_plans():
    """SyncDone reports of versions no plan named (a peer's, between the trainer's pushes) made a
    results entry each, trimmed only at the next plan: memory grew with every report meanwhile."""
    cp = ControlPlane("tcp://x", 5.0, _Clock(), lambda m: None, logging.getLogger("test"))
    _register(cp, "a")
    cp.take_plan(_plan(5, "a"))
    for v in range(10_000):
        cp.sync_done(P.SyncDone(server_id="a", policy_version=v + 100, ok=True))
    assert len(cp.syncs) <= control.SYNC_RESULTS_KEEP + 1
    cp.sync_done(P.SyncDone(server_id="a", policy_version=5, ok=True, plan_id="p5"))
    # the current plan's results are kept, however many newer versions were reported
    assert cp.sync_status(P.SyncStatusRequest(policy_version=5)).done == ["a"]
