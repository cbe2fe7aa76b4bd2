"""Expiry, run by the buffer's sweep: leases past their deadline are re-issued; those of servers
gone silent, of a server that registers as a new process, and (after a restart) of servers that
never came back are released (STALENESS.md, Restarts). Each calls ``changed`` (a control record)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from areal_like.wire import protocol as P
from buffer.control import ControlPlane
from buffer.credits import CreditLedger
from buffer.instruments import BufferMetrics


class Expiry:
    """Lease expiry and roster timeouts over the service's ledger and control plane."""

    def __init__(self, ledger: CreditLedger, control: ControlPlane, instruments: BufferMetrics,
                 log: logging.Logger, clock: Callable[[], float], changed: Callable[[], None]):
        self.ledger, self.control, self.instruments, self.log = ledger, control, instruments, log
        self.clock, self.started_at, self.changed = clock, clock(), changed
        self.orphans_checked = False  # leases of servers that did not come back after a restart

    def sweep(self) -> None:
        """Re-issue expired leases and release those of servers gone from the roster."""
        if expired := self.ledger.expire():
            self.changed()
            self.instruments.count("credits_expired", len(expired))
            self.log.warning("re-issuing %d expired leases (e.g. %s of %s)", len(expired),
                             expired[0].lease_id, expired[0].server_id)
        gone = set(self.control.expire())
        timeout = self.control.heartbeat_timeout_s
        if not self.orphans_checked and self.clock() - self.started_at > timeout:
            # after a restart: leases restored for servers that never came back (a server heartbeats
            # far more often than the timeout, so every live one has registered again by now)
            self.orphans_checked = True
            self.release(lambda sid: sid in self.control.roster, "gone from the roster")
        elif gone:
            self.release(lambda sid: sid not in gone, "gone from the roster")

    def register(self, m: P.Register) -> P.RegisterAck:
        if self.control.new_process(m):  # it holds none of the leases an earlier one left
            self.release(lambda sid: sid != m.server_id, f"{m.server_id} restarted")
        return self.control.register(m)

    def release(self, keep: Callable[[str], bool], why: str) -> None:
        """Re-issue at once every lease whose holder ``keep`` rejects."""
        if released := self.ledger.release(keep):
            self.changed()
            self.instruments.count("credits_released", len(released))
            self.log.warning("re-issuing %d leases of %s: %s", len(released),
                             ", ".join(sorted({x.server_id for x in released})), why)
