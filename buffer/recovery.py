"""Rebuild the buffer's durable state from its write-ahead log at start (``replay``).

Records are applied in the order they were written:

* ``G`` (an accepted group): remembered for dedupe, its lease closed, stored (by its WAL reference);
* ``C`` (control): ``seen`` ids (checkpoints) remembered, ``consumed`` groups removed from the
  store; a checkpoint's ``state`` (cursor, started, leases, re-issue queue, trainer version, batch
  in transit) replaces the control state, and every later record's ``changes`` (what its loop
  iteration changed, ``CreditLedger.take_changes``) apply on top. A control record is written after
  the records of its loop iteration, so it already reflects them; if the process died between a
  group record and the next control record, the group record alone closes its lease, which is
  exactly what had happened.

The ledger and the store are filled in place; the rest comes back in ``Replayed`` for the service
to take: the trainer version, the ids seen, the batch in transit (it leaves the store again, and
the trainer's next request says whether it arrived), the groups the filters now refuse, and the
group records that no longer decode (written by another protocol version). Those are dropped as
``unreadable`` by the service, as a damaged record is at hand-out: marked consumed (so they stop
pinning their segment against compaction) and, where the replayed state still holds their lease
(``group_id = f"{server_id}-{lease_id}"``), their prompt re-issued. A later start finds the mark
and does not drop them twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from areal_like.protocol import ProtocolError, TrajectoryGroup, decode
from buffer.credits import CreditLedger
from buffer.replay_buffer import ReplayBuffer
from buffer.wal import Record, WalRef, WriteAheadLog


@dataclass(slots=True)
class Unreadable:
    """A group record that no longer decodes, with what dropping it must give back."""
    group_id: str
    ref: WalRef
    lease_id: str | None  # its lease, if still outstanding in the replayed state (else no prompt to give back)
    prompt_index: int = -1
    epoch: int = -1


@dataclass(slots=True)
class Replayed:
    version: int = 0
    seen: dict[str, None] = field(default_factory=dict)  # accepted group ids, oldest first
    in_transit: list | None = None  # ``Handout.record()`` as last logged
    filtered: dict[str, str] = field(default_factory=dict)  # stored group id -> why the filters refuse it
    unreadable: dict[str, Unreadable] = field(default_factory=dict)
    records: int = 0
    groups: int = 0


def replay(wal: WriteAheadLog, ledger: CreditLedger, store: ReplayBuffer, log: logging.Logger) -> Replayed:
    out = Replayed()
    for rec in wal.replay():
        out.records += 1
        if rec.kind == "G":
            _group(rec, ledger, store, out, log)
            continue
        control = rec.control
        out.seen.update(dict.fromkeys(control.get("seen", ())))
        for gid in control.get("consumed", ()):
            store.pop(gid)
            out.unreadable.pop(gid, None)  # dropped by an earlier start
        if "state" in control:  # a checkpoint
            ledger.load_state(control["state"])
            out.version, out.in_transit = control["state"]["version"], control["state"].get("in_transit")
        elif "changes" in control:  # what the iteration that wrote it changed
            ledger.apply_changes(control["changes"])
            out.version, out.in_transit = control["changes"]["version"], control["changes"]["in_transit"]
    return out


def _group(rec: Record, ledger: CreditLedger, store: ReplayBuffer, out: Replayed, log: logging.Logger) -> None:
    try:
        group = decode(rec.frame)
    except ProtocolError as e:  # written by another protocol version: cannot be served
        log.warning("wal: group %s no longer decodes (%s)", rec.group_id, e)
        _, _, lease_id = rec.group_id.rpartition("-")
        lease = ledger.leases.get(lease_id)
        if lease is not None and f"{lease.server_id}-{lease_id}" == rec.group_id:
            out.unreadable[rec.group_id] = Unreadable(rec.group_id, rec.ref, lease_id, lease.prompt_index, lease.epoch)
        else:
            out.unreadable[rec.group_id] = Unreadable(rec.group_id, rec.ref, None)
        return
    assert isinstance(group, TrajectoryGroup)
    out.seen[group.group_id] = None
    ledger.fulfil(group.lease_id)
    if (why := store.filter_reason(group)) is not None:
        out.filtered[group.group_id] = why
    store.add(group, len(rec.frame), ref=rec.ref)  # read back from the WAL at hand-out
    out.groups += 1
