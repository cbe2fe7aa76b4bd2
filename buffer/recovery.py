"""Rebuild the buffer's state from its write-ahead log at start.

Replay applies the records in the order they were written:

* ``G`` (an accepted group): remembered for dedupe, its lease closed, stored;
* ``C`` (control): ``seen`` ids (checkpoints) remembered, ``consumed`` groups removed from the
  store, ``state`` (cursor, started, leases, re-issue queue, trainer version) replaces the small
  state. A state record is written after the records of its loop iteration, so it already
  reflects them; if the process died between a group record and the next state record, the group
  record alone closes its lease, which is exactly what had happened.

The last state's ``in_transit`` batch (handed to the trainer, not yet acknowledged) leaves the
store again: the trainer's next request says whether it arrived (``handout.py``).

Then a fresh segment is opened with a checkpoint of the recovered state, and groups that are stale
at the recovered version (or fail the filters) are dropped and logged. Restored leases get a full
timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from areal_like.protocol import ProtocolError, TrajectoryGroup, decode

if TYPE_CHECKING:
    from buffer.service import BufferService


def recover(svc: BufferService) -> None:
    groups = records = 0
    in_transit = None
    filtered: dict[str, str] = {}  # group id -> why the filters refuse it
    for rec in svc.wal.replay():
        records += 1
        if rec.kind == "G":
            try:
                group = decode(rec.frame)
            except ProtocolError as e:  # written by an older protocol version: cannot be served
                svc.log.error("wal: group %s no longer decodes (%s); skipped", rec.group_id, e)
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
        if "state" in control:
            svc.ledger.load_state(control["state"])
            svc.version = control["state"]["version"]
            in_transit = control["state"].get("in_transit")
    svc._restore_in_transit(in_transit)
    # Drops must land in the same record as their returned slots (a checkpoint that already counts
    # them while the groups are still unconsumed in the log would return the slots twice).
    svc.wal.open(svc.checkpoint())
    svc._drop(svc.store.drop_stale(svc.version), "stale")
    for gid, why in filtered.items():  # filtered but died before its drop was logged (or config changed)
        if (stored := svc.store.remove(gid)) is not None:
            svc._drop([stored], why)
    svc._persist_and_reply()
    if records:
        svc.log.info("recovered %d WAL records (%d group records, %d stored now, %d of them in transit, "
                     "%d corrupt skipped)", records, groups, len(svc.store) + svc._in_transit_groups(),
                     svc._in_transit_groups(), svc.wal.corrupt_records)
