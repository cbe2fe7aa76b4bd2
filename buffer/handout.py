"""Batch hand-out to the trainer: held BatchRequests and the one batch in transit (STALENESS.md,
Hand-out). Invariant: a batch's groups are consumed only once the trainer's next ``BatchRequest``
acks its ``batch_id``; anything else puts them back in the store, to be checked for staleness
again. Only the trainer's role reaches here (``peer_caps.py``)."""

from __future__ import annotations

import errno
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from areal_like.wire import protocol as P
from buffer.instruments import BufferMetrics
from buffer.replay_buffer import ReplayBuffer, StoredGroup
from buffer.wal import WalFailed

MAX_BATCH_BYTES = P.MAX_FRAME_BYTES * 9 // 10  # a Batch is one frame; leave room for its envelope
# Out of a resource while reading a record back: the record is intact, so the error stops the
# daemon (a restart reads the group again) instead of dropping an acknowledged group for good.
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN,
                              errno.EINTR})


@dataclass(slots=True)
class PendingBatch:
    peer: bytes
    req_id: bytes
    request: P.BatchRequest
    deadline: float
    received: float
    member: str = "local"  # who sent it (buffer/peer_caps.py): caps count per member, not socket


@dataclass(slots=True)
class InTransit:
    batch_id: str
    version: int  # the trainer version it was handed out for
    groups: list[StoredGroup]


class Handout:
    def __init__(self, store: ReplayBuffer, read: Callable[[object], bytes | memoryview],
                 drop: Callable[[list, str], None], consume: Callable[[list[str]], None],
                 changed: Callable[[], None], metrics: BufferMetrics, log: logging.Logger):
        self.store, self.read, self.drop, self.consume = store, read, drop, consume
        self.changed, self.metrics, self.log = changed, metrics, log  # changed(): in_transit did
        self.pending: list[PendingBatch] = []
        # the last batch handed out, until the trainer acks it
        self.in_transit: InTransit | None = None

    def hold(self, peer: bytes, req_id: bytes, request: P.BatchRequest, received: float,
             member: str = "local") -> None:
        deadline = received + max(0.0, request.wait_s)
        self.pending.append(PendingBatch(peer, req_id, request, deadline, received, member))

    def serve(self, now: float) -> list[tuple[PendingBatch, P.Batch]]:
        """Answer the held requests that have enough fresh groups now, or whose wait is over."""
        out = []
        for p in list(self.pending):
            self._settle(p.request.ack_batch)
            v, n = p.request.trainer_version, p.request.n_groups
            self.drop(self.store.drop_stale(v), "stale")
            taken = self.store.take_stored(n, v, max_bytes=MAX_BATCH_BYTES)
            groups = None if taken is None else self._load_all(taken)
            if taken is not None and groups is None:
                continue  # an unreadable group was dropped; the next pass takes fresh ones instead
            too_large = taken is None and self.store.n_fresh(v) >= n
            if taken is None and now < p.deadline and not too_large:
                continue
            self.pending.remove(p)
            if taken is None:
                why = (f"too_large: {n} groups exceed {MAX_BATCH_BYTES} bytes in one frame; "
                       "ask for fewer" if too_large
                       else f"{self.store.n_fresh(v)} of {n} fresh groups after "
                            f"{p.request.wait_s:.1f}s")
                out.append((p, P.Batch(groups=[], trainer_version=v, reason=why)))
            else:
                self.in_transit = InTransit(uuid.uuid4().hex, v, taken)
                self.changed()
                out.append((p, P.Batch(groups=groups, trainer_version=v,
                                       batch_id=self.in_transit.batch_id)))
        return out

    def _load_all(self, taken: list[StoredGroup]) -> list[msgspec.Raw] | None:
        """The taken groups' frames as stored (CRC-checked, spliced into the Batch as they are:
        each was decoded and checked when it arrived, and again by replay after a restart), or None
        when one cannot be read: a damaged record is dropped as ``unreadable``, the others go back
        to the store. Running out of a resource or a failed WAL is no damage: it propagates, never
        dropping a group."""
        frames, bad = [], []
        for stored in taken:
            try:
                frames.append(msgspec.Raw(self.read(stored.ref)))
            except OSError as e:
                if isinstance(e, WalFailed) or e.errno in TRANSIENT_ERRNOS:
                    raise
                self.log.error("group %s cannot be read back from the WAL (%s): dropped, "
                               "its prompt goes out again", stored.group_id, e)
                bad.append(stored)
        if not bad:
            return frames
        self.drop(bad, "unreadable")
        for stored in taken:
            if stored not in bad:
                self.store.put(stored)
        return None

    def _settle(self, ack_batch: str) -> None:
        """What became of the batch in transit: received (acked) or lost."""
        batch, self.in_transit = self.in_transit, None
        if batch is None:
            return
        self.changed()
        if ack_batch == batch.batch_id:
            self.consume([s.group_id for s in batch.groups])
            self.metrics.staleness(batch.version - s.head_version for s in batch.groups)
            self.metrics.count("groups_consumed", len(batch.groups))
            return
        for s in batch.groups:
            self.store.put(s)
        self.metrics.count("batches_redelivered")
        self.metrics.count("groups_redelivered", len(batch.groups))
        self.log.warning("batch %s (%d groups) was not acknowledged (ack_batch=%r): its groups are "
                         "back in the store", batch.batch_id, len(batch.groups), ack_batch)

    def record(self) -> list | None:
        """The batch in transit as the WAL's control state holds it."""
        batch = self.in_transit
        return None if batch is None else [batch.batch_id, batch.version,
                                           [s.group_id for s in batch.groups]]

    def restore(self, record: list | None) -> None:
        """Recovery: the batch in transit when the buffer stopped leaves the store again."""
        if record:
            batch_id, version, group_ids = record
            taken = [s for gid in group_ids if (s := self.store.pop(gid)) is not None]
            self.in_transit = InTransit(batch_id, version, taken) if taken else None

    def trainer_version(self) -> int:
        """The newest trainer version a batch was asked for: held or in transit (-1: none)."""
        held = [p.request.trainer_version for p in self.pending]
        return max(held + ([self.in_transit.version] if self.in_transit else []), default=-1)

    def in_transit_groups(self) -> int:
        # one read: metrics thread
        return len(batch.groups) if (batch := self.in_transit) is not None else 0
