"""What the members of one weight push did, as trainer rank 0 learns it from the buffer (trainer/WEIGHT_SYNC.md).

Owns: the wait for the members' reports (``await_members``), the watch that gives up on a
rendezvous as soon as a member is lost (``RendezvousWatch``), and the decision to re-push a
version to the members that survived a lost one (``repush_targets``, ``merge_repush``).

A member is *lost* when it left the roster (the buffer expired it: dead, or gone to evaluate) or,
before the group formed, reported failure (it will never join). One lost member breaks the whole
group: every other member's receive (or join) fails with it. Those others are *survivors*: still
in the roster, without the version. The push then re-forms the group for them alone and pushes
the same version again, once, within the same deadline, so one death costs the others nothing
but the time it took to notice it.

Invariants: every call is bounded by the push's deadline; only rank 0 calls these (it is the only
user of the buffer client); a re-push goes only to survivors (never to a lost member, whose join
could only time out), and only when a member was lost (a group of the same members would fail
the same way).
"""

from __future__ import annotations

import time

from areal_like.protocol import Roster, RosterRequest, SyncStatus, SyncStatusRequest
from areal_like.transport import TransportTimeout
from trainer.weight_guard import BROADCAST_SLICE_S
from trainer.weight_guard import bounded as _bounded

STATUS_POLL_S = 0.05  # SyncStatus poll period: a cheap buffer query; sync itself takes far longer
ROSTER_POLL_S = 0.5  # while waiting for members: how often to check that they are still in the roster
REPUSH_MIN_S = 1.0  # a re-push needs at least this much of the deadline left (a rendezvous and the buckets)


class MembersLost(RuntimeError):
    """Members left the roster or failed before the group formed: the rendezvous cannot complete."""

    def __init__(self, lost: list[str]):
        super().__init__(f"member(s) {lost} lost before the group formed")
        self.lost = lost


def roster_ids(client, deadline: float | None) -> set[str]:
    reply = client.request(RosterRequest(), timeout_s=_bounded(deadline))
    if not isinstance(reply, Roster):
        raise RuntimeError(f"buffer answered RosterRequest with {reply.TYPE}")
    return {m.server_id for m in reply.members}


def failed_members(client, version: int) -> list[str]:
    """The members that reported failure for ``version`` ([] when the buffer does not answer in a slice)."""
    try:
        st = client.request(SyncStatusRequest(policy_version=version), timeout_s=BROADCAST_SLICE_S)
    except TransportTimeout:
        return []
    return list(st.failed) if isinstance(st, SyncStatus) else []


class RendezvousWatch:
    """``check`` for ``init_weight_group`` on rank 0: raises ``MembersLost`` once a member reported
    failure for ``version`` or left the roster (polled every ``ROSTER_POLL_S``)."""

    def __init__(self, client, version: int, members: list[str], deadline: float):
        self.client, self.version, self.members, self.deadline = client, version, set(members), deadline

    def __call__(self) -> None:
        lost = set(failed_members(self.client, self.version)) & self.members
        try:
            lost |= self.members - roster_ids(self.client, self.deadline)
        except TransportTimeout:
            pass  # the buffer is slow: the deadline still bounds the rendezvous
        if lost:
            raise MembersLost(sorted(lost))


def await_members(client, version: int, report, deadline: float) -> None:
    """Poll SyncStatus until every member of ``report`` reported, or left the roster (the buffer
    expired it: no report will come), or the deadline passes; fills ``done``, ``pause_s``, ``dropped``."""
    pending, gone, next_roster = set(report.members), set(), time.monotonic() + ROSTER_POLL_S
    while pending - gone and time.monotonic() < deadline:
        try:
            st = client.request(SyncStatusRequest(policy_version=version), timeout_s=_bounded(deadline))
            if time.monotonic() > next_roster:
                gone = pending - roster_ids(client, deadline)
                next_roster = time.monotonic() + ROSTER_POLL_S
        except TransportTimeout:
            continue
        if isinstance(st, SyncStatus):
            report.done = sorted(set(st.done) & set(report.members))
            report.pause_s.update(st.pause_s)
            pending = set(report.members) - set(st.done) - set(st.failed)
        time.sleep(STATUS_POLL_S)
    report.dropped = sorted(set(report.members) - set(report.done))


def repush_targets(client, report, lost: set[str], deadline: float) -> list[str]:
    """The survivors to push ``report.version`` to again: members still in the roster that did not
    get it, when a member was lost (``lost``, or gone from the roster now) and time is left; else []."""
    if not report.dropped or deadline - time.monotonic() < REPUSH_MIN_S:
        return []
    try:
        alive = roster_ids(client, deadline)
    except (TransportTimeout, RuntimeError):
        return []
    lost = lost | (set(report.members) - alive)
    return sorted((set(report.dropped) & alive) - lost) if lost else []


def merge_repush(report, again) -> None:
    """Fold the re-push's report ``again`` into the push's ``report``: one version, one report."""
    report.done = sorted(set(report.done) | set(again.done))
    report.dropped = sorted(set(report.members) - set(report.done))
    report.repushed = list(again.members)
    report.pause_s.update(again.pause_s)
    report.bytes += again.bytes
    report.transfer_s += again.transfer_s
    report.rendezvous_s += again.rendezvous_s
    if again.error:
        report.error = "; ".join(e for e in (report.error, f"re-push: {again.error}") if e)
