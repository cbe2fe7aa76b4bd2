"""Rebuild the buffer's state from its write-ahead log at start.

Replay applies the records in the order they were written:

* ``G`` (an accepted group): remembered for dedupe, its lease closed, stored;
* ``C`` (control): ``seen`` ids (checkpoints) remembered, ``consumed`` groups removed from the
  store; a checkpoint's ``state`` (cursor, started, leases, re-issue queue, trainer version,
  batch in transit) replaces the control state, and every later record's ``changes`` (what its
  loop iteration changed, ``CreditLedger.take_changes``) are applied on top. A control record is
  written after the records of its loop iteration, so it already reflects them; if the process
  died between a group record and the next control record, the group record alone closes its
  lease, which is exactly what had happened.

The last control record's ``in_transit`` batch (handed to the trainer, not yet acknowledged) leaves the
store again: the trainer's next request says whether it arrived (``handout.py``).

Then a fresh segment is opened with a checkpoint of the recovered state, and groups that are stale
at the recovered version (or fail the filters) are dropped and logged. Restored leases get a full
timeout.

A group record that no longer decodes (written by another protocol version) is dropped as
``unreadable``, as a damaged record is at hand-out (``handout.py``): its prompt is re-issued (the
lease id in its group id names the prompt, from the state replayed so far) and it is marked
consumed, so it no longer pins its segment against compaction. A later start finds that mark and
does not drop it twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from areal_like.protocol import ProtocolError, TrajectoryGroup, decode
from buffer.credits import Lease
from buffer.wal_format import Record, WalRef

if TYPE_CHECKING:
    from buffer.service import BufferService


@dataclass(slots=True)
class _Unreadable:
    """What ``BufferService._drop`` needs of a group whose record no longer decodes."""
    group_id: str
    prompt_index: int
    epoch: int


def recover(svc: BufferService) -> None:
    groups = records = 0
    in_transit = None
    filtered: dict[str, str] = {}  # group id -> why the filters refuse it
    unreadable: dict[str, tuple[Lease | None, WalRef]] = {}  # group id -> its lease so far, its record
    for rec in svc.wal.replay():
        records += 1
        if rec.kind == "G":
            try:
                group = decode(rec.frame)
            except ProtocolError as e:  # written by an older protocol version: cannot be served
                svc.log.warning("wal: group %s no longer decodes (%s)", rec.group_id, e)
                unreadable[rec.group_id] = _lease_of(svc, rec)
                continue
            assert isinstance(group, TrajectoryGroup)
            svc.seen[group.group_id] = None
            svc.ledger.fulfil(group.lease_id)
            if (why := svc.store.filter_reason(group)) is not None:
                filtered[group.group_id] = why
            svc.store.add(group, len(rec.frame), ref=rec.ref)  # read back from the WAL at hand-out
            groups += 1
            continue
        control = rec.control
        svc.seen.update(dict.fromkeys(control.get("seen", ())))
        for gid in control.get("consumed", ()):
            svc.store.remove(gid)
            unreadable.pop(gid, None)  # dropped by an earlier start
        if "state" in control:  # a checkpoint (or any control record of a version before change records)
            svc.ledger.load_state(control["state"])
            svc.version = control["state"]["version"]
            in_transit = control["state"].get("in_transit")
        elif "changes" in control:  # what the iteration that wrote it changed
            svc.ledger.apply_changes(control["changes"])
            svc.version = control["changes"]["version"]
            in_transit = control["changes"]["in_transit"]
    svc._restore_in_transit(in_transit)
    # Drops must land in the same record as their returned slots (a checkpoint that already counts
    # them while the groups are still unconsumed in the log would return the slots twice).
    svc.wal.open(svc.checkpoint())
    svc._drop(svc.store.drop_stale(svc.version), "stale")
    _drop_unreadable(svc, unreadable)
    for gid, why in filtered.items():  # filtered but died before its drop was logged (or config changed)
        if (stored := svc.store.remove(gid)) is not None:
            svc._drop([stored], why)
    svc._persist_and_reply()
    if unreadable:  # their consumed marks are written: their segments may go now, not at the next rotation
        svc.wal.wait_durable()
        svc.wal.compact()
    if records:
        svc.log.info("recovered %d WAL records (%d group records, %d stored now, %d of them in transit, "
                     "%d corrupt skipped)", records, groups, len(svc.store) + svc._in_transit_groups(),
                     svc._in_transit_groups(), svc.wal.corrupt_records)


def _lease_of(svc: BufferService, rec: Record) -> tuple[Lease | None, WalRef]:
    """The lease of a group record that does not decode (``group_id = f"{server_id}-{lease_id}"``)."""
    assert rec.ref is not None
    _, _, lease_id = rec.group_id.rpartition("-")
    lease = svc.ledger.leases.get(lease_id)
    return (lease if lease is not None and f"{lease.server_id}-{lease_id}" == rec.group_id else None), rec.ref


def _drop_unreadable(svc: BufferService, unreadable: dict[str, tuple[Lease | None, WalRef]]) -> None:
    """Drop (consumed mark, counter, slot and prompt back) what no earlier start dropped already."""
    for gid, (lease, ref) in unreadable.items():
        svc.log.error("wal %s: group %s at offset %d no longer decodes: dropped as unreadable%s", ref.segment_name,
                      gid, ref.offset, "" if lease else "; its lease is unknown, so its prompt is not re-issued")
        if lease is None:  # no slot or prompt to give back: only the mark and the count
            svc._consumed.append(gid)
            svc._count("groups_dropped", reason="unreadable")
            continue
        svc.ledger.fulfil(lease.lease_id)  # still open if the process died before its control record
        svc._drop([_Unreadable(gid, lease.prompt_index, lease.epoch)], "unreadable")
