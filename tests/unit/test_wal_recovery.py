"""Recovery after WAL damage (real segment files): a damaged control record is restored from the
copy the next one carries; two in a row lose the first, counted and logged; the start goes on."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory
from buffer.credits import CreditLedger
from buffer.recovery import replay
from buffer.replay_buffer import ReplayBuffer
from buffer.staleness import StalenessPolicy
from buffer.wal import HEADER, WriteAheadLog, segment_path

LOG = logging.getLogger("test.recovery")


def _changes(requeued=(), dequeued=0, consumed=0) -> dict:
    return {"changes": {"cursor": [10, 0], "started": 10, "consumed": consumed, "next_lease": 10,
                        "granted": [], "closed": [], "requeued": [list(p) for p in requeued],
                        "dequeued": dequeued, "version": 0, "in_transit": None}}


def _state(leases=(), reissue=()) -> dict:
    return {"cursor": [10, 0], "started": 10, "consumed": 0, "next_lease": 10,
            "leases": list(leases), "reissue": list(reissue), "version": 0, "in_transit": None}


def _open(path, state: dict, **kw) -> WriteAheadLog:
    """A WAL in `path` (replayed, as a start does) opened with a checkpoint of `state`."""
    wal = WriteAheadLog(path, **kw)
    list(wal.replay())
    wal.open({"state": state, "seen": []})
    return wal


def _flip(path, segment: int, *at: int) -> None:
    """Flips one bit of each byte `at` (an index into the segment file, negative from its end)."""
    data = bytearray(segment_path(path, segment).read_bytes())
    for i in at:
        data[i] ^= 0x40
    segment_path(path, segment).write_bytes(bytes(data))


def _write(path) -> list[int]:
    """A checkpoint, then records 1-4 (requeue 5, consume g1, take 5, consume g2); offsets."""
    wal = _open(path, _state())
    for record in (_changes(requeued=[(5, 0)]), {**_changes(consumed=1), "consumed": ["g1"]},
                   _changes(dequeued=1, consumed=1), {**_changes(consumed=2), "consumed": ["g2"]}):
        wal.append_control(record)
    wal.close()
    data, offsets = segment_path(path, 1).read_bytes(), [0]
    while (end := offsets[-1] + HEADER.size + HEADER.unpack_from(data, offsets[-1])[0]) < len(data):
        offsets.append(end)
    assert len(offsets) == 5
    return offsets


def _damage(path, offsets: list[int], *which: int) -> None:
    _flip(path, 1, *(offsets[k] + HEADER.size + 5 for k in which))  # inside record k's payload


def _recover(path):
    ledger = CreditLedger(StalenessPolicy(100, 2, 1000), 1000, lease_timeout_s=60,
                          clock=time.monotonic)
    store = ReplayBuffer(StalenessPolicy(100, 2, 1000), capacity=1000)
    wal = WriteAheadLog(path)
    got = replay(wal, ledger, store, LOG)
    wal.close()
    return got, ledger, store


@pytest.mark.parametrize("damaged, restored, lost, says", [
    *(((k,), 1, 0, f"control record {k} before segment 1's record {k + 1} was damaged: restored")
      for k in (1, 2, 3)),
    # the re-queue of prompt 5 is lost; record 3 takes it (not fatal)
    ((1, 2), 1, 1, "1 control records after record 0 were damaged beyond repair"),
    # no record carries a copy of the oldest checkpoint: lost, the records after it apply
    ((0,), 0, 1, "damaged beyond repair"),
])
def test_damaged_control_records_are_restored_from_the_next_or_lost(tmp_path, caplog, damaged,
                                                                    restored, lost, says):
    _damage(tmp_path, _write(tmp_path), *damaged)
    with caplog.at_level(logging.WARNING, logger="test.recovery"):
        got, ledger, _ = _recover(tmp_path)
    assert (got.damaged, got.restored, got.lost_control) == (1, restored, lost)
    # as if nothing had been damaged
    assert ledger.consumed == 2 and list(ledger.reissue) == [] and ledger.next_index == 10
    assert any(says in m for m in caplog.messages), caplog.messages


def _frame(gid: str) -> bytes:
    t = Trajectory.of(prompt_ids=[7, 8], output_ids=[1, 2], behav_logp=np.full(2, -1.0, np.float32),
                      versions=[0, 0], reward=1.0, finish_reason="stop")
    lease = gid.rpartition("-")[2]
    return P.encode(P.TrajectoryGroup(group_id=gid, server_id="s0", lease_id=lease, prompt_index=0,
                                      epoch=0, trajectories=[t, t]))


@pytest.mark.parametrize("opened_by", ["rotation", "restart"])
def test_the_last_control_record_of_a_segment_is_restored_from_the_next_checkpoint(tmp_path,
                                                                                   opened_by):
    """Segment 2, opened by a rotation or a restart, starts with a checkpoint carrying segment 1's
    last record (it consumed g1): damage to that record loses nothing."""
    state = _state()
    wal = _open(tmp_path, state, segment_bytes=1 if opened_by == "rotation" else 1 << 20)
    for gid in ("s0-g1", "s0-g2"):
        wal.append_group(gid, _frame(gid))
    wal.append_control({**_changes(consumed=1), "consumed": ["s0-g1"]})
    if opened_by == "rotation":
        wal.commit()
        assert wal.maybe_rotate(lambda: {"state": state, "seen": []})
        wal.close()
    else:
        wal.close()
        wal = _open(tmp_path, state)
        wal.close()
    assert wal.segments() == [1, 2]
    _flip(tmp_path, 1, -3)  # inside the last record of segment 1: the control record
    got, _, store = _recover(tmp_path)
    assert (got.damaged, got.restored, got.lost_control) == (1, 1, 0)
    assert "s0-g2" in store and "s0-g1" not in store  # g1 stays consumed


def test_a_damaged_group_at_the_tail_of_an_older_segment_is_dropped_and_its_prompt_reissued(
        tmp_path):
    """A damaged group ending an older segment is reported unreadable with its lease (its prompt
    is re-issued), as one mid-segment is."""
    # lease g2 (prompt 7, epoch 0) of server s0: group s0-g2
    state = _state(leases=[["g2", 7, 0, "s0"]])
    wal = _open(tmp_path, state, segment_bytes=1)
    wal.append_group("s0-g2", _frame("s0-g2"))
    wal.commit()
    closed = {**state, "leases": []}  # the group was accepted: its lease is closed
    assert wal.maybe_rotate(lambda: {"state": closed, "seen": ["s0-g2"]})
    wal.close()
    _flip(tmp_path, 1, -3)  # inside s0-g2's frame: its id still reads
    got, _, store = _recover(tmp_path)
    assert got.damaged == 1 and "s0-g2" not in store
    assert "s0-g2" in got.unreadable, got.unreadable
    u = got.unreadable["s0-g2"]
    assert (u.lease_id, u.prompt_index, u.epoch) == ("g2", 7, 0)


def test_damage_taking_a_later_segments_checkpoint_and_next_record_restores_that_record(tmp_path):
    """Record numbers count within a segment: segment 2's damaged checkpoint and record 1 (it
    consumed g1; segment 1 ends at record 3) lose the checkpoint, and record 2 restores record 1."""
    state = _state()
    wal = _open(tmp_path, state, segment_bytes=1)
    for gid in ("s0-g1", "s0-g2"):
        wal.append_group(gid, _frame(gid))
    for _ in range(3):
        wal.append_control(_changes())
    wal.commit()
    assert wal.maybe_rotate(lambda: {"state": state, "seen": []})
    wal.append_control({**_changes(consumed=1), "consumed": ["s0-g1"]})
    wal.append_control(_changes(consumed=1))
    wal.close()
    assert wal.segments() == [1, 2]
    second = HEADER.size + HEADER.unpack_from(segment_path(tmp_path, 2).read_bytes(), 0)[0]
    _flip(tmp_path, 2, HEADER.size + 5, second + HEADER.size + 5)  # second: record 1's offset
    got, _, store = _recover(tmp_path)
    assert (got.damaged, got.restored, got.lost_control) == (1, 1, 1)
    assert "s0-g2" in store and "s0-g1" not in store  # g1 stays consumed
