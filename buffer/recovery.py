"""Rebuild the buffer's durable state from its write-ahead log at start (``replay``; WAL.md,
Recovery). The ledger and the store are filled in place; the rest comes back in ``Replayed``.

Invariants: a WAL of another protocol version refuses the start; damage loses the damaged group
alone (dropped as ``unreadable``); a damaged control record is restored from the next one's copy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import msgspec

from areal_like.daemon import StartRefused
from areal_like.wire.protocol import ProtocolError, TrajectoryGroup, decode
from buffer.credits import CreditLedger
from buffer.replay_buffer import ReplayBuffer
from buffer.wal import Record, WalRef, WriteAheadLog


class WalOfAnotherBuild(StartRefused):
    """The WAL holds groups of another protocol version: the buffer does not start over it."""


@dataclass(slots=True)
class Unreadable:
    """A group record that no longer decodes, with what dropping it must give back."""
    group_id: str
    ref: WalRef
    # its lease, if still outstanding in the replayed state (else no prompt to give back)
    lease_id: str | None
    prompt_index: int = -1
    epoch: int = -1


@dataclass(slots=True)
class Replayed:
    version: int = 0
    seen: dict[str, None] = field(default_factory=dict)  # accepted group ids, oldest first
    in_transit: list | None = None  # ``Handout.record()`` as last logged
    # stored group id -> why the filters refuse it
    filtered: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, Unreadable] = field(default_factory=dict)
    records: int = 0
    groups: int = 0
    damaged: int = 0  # damaged regions skipped (wal.py)
    restored: int = 0  # damaged control records restored from the next one's copy
    lost_control: int = 0  # damaged control records that could not be restored


def replay(wal: WriteAheadLog, ledger: CreditLedger, store: ReplayBuffer,
           log: logging.Logger) -> Replayed:
    out = Replayed()
    # the last control record's number and segment; damage since
    last_n, last_segment, damaged = None, None, False
    for rec in wal.replay():
        out.records += 1
        if rec.kind == "G":
            _group(rec, ledger, store, out, log)
            continue
        if rec.kind == "D":
            out.damaged, damaged = out.damaged + 1, True
            if rec.group_id:
                _unreadable(rec.group_id, rec.ref, ledger, out)
            continue
        if damaged:  # numbers count within a segment: a record of a new one that is not its
            # checkpoint follows damage that took the checkpoint (-1: nothing of it was read)
            same = rec.segment == last_segment or rec.control.get("checkpoint")
            _after_damage(rec.control, last_n if same else -1, rec.segment, ledger, store, out, log)
        damaged, last_n, last_segment = False, rec.control.get("n"), rec.segment
        _control(rec.control, ledger, store, out)
    return out


def _after_damage(control: dict, last_n: int | None, segment: int, ledger: CreditLedger,
                  store: ReplayBuffer, out: Replayed, log: logging.Logger) -> None:
    """The first control record after damage: restore the last one the damage took from its copy
    (``prev``); count any before that as lost."""
    prev = msgspec.msgpack.decode(control["prev"]) if control.get("prev") else None
    if prev is not None:
        through = prev.get("n")
    else:  # a checkpoint without a copy: how many the previous segment lost is not known
        through = None if control.get("checkpoint") else control.get("n", 0) - 1
    if last_n is None or through is None or through <= last_n or "n" not in control:
        return  # the damage took group records only (or the records are not numbered)
    if prev is not None:
        log.warning("wal: control record %d before segment %d's record %d was damaged: restored "
                    "from the copy in the next one", through, segment, control.get("n", 0))
        _control(prev, ledger, store, out)
        out.restored, through = out.restored + 1, through - 1
    if through > last_n:
        out.lost_control += through - last_n
        where = f"after record {last_n}" if last_n >= 0 else f"of segment {segment}"
        log.error("wal: %d control records %s were damaged beyond repair: the consumed marks, "
                  "leases and re-issues they held are lost (groups they consumed may be handed "
                  "out again)", through - last_n, where)


def _control(control: dict, ledger: CreditLedger, store: ReplayBuffer, out: Replayed) -> None:
    """Apply one control record (after control records were lost, a re-issue queue shorter than a
    record takes is emptied instead of refused)."""
    out.seen.update(dict.fromkeys(control.get("seen", ())))
    for gid in control.get("consumed", ()):
        store.pop(gid)
        out.unreadable.pop(gid, None)  # dropped by an earlier start
    if "state" in control:  # a checkpoint
        state = control["state"]
        ledger.load_state(state)
        out.version, out.in_transit = state["version"], state.get("in_transit")
    elif "changes" in control:  # what the iteration that wrote it changed
        changes = control["changes"]
        if out.lost_control:
            have = len(ledger.reissue) + len(changes["requeued"])
            changes = {**changes, "dequeued": min(changes["dequeued"], have)}
        ledger.apply_changes(changes)
        # a restored copy has no in_transit: the record that carried it sets it next
        out.version, out.in_transit = changes["version"], changes.get("in_transit", out.in_transit)


def _group(rec: Record, ledger: CreditLedger, store: ReplayBuffer, out: Replayed,
           log: logging.Logger) -> None:
    try:
        group = decode(rec.frame)
    except ProtocolError as e:
        if e.field == "protocol":
            raise WalOfAnotherBuild(f"the WAL holds group {rec.group_id} at {e} (segment "
                                    f"{rec.segment}): finish this run with the build that wrote "
                                    "it, or move its wal_dir away to start afresh") from None
        log.warning("wal: group %s no longer decodes (%s)", rec.group_id, e)
        _unreadable(rec.group_id, rec.ref, ledger, out)
        return
    assert isinstance(group, TrajectoryGroup)
    out.seen[group.group_id] = None
    ledger.fulfil(group.lease_id)
    if (why := store.filter_reason(group)) is not None:
        out.filtered[group.group_id] = why
    store.add(group, len(rec.frame), ref=rec.ref)  # read back from the WAL at hand-out
    out.groups += 1


def _unreadable(group_id: str, ref: WalRef, ledger: CreditLedger, out: Replayed) -> None:
    """A group record that cannot be served: dropped at start (its prompt re-issued if leased)."""
    _, _, lease_id = group_id.rpartition("-")
    lease = ledger.leases.get(lease_id)
    if lease is not None and f"{lease.server_id}-{lease_id}" == group_id:
        out.unreadable[group_id] = Unreadable(group_id, ref, lease_id, lease.prompt_index,
                                              lease.epoch)
    else:
        out.unreadable[group_id] = Unreadable(group_id, ref, None)
