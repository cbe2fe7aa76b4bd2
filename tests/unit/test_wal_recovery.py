"""buffer/recovery.py after WAL damage (real segment files): one damaged control record is
restored from the copy the next one carries, so its consumed marks and ledger changes hold; two in
a row lose the first, which is counted and logged, and the start goes on (a re-issue queue the
lost records filled is not taken for a fatal inconsistency)."""

from __future__ import annotations

import logging
import time

import pytest

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


def _write(path) -> list[int]:
    """A checkpoint, then control records: 1 re-queues prompt 5, 2 consumes g1, 3 takes prompt 5
    from the re-issue queue, 4 consumes g2. Returns each control record's offset (0: checkpoint)."""
    wal = WriteAheadLog(path)
    list(wal.replay())
    state = {"cursor": [10, 0], "started": 10, "consumed": 0, "next_lease": 10, "leases": [],
             "reissue": [], "version": 0, "in_transit": None}
    wal.open({"state": state, "seen": []})
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
    data = bytearray(segment_path(path, 1).read_bytes())
    for k in which:
        data[offsets[k] + HEADER.size + 5] ^= 0x40  # one flipped byte inside record k's payload
    segment_path(path, 1).write_bytes(bytes(data))


def _recover(path):
    ledger = CreditLedger(StalenessPolicy(100, 2, 1000), 1000, lease_timeout_s=60,
                          clock=time.monotonic)
    store = ReplayBuffer(StalenessPolicy(100, 2, 1000), capacity=1000)
    wal = WriteAheadLog(path)
    got = replay(wal, ledger, store, LOG)
    wal.close()
    return got, ledger


@pytest.mark.parametrize("damaged", [1, 2, 3])
def test_one_damaged_control_record_is_restored_from_the_next(tmp_path, damaged, caplog):
    offsets = _write(tmp_path)
    _damage(tmp_path, offsets, damaged)
    with caplog.at_level(logging.WARNING, logger="test.recovery"):
        got, ledger = _recover(tmp_path)
    assert (got.damaged, got.restored, got.lost_control) == (1, 1, 0)
    assert ledger.consumed == 2 and list(ledger.reissue) == []  # as if nothing had been damaged
    assert any(f"control record {damaged} before segment 1's record {damaged + 1} was damaged: "
               "restored" in m for m in caplog.messages), caplog.messages


def test_two_damaged_control_records_lose_the_first_and_the_start_goes_on(tmp_path, caplog):
    offsets = _write(tmp_path)
    _damage(tmp_path, offsets, 1, 2)  # the re-queue of prompt 5 is lost; record 3 takes it
    with caplog.at_level(logging.WARNING, logger="test.recovery"):
        got, ledger = _recover(tmp_path)
    assert (got.damaged, got.restored, got.lost_control) == (1, 1, 1)
    assert ledger.consumed == 2 and list(ledger.reissue) == []
    assert any("1 control records after record 0 were damaged beyond repair" in m
               for m in caplog.messages), caplog.messages
