"""Who the members of one weight push are, as rank 0 learns it from the buffer's roster, and what a
re-push to the survivors of a lost one gets (trainer/WEIGHT_SYNC.md "One lost member"); what each
member did is the drive's (trainer/engine_drive.py).

Invariants: every call is bounded by the push's deadline; only rank 0 talks to the buffer; a
re-push goes only to survivors, and only when a member was lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from areal_like.net.answers import peer_text
from areal_like.net.transport import TransportTimeout
from areal_like.wire.protocol import Roster, RosterRequest

log = logging.getLogger("trainer.weight_sync")

BUFFER_REQUEST_TIMEOUT_S = 10.0  # the buffer answers control requests in milliseconds when alive
# a stalled broadcast checks every slice whether a member's sync already failed
BROADCAST_SLICE_S = 1.0
# while the group forms: how often to check that its members are still in the roster
ROSTER_POLL_S = 0.5
# before the initial push: how often to ask whether enough servers registered (a roster request
# costs the buffer microseconds; the push should start soon after the last one registers)
REGISTER_POLL_S = 0.1
# a re-push needs at least this much of the deadline left (a rendezvous and the buckets)
REPUSH_MIN_S = 1.0
# The end of the deadline a rendezvous leaves for the members' results (a member that joined and
# failed told from one that never joined), at most this share of the time left
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
        super().__init__(f"member(s) {', '.join(map(peer_text, lost))} lost before the group "
                         "formed")
        self.lost = lost


def roster(client, deadline: float) -> Roster:
    """The buffer's roster, asked within ``deadline`` (``TransportTimeout``: no answer)."""
    reply = client.request(RosterRequest(), timeout_s=bounded(deadline))
    if not isinstance(reply, Roster):
        raise RuntimeError(f"buffer answered RosterRequest with {reply.TYPE}")
    return reply


def roster_ids(client, deadline: float) -> set[str]:
    return {m.server_id for m in roster(client, deadline).members}


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
    """``check`` for ``init_weight_group``: ``MembersLost`` once a member's sync failed
    (``failed``: the drive's) or it left the roster, ``TimeoutError`` at ``give_up``."""

    def __init__(self, client, members: list[str], deadline: float, give_up: float,
                 failed: Callable[[], list[str]]):
        self.client, self.members, self.deadline = client, set(members), deadline
        self.give_up, self.failed = give_up, failed

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

