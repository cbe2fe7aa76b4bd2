"""Expiry, run by the buffer's sweep: leases past their deadline and servers gone silent.

A lease past its deadline is re-issued. A server silent for longer than the heartbeat timeout
leaves the roster and its leases are released at once, as are those of a server that registers as
a new process (``ControlPlane.new_process``). After a restart, leases restored for servers that
never registered again are released once every live server has had a heartbeat timeout to come
back. Every lease re-issued or released calls ``changed`` (the service logs a control record).
"""

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
