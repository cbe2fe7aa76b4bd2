"""A rollout server's data exchange with the buffer: its groups go out, its leases come in.

Owns the groups not yet acknowledged (each as its frame, encoded once when it is added: every send
of it carries those bytes in a ``GroupSubmit``) and the lease accounting. The server
(``rollout_server/server.py``) adds a group when an episode ends, says how many episode slots are
free and whether a weight sync blocks, and starts an episode for each lease handed to it.

Invariants:
* a group is kept and re-sent until an Ack says ``accepted``, ``duplicate`` (the buffer dedupes by
  ``group_id``) or ``rejected``; "unavailable" (disk full) or no answer keeps it, due again
  ``RESEND_BACKOFF_S`` later (a timeout backs off every group: the buffer is not answering);
* due groups go out ``SEND_WINDOW`` at a time, all in flight at once (``request_many``);
* leases for free slots are asked for with each group's first send (``GroupSubmit.want_credits``;
  outside the group's frame, so a re-send is the same bytes), by a
  ``CreditRequest`` only when no group is due; a re-send asks for none (it may be a duplicate whose
  lost ack carried them); ``asked`` counts the leases of requests in flight, so a slot is never
  asked for twice;
* no lease is asked for while a weight sync blocks; leases that arrive meanwhile are held;
* on stop, ``flush`` makes one last best-effort send of each group.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from msgspec import Raw

from areal_like.daemon import StartRefused
from areal_like.net.dealer import AsyncClient
from areal_like.net.metrics import Metrics
from areal_like.net.transport import TransportTimeout
from areal_like.wire.protocol import (
    MAX_CREDITS_PER_REQUEST,
    Ack,
    Credit,
    CreditRequest,
    Credits,
    GroupSubmit,
    ProtocolError,
    TrajectoryGroup,
    encode_group,
)

RESEND_BACKOFF_S = 2.0  # after a send timed out, wait this long before re-sending unacked groups
CREDIT_RETRY_S = 0.25  # after an empty Credits answer (admission closed), ask again this much later
SEND_WINDOW = 16  # groups one send puts in flight at once on the data connection
SENDER_IDLE_S = 0.05  # the sender's longest wait when nothing is due; a new group wakes it at once

log = logging.getLogger("rollout")


def raise_if_superseded(reply) -> None:
    """The buffer says another process registered under this server's id after this one: stop
    (exit 2) with its reason (buffer/STALENESS.md)."""
    if isinstance(reply, Ack) and reply.reason.startswith("duplicate_id: "):
        raise StartRefused(reply.reason.removeprefix("duplicate_id: "))


@dataclass(slots=True)
class Unacked:
    group_id: str
    frame: Raw  # the group's frame (``encode_group``)
    due: float = 0.0  # monotonic time of the next send
    sends: int = 0


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """``event.wait()`` for at most ``timeout_s``; whether it was set. Not ``asyncio.wait_for``:
    before Python 3.12 it loses a cancellation that arrives as the event is set, and a loop around
    it then never ends (a stop hung on it)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
    return bool(done)


class BufferLink:
    """Groups out, leases in, for one server (module docstring)."""

    def __init__(self, control: AsyncClient, data: AsyncClient, server_id: str, metrics: Metrics,
                 free_slots: Callable[[], int], blocked: Callable[[], bool],
                 start: Callable[[Credit], None], incarnation: str = ""):
        # two connections: a CreditRequest does not queue behind a group the buffer is storing
        self.control, self.data, self.server_id, self.metrics = control, data, server_id, metrics
        self.free_slots = free_slots  # episode slots not running an episode
        # a weight sync is pending or applied: no lease is asked for or started
        self.blocked = blocked
        self.start = start  # starts the episode of one lease
        self.incarnation = incarnation  # this process (RolloutServer.incarnation)
        self.unacked: dict[str, Unacked] = {}
        self.ready = asyncio.Event()  # a group was added: the sender sends it at once
        # leases asked for by requests still in flight (CreditRequest or a group's send)
        self.asked = 0
        self.held: list[Credit] = []  # leases that arrived while a weight sync blocked
        self.next_request_at = 0.0  # monotonic; credit requests back off while admission is closed

    # ------------------------------------------------------------------ leases
    def wanted(self) -> int:
        """Free slots not already asked for; 0 while blocked or while credit requests back off."""
        if self.blocked() or time.monotonic() < self.next_request_at:
            return 0
        return max(0, min(self.free_slots() - self.asked - len(self.held), MAX_CREDITS_PER_REQUEST))

    def window_moved(self) -> None:
        """The trainer announced a new version: a back-off from an empty answer before is over
        (a refused ask at eta 0 gets its leases at the announcement, not CREDIT_RETRY_S later)."""
        self.next_request_at = 0.0

    def take(self, credits: list[Credit], via: str) -> None:
        """Leases received: started now, or held while a weight sync blocks."""
        self.metrics.counter("rollout/leases_received",
                             "leases received, by how they were asked for",
                             ("via",)).labels(via=via).inc(len(credits))
        self.held.extend(credits)
        self.start_held()

    def start_held(self) -> None:
        """Start the episodes of held leases, unless a weight sync blocks."""
        if self.held and not self.blocked():
            held, self.held = self.held, []
            for credit in held:
                self.start(credit)

    async def request_credits(self) -> bool:
        """Ask for the free slots' leases, unless a group is due: it asks with its send. False when
        the buffer answered that it does not know this server (it must register again)."""
        now = time.monotonic()
        if any(u.due <= now for u in self.unacked.values()) or (want := self.wanted()) <= 0:
            return True
        self.asked += want
        try:
            reply = await self.control.request(CreditRequest(
                server_id=self.server_id, max_credits=want, incarnation=self.incarnation))
        except TransportTimeout:
            self.next_request_at = time.monotonic() + RESEND_BACKOFF_S
            return True
        finally:
            self.asked -= want
        raise_if_superseded(reply)
        credits = reply.credits if isinstance(reply, Credits) else []
        self.take(credits, "credit_request")
        if not credits:
            self.next_request_at = time.monotonic() + CREDIT_RETRY_S
            return not (isinstance(reply, Credits) and reply.reason == "unknown_server")
        return True

    # ------------------------------------------------------------------ groups
    def add(self, group: TrajectoryGroup) -> ProtocolError | None:
        """Keep ``group`` to send, encoded once; else why it cannot go on the wire (metadata msgpack
        cannot carry, a frame over the limit): its episode fails, not the sender with every group
        in it."""
        try:
            frame = encode_group(group)
        except ProtocolError as e:
            return e
        self.unacked[group.group_id] = Unacked(group.group_id, frame)
        self.ready.set()
        return None

    def resend_all(self) -> None:
        """Make every group due now (the buffer lost us: it may have lost them too)."""
        for u in self.unacked.values():
            u.due = 0.0

    async def sender(self) -> None:
        """Send every due group, forever, ``SEND_WINDOW`` in flight at once; keep each until the
        buffer acks it."""
        while True:
            self.ready.clear()
            now = time.monotonic()
            due = [u for u in self.unacked.values() if u.due <= now]
            for k in range(0, len(due), SEND_WINDOW):
                if not await self.send(*due[k:k + SEND_WINDOW]):
                    for other in self.unacked.values():  # the buffer is not answering: back off all
                        other.due = max(other.due, time.monotonic() + RESEND_BACKOFF_S)
                    break
            if due:
                await asyncio.sleep(0)
                continue
            await wait_event(self.ready, SENDER_IDLE_S)

    async def send(self, *us: Unacked) -> bool:
        """Send groups, all in flight at once, each first send asking for the leases of free slots
        with its ack (one round trip for both); False when the buffer did not answer them all."""
        msgs, asked = [], 0
        for u in us:
            u.sends += 1
            self.metrics.counter("rollout/groups_resent" if u.sends > 1 else "rollout/groups_sent",
                                 "TrajectoryGroup sends").inc()
            # a re-send may be a duplicate (module docstring)
            want = self.wanted() if u.sends == 1 else 0
            self.asked += want
            asked += want
            msgs.append(GroupSubmit(group=u.frame, want_credits=want))
        try:
            acks = await self.data.request_many(msgs)
        except TransportTimeout:
            acks = [None] * len(us)
        finally:
            self.asked -= asked
        for u, ack in zip(us, acks):
            self._settle(u, ack)
        return None not in acks

    def _settle(self, u: Unacked, ack) -> None:
        raise_if_superseded(ack)
        if isinstance(ack, Ack) and ack.credits:
            self.take(ack.credits, "ack")
        if isinstance(ack, Ack) and ack.status in ("accepted", "duplicate", "rejected"):
            self.unacked.pop(u.group_id, None)
            if ack.status == "rejected":  # e.g. too stale or malformed: re-sending cannot help
                log.warning("group %s rejected: %s", u.group_id, ack.reason)
                self.metrics.counter("rollout/groups_rejected", "groups the buffer refused").inc()
            else:
                self.metrics.counter("rollout/groups_acked",
                                     "groups acknowledged by the buffer").inc()
        else:
            # no answer, or "unavailable" (the buffer's disk is full): keep it, send it again later
            if isinstance(ack, Ack) and ack.status == "unavailable":
                self.metrics.counter("rollout/groups_deferred",
                                     "sends the buffer could not store (disk full)").inc()
            u.due = time.monotonic() + RESEND_BACKOFF_S

    async def flush(self, seconds: float) -> None:
        """On stop: one last best-effort send of each group, within ``seconds`` in all."""
        end = time.monotonic() + seconds
        for u in list(self.unacked.values()):
            if (left := end - time.monotonic()) <= 0:
                break
            try:
                ack = await self.data.request(GroupSubmit(group=u.frame), timeout_s=left)
            except TransportTimeout:
                break
            if isinstance(ack, Ack) and ack.status in ("accepted", "duplicate"):
                self.unacked.pop(u.group_id, None)
        if self.unacked:
            log.warning("stopping with %d unacknowledged groups (their leases will be re-issued)",
                        len(self.unacked))
