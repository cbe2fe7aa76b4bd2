"""Expiry, run by the buffer's sweep: leases past their deadline and servers gone silent.

A lease past its deadline is re-issued; a server silent for longer than the heartbeat timeout
leaves the roster and its leases are released at once (not after their own deadline); so are those
of a server that registers as a new process (``Register.fresh``). After a
restart, leases restored for servers that never registered again are released once, when every
live server has had a heartbeat timeout to come back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from areal_like import protocol as P

if TYPE_CHECKING:
    from buffer.service import BufferService


def expire(svc: BufferService) -> None:
    """Re-issue expired leases and release those of servers gone from the roster (marks svc dirty)."""
    if expired := svc.ledger.expire():
        svc._dirty = True
        svc.instruments.count("credits_expired", len(expired))
        svc.log.warning("re-issuing %d expired leases (e.g. %s of %s)", len(expired),
                    expired[0].lease_id, expired[0].server_id)
    gone = set(svc.control.expire())
    if not svc._orphans_checked and svc.clock() - svc._started_at > svc.control.heartbeat_timeout_s:
        # after a restart: leases restored for servers that never came back (a server heartbeats
        # far more often than the timeout, so every live one has registered again by now)
        svc._orphans_checked = True
        release(svc, lambda sid: sid in svc.control.roster, "gone from the roster")
    elif gone:
        release(svc, lambda sid: sid not in gone, "gone from the roster")


def register(svc: BufferService, m: P.Register) -> P.RegisterAck:
    if m.fresh:  # a new process under this id holds none of the leases an earlier one left
        release(svc, lambda sid: sid != m.server_id, f"{m.server_id} restarted")
    return svc.control.register(m)


def release(svc: BufferService, keep: Callable[[str], bool], why: str) -> None:
    """Re-issue at once every lease whose holder ``keep`` rejects (marks svc dirty when any was)."""
    if released := svc.ledger.release(keep):
        svc._dirty = True
        svc.instruments.count("credits_released", len(released))
        svc.log.warning("re-issuing %d leases of %s: %s", len(released),
                        ", ".join(sorted({x.server_id for x in released})), why)
