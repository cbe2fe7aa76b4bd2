"""Batch hand-out to the trainer: held BatchRequests and the one batch in transit.

At-least-once into training, and exactly once while nobody crashes:

* a batch handed out is *in transit*, not consumed: its groups leave the store, the WAL's
  control record notes ``in_transit = [batch_id, version, group ids]`` (the group records stay live),
  and the ``Batch`` reply carries ``batch_id``; it is sent once that record is durable;
* the trainer's next ``BatchRequest`` carries ``ack_batch`` = the id of the last batch it received.
  A match marks the batch consumed (WAL ``consumed`` marks, ``groups_consumed``, the staleness
  histogram at the version it was handed out for);
* any other ``ack_batch`` (empty after a trainer restart, or an older id when the reply was lost)
  means the batch never arrived: its groups go back to the store and are re-checked for staleness
  at the next hand-out like any other group (``batches_redelivered``);
* a restarted buffer restores the batch in transit from the WAL and lets the next request decide
  the same way, so a trainer that did receive it does not train on it twice.

There is one trainer (rank 0 asks for every rank); two consumers would take each other's batches
for lost ones. Mixed into ``BufferService`` (it uses the store, the policy, the WAL marks and the
reply queue).
"""

from __future__ import annotations

import errno
import uuid
from dataclasses import dataclass

from areal_like import protocol as P
from buffer.replay_buffer import StoredGroup
from buffer.wal import WalFailed

MAX_BATCH_BYTES = P.MAX_FRAME_BYTES * 9 // 10  # a Batch is one frame; leave room for its envelope
# Out of a resource while reading a record back: the record is intact, so the error stops the
# daemon (a restart reads the group again) instead of dropping an acknowledged group for good.
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR})


@dataclass(slots=True)
class PendingBatch:
    peer: bytes
    req_id: bytes
    request: P.BatchRequest
    deadline: float
    received: float


@dataclass(slots=True)
class InTransit:
    batch_id: str
    version: int  # the trainer version it was handed out for
    groups: list[StoredGroup]

    def record(self) -> list:
        return [self.batch_id, self.version, [s.group_id for s in self.groups]]


class BatchHandout:
    """The trainer side of ``BufferService`` (see the module docstring)."""

    pending: list[PendingBatch]
    in_transit: InTransit | None

    def _serve_batches(self) -> None:
        now = self.clock()
        for p in list(self.pending):
            self._settle(p.request.ack_batch)
            v = p.request.trainer_version
            self._drop(self.store.drop_stale(v), "stale")
            taken = self.store.take_stored(p.request.n_groups, v, max_bytes=MAX_BATCH_BYTES)
            groups = None if taken is None else self._load_all(taken)
            if taken is not None and groups is None:
                continue  # an unreadable group was dropped; the next pass takes fresh ones instead
            too_large = taken is None and self.store.n_fresh(v) >= p.request.n_groups
            if taken is None and now < p.deadline and not too_large:
                continue
            self.pending.remove(p)
            if taken is None:
                n = p.request.n_groups
                why = (f"too_large: {n} groups exceed {MAX_BATCH_BYTES} bytes in one frame; ask for fewer" if too_large
                       else f"{self.store.n_fresh(v)} of {n} fresh groups after {p.request.wait_s:.1f}s")
                reply = P.Batch(groups=[], trainer_version=v, reason=why)
            else:
                self.in_transit = InTransit(uuid.uuid4().hex, v, taken)
                self._dirty = True  # the next control record carries the batch in transit
                reply = P.Batch(groups=groups, trainer_version=v, batch_id=self.in_transit.batch_id)
            self._queue_reply(p.peer, p.req_id, reply, p.request.TYPE, p.received)

    def _load_all(self, taken: list[StoredGroup]) -> list[P.TrajectoryGroup] | None:
        """The taken groups read back, or None when one cannot be: a record damaged on disk after its
        CRC was written (bad sector, an operator's edit) is never handed out. It is dropped as
        ``unreadable`` (counted, logged, its prompt re-issued) and the readable ones go back to the
        store; the daemon keeps serving. Running out of a resource (``TRANSIENT_ERRNOS``) or a failed WAL
        (``WalFailed``, fatal) is no damage: it propagates, so an intact group is never dropped."""
        groups, bad = [], []
        for stored in taken:
            try:
                groups.append(self._load(stored))
            except (OSError, P.ProtocolError) as e:
                if isinstance(e, WalFailed) or (isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS):
                    raise
                self.log.error("group %s cannot be read back from the WAL (%s): dropped, its prompt goes out again",
                               stored.group_id, e)
                bad.append(stored)
        if not bad:
            return groups
        self._drop(bad, "unreadable")
        bad_ids = {stored.group_id for stored in bad}
        for stored in taken:
            if stored.group_id not in bad_ids:
                self.store.put(stored)
        return None

    def _load(self, stored: StoredGroup) -> P.TrajectoryGroup:
        """A stored group, read back from the WAL (CRC-checked) unless the store holds it."""
        if stored.group is not None:
            return stored.group
        group = P.decode(self.wal.read_group(stored.ref))
        if not isinstance(group, P.TrajectoryGroup) or group.group_id != stored.group_id:
            raise P.ProtocolError(f"WAL record for {stored.group_id} holds {type(group).__name__} "
                                  f"{getattr(group, 'group_id', '')!r}")
        return group

    def _settle(self, ack_batch: str) -> None:
        """A BatchRequest tells what became of the batch in transit: received (acked) or lost."""
        batch, self.in_transit = self.in_transit, None
        if batch is None:
            return
        self._dirty = True
        if ack_batch == batch.batch_id:
            staleness = self._metric_child("histogram", "buffer/staleness", "staleness of consumed groups (versions)",
                                           buckets=range(0, 17))
            for s in batch.groups:
                self._consumed.append(s.group_id)
                staleness.observe(self.policy.staleness(s.head_version, batch.version))
            self._count("groups_consumed", len(batch.groups))
            return
        for s in batch.groups:
            self.store.put(s)
        self._count("batches_redelivered")
        self._count("groups_redelivered", len(batch.groups))
        self.log.warning("batch %s (%d groups) was not acknowledged (ack_batch=%r): its groups are back in the "
                         "store", batch.batch_id, len(batch.groups), ack_batch)

    def _restore_in_transit(self, record: list | None) -> None:
        """Recovery: the batch in transit when the buffer stopped leaves the store again."""
        if not record:
            return
        batch_id, version, group_ids = record
        taken = [s for gid in group_ids if (s := self.store.pop(gid)) is not None]
        if taken:
            self.in_transit = InTransit(batch_id, version, taken)

    def _in_transit_groups(self) -> int:
        return len(batch.groups) if (batch := self.in_transit) is not None else 0  # one read: metrics thread
