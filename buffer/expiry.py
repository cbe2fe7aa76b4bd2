"""Expiry, run by the buffer's sweep: leases past their deadline and servers gone silent.

A lease past its deadline is re-issued; a server silent for longer than the heartbeat timeout
leaves the roster and its leases are released at once (not after their own deadline). After a
restart, leases restored for servers that never registered again are released once, when every
live server has had a heartbeat timeout to come back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
        released = svc.ledger.release(lambda sid: sid in svc.control.roster)
    else:
        released = svc.ledger.release(lambda sid: sid not in gone) if gone else []
    if released:
        svc._dirty = True
        svc.instruments.count("credits_released", len(released))
        svc.log.warning("re-issuing %d leases of servers gone from the roster (%s)", len(released),
                    ", ".join(sorted({x.server_id for x in released})))
