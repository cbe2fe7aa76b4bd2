"""What the members of one weight push did, as rank 0 learns it from the buffer
(trainer/WEIGHT_SYNC.md "One lost member").

Invariants: every call is bounded by the push's deadline; only rank 0 talks to the buffer; a
re-push goes only to survivors, and only when a member was lost.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from areal_like.net.transport import TransportTimeout
from areal_like.wire.protocol import (
    Ack,
    Roster,
    RosterRequest,
    SyncStatus,
    SyncStatusRequest,
    WeightSyncPlan,
)

log = logging.getLogger("trainer.weight_sync")

BUFFER_REQUEST_TIMEOUT_S = 10.0  # the buffer answers control requests in milliseconds when alive
# a stalled broadcast checks every slice whether a member already reported failure
BROADCAST_SLICE_S = 1.0
# SyncStatus poll period: short first (a small model's sync takes tens of ms),
# doubling up to the longest
STATUS_POLL_MIN_S = 0.005
STATUS_POLL_S = 0.05
# while waiting for members: how often to check that they are still in the roster
ROSTER_POLL_S = 0.5
# before the initial push: how often to ask whether enough servers registered (a roster request
# costs the buffer microseconds; the push should start soon after the last one registers)
REGISTER_POLL_S = 0.1
# a re-push needs at least this much of the deadline left (a rendezvous and the buckets)
REPUSH_MIN_S = 1.0
# The end of the deadline a rendezvous leaves for the members' reports (so the buffer tells members
# that joined and failed from those that never joined), at most this share of the time left
REPORT_MARGIN_S = 1.0
REPORT_MARGIN_SHARE = 0.1


def bounded(deadline: float) -> float:
    """A buffer request's timeout: the usual one, never past the sync deadline (at least 0.5 s)."""
    return max(0.5, min(BUFFER_REQUEST_TIMEOUT_S, deadline - time.monotonic()))


def rendezvous_end(deadline: float) -> float:
    """When a rendezvous starting now gives up: the reports' margin before ``deadline``."""
    return deadline - min(REPORT_MARGIN_S,
                          REPORT_MARGIN_SHARE * max(0.0, deadline - time.monotonic()))


class MembersLost(RuntimeError):
    """Members left the roster or failed before the group formed: the rendezvous cannot complete."""

    def __init__(self, lost: list[str]):
        super().__init__(f"member(s) {lost} lost before the group formed")
        self.lost = lost


def roster(client, deadline: float) -> Roster:
    """The buffer's roster, asked within ``deadline`` (``TransportTimeout``: no answer)."""
    reply = client.request(RosterRequest(), timeout_s=bounded(deadline))
    if not isinstance(reply, Roster):
        raise RuntimeError(f"buffer answered RosterRequest with {reply.TYPE}")
    return reply


def roster_ids(client, deadline: float) -> set[str]:
    return {m.server_id for m in roster(client, deadline).members}


def failed_members(client, version: int) -> list[str]:
    """The members that reported failure for ``version`` ([] when the buffer is slow)."""
    try:
        st = client.request(SyncStatusRequest(policy_version=version), timeout_s=BROADCAST_SLICE_S)
    except TransportTimeout:
        return []
    return list(st.failed) if isinstance(st, SyncStatus) else []


def await_registered(client, want: int, timeout_s: float, should_stop=lambda: False) -> bool:
    """Rank 0, before the initial push: whether ``want`` servers registered before ``timeout_s`` or
    a stop."""
    deadline = time.monotonic() + timeout_s
    while not should_stop():
        try:
            reply = client.request(RosterRequest(), timeout_s=bounded(deadline))
            if isinstance(reply, Roster) and len({m.server_id for m in reply.members}
                                                 | set(reply.evaluating)) >= want:
                return True
        except TransportTimeout:  # no answer: ask again (an odd reply too, above)
            pass
        if time.monotonic() + REGISTER_POLL_S > deadline:
            return False
        time.sleep(REGISTER_POLL_S)
    return False


class RendezvousWatch:
    """``check`` for ``init_weight_group``: ``MembersLost`` once a member failed or left the roster,
    ``TimeoutError`` at ``give_up``. ``failed``: the members whose sync already failed (default:
    as the buffer has them reported)."""

    def __init__(self, client, version: int, members: list[str], deadline: float, give_up: float,
                 failed: Callable[[], list[str]] | None = None):
        self.client, self.version, self.members, self.deadline = (
            client, version, set(members), deadline)
        self.give_up = give_up
        self.failed = failed or (lambda: failed_members(self.client, self.version))

    def __call__(self) -> None:
        if time.monotonic() >= self.give_up:
            raise TimeoutError(f"members {sorted(self.members)} did not all join by the push's "
                               f"deadline (less the reports' margin)")
        lost = set(self.failed()) & self.members
        try:
            lost |= self.members - roster_ids(self.client, self.deadline)
        except TransportTimeout:
            pass  # the buffer is slow: the deadline still bounds the rendezvous
        if lost:
            raise MembersLost(sorted(lost))


def poll_periods():
    period = STATUS_POLL_MIN_S
    while True:
        yield period
        period = min(STATUS_POLL_S, period * 2)


def await_members(client, version: int, report, deadline: float,
                  should_stop: Callable[[], bool] = lambda: False) -> None:
    """Poll SyncStatus until every member reported or left the roster, the deadline, or a stop
    (the trainer going away does not wait out a dead buffer); fills ``done``, ``pause_s``,
    ``dropped``, ``loaded``."""
    pending, gone, next_roster = set(report.members), set(), time.monotonic() + ROSTER_POLL_S
    periods = poll_periods()
    while pending - gone and time.monotonic() < deadline and not should_stop():
        try:
            st = client.request(SyncStatusRequest(policy_version=version),
                                timeout_s=bounded(deadline))
            if time.monotonic() > next_roster:
                next_roster = time.monotonic() + ROSTER_POLL_S
                with contextlib.suppress(RuntimeError):  # an odd reply: no news of who left
                    gone = pending - roster_ids(client, deadline)
        except TransportTimeout:
            continue
        if isinstance(st, SyncStatus):
            report.done = sorted(set(st.done) & set(report.members))
            report.pause_s.update(st.pause_s)
            pending = set(report.members) - set(st.done) - set(st.failed)
        if pending - gone:
            time.sleep(next(periods))
    report.dropped = sorted(set(report.members) - set(report.done))
    report.loaded = {s: report.plan_id for s in report.done}


class BufferRelay:
    """The members' side of a push through the buffer: the plan is published there and handed to
    each member's rollout server in its ``HeartbeatAck``; their reports are polled from it. The
    interface of ``trainer/engine_drive.py`` ``EngineDrive`` (``start``, ``failed``, ``collect``,
    ``lost``, ``close``), which drives the engines instead."""

    def __init__(self, client):
        self.client, self.version = client, -1

    def start(self, plan: WeightSyncPlan, entries: list) -> None:
        """Publish ``plan`` (the roster's ``entries`` are not needed: each member's rollout server
        drives its own engine)."""
        ack = self.client.request(plan, timeout_s=max(0.5, min(BUFFER_REQUEST_TIMEOUT_S,
                                                               plan.deadline_s)))
        if not (isinstance(ack, Ack) and ack.status in ("ok", "accepted")):
            raise RuntimeError(f"buffer refused the plan for version {plan.policy_version}: {ack}")
        self.version = plan.policy_version

    def failed(self) -> list[str]:
        return failed_members(self.client, self.version)

    def collect(self, report, deadline: float, should_stop: Callable[[], bool]) -> None:
        await_members(self.client, self.version, report, deadline, should_stop)

    def lost(self) -> set[str]:
        return set()  # ``repush_targets`` learns who was lost from the roster

    def close(self) -> None:
        pass  # the buffer client is the broadcaster's


def repush_targets(client, report, lost: set[str], deadline: float) -> list[str]:
    """The survivors to push the version to again, when a member was lost and time is left."""
    if not report.dropped or deadline - time.monotonic() < REPUSH_MIN_S:
        return []
    try:
        alive = roster_ids(client, deadline)
    except (TransportTimeout, RuntimeError):
        return []
    lost = lost | (set(report.members) - alive)
    return sorted((set(report.dropped) & alive) - lost) if lost else []


def merge_repush(report, again) -> None:
    """Fold the re-push's report ``again`` into ``report``."""
    report.done = sorted(set(report.done) | set(again.done))
    report.loaded.update(again.loaded)
    report.dropped = sorted(set(report.members) - set(report.done))
    report.repushed = list(again.members)
    report.plan_id = again.plan_id or report.plan_id
    report.pause_s.update(again.pause_s)
    report.bytes += again.bytes
    report.transfer_s += again.transfer_s
    if again.error:
        report.error = "; ".join(e for e in (report.error, f"re-push: {again.error}") if e)

