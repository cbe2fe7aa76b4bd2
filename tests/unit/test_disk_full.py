"""Disk full is a degraded mode (buffer/diskspace.py, buffer/wal.py); statvfs, writev faked."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time

import pytest
from service_harness import answer, start, step

import buffer.diskspace
from areal_like.net.metrics import Metrics, MetricsServer
from areal_like.settings.config import BufferConfig
from areal_like.wire import protocol as P
from buffer.diskspace import MIN_SEGMENT_BYTES, DiskGuard
from buffer.service import BufferService
from buffer.wal import DiskFull, WriteAheadLog
from launch.top import status

RESERVE = 1 << 20


class _Disk:  # the free space statvfs would report
    def __init__(self, free: int):
        self.free = free

    def __call__(self, _path) -> int:
        return self.free


def _start(tmp_path, disk: _Disk, fsync: str = "always") -> BufferService:
    def guard(svc: BufferService) -> None:
        svc.disk = DiskGuard(svc.wal.dir, RESERVE, free_bytes=disk, log=svc.log)
    return start(tmp_path, BufferConfig(max_staleness=4, groups_per_step=2, max_inflight=16,
                                        capacity=64, fsync=fsync, wal_reserve_bytes=RESERVE),
                 before_recover=guard)


def _step(svc: BufferService, msg: P.Message) -> P.Message:
    return step(svc, msg, peer=b"trainer-ws-t")


def _send(svc: BufferService, msg: P.Message, peer: bytes = b"trainer-ws-t") -> None:
    """Hands ``msg`` to the service without settling it (its reply may wait)."""
    frame = P.encode(msg)
    svc.handle(peer, b"req", P.decode(frame), frame)


def _granted(svc: BufferService, n: int) -> list[P.TrajectoryGroup]:
    """Registers server "s" and answers the n credits it is granted."""
    _step(svc, P.Register(server_id="s", engine_url="http://x", policy_version=0))
    return [answer(c) for c in _step(svc, P.CreditRequest(server_id="s", max_credits=n)).credits]


def test_a_full_disk_refuses_groups_keeps_handing_out_batches_and_resumes(tmp_path, capsys):
    disk = _Disk(100 * RESERVE)
    svc = _start(tmp_path / "buffer", disk)
    groups = _granted(svc, 3)
    assert [_step(svc, g).status for g in groups[:2]] == ["accepted", "accepted"]
    disk.free = RESERVE - 1  # another writer filled the disk
    svc.settle()  # a sweep reads the free space
    ack = _step(svc, groups[2])
    assert (ack.status == "unavailable" and ack.reason.startswith("disk_full")
            and "wal_reserve_bytes" in ack.reason)
    assert svc.health()[1]["degraded"].startswith("disk_full")
    srv = MetricsServer(Metrics(), 0, "127.0.0.1", health=svc.health)
    try:  # the status tool says it is up but refuses new groups
        (tmp_path / "ports.json").write_text(json.dumps({"daemons": [{
            "name": "buffer", "kind": "buffer", "pid": None,
            "metrics_url": f"http://127.0.0.1:{srv.port}/metrics",
            "health_url": f"http://127.0.0.1:{srv.port}/health"}]}))
        assert status(tmp_path) == 0
        line = capsys.readouterr().out.splitlines()[0].split()
        assert line[:2] == ["buffer", "up"] and "refusing new groups: disk_full:" in " ".join(line)
    finally:
        srv.stop()
    more = _step(svc, P.CreditRequest(server_id="s", max_credits=3))
    assert more.credits == [] and more.reason == "disk_full"
    batch = _step(svc, P.BatchRequest(n_groups=2, trainer_version=0, wait_s=0))  # hand-out goes on
    assert sorted(g.group_id for g in batch.groups) == sorted(g.group_id for g in groups[:2])
    # above the reserve, below twice it: still degraded (no flapping)
    disk.free = int(1.5 * RESERVE)
    svc.settle()
    assert _step(svc, groups[2]).status == "unavailable"
    disk.free = 2 * RESERVE
    svc.settle()
    assert _step(svc, groups[2]).status == "accepted"  # the sender kept it; its lease is still open
    s = svc.stats()
    assert (s["groups_deferred"], s["groups_accepted"], s["disk_full"]) == (2, 3, 0)
    svc.wal.close()


def test_degraded_mode_compacts_consumed_records_without_waiting_for_a_full_segment(tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr(buffer.diskspace, "MIN_SEGMENT_BYTES", 1)
    disk = _Disk(100 * RESERVE)
    svc = _start(tmp_path, disk, fsync="batch")
    assert [_step(svc, g).status for g in _granted(svc, 2)] == ["accepted"] * 2
    batch = _step(svc, P.BatchRequest(n_groups=2, trainer_version=0, wait_s=0))
    _step(svc, P.BatchRequest(n_groups=2, trainer_version=0, wait_s=0, ack_batch=batch.batch_id))
    first = svc.wal.segments()
    disk.free = 0
    svc.settle()  # degraded: rotate now; the old segment's groups are all consumed, so it goes
    assert svc.disk.degraded and svc.wal.segments() and min(svc.wal.segments()) > max(first)
    svc.wal.close()


def test_degraded_mode_does_not_rotate_a_segment_that_holds_only_a_big_checkpoint(tmp_path):
    # a long run's dedupe checkpoint, counted as records, was written again at every rotation
    wal = WriteAheadLog(tmp_path, fsync="batch", segment_bytes=64 << 20)
    list(wal.replay())
    big = {"seen": [f"rollout-0-{i:08d}" for i in range(60_000)]}  # above MIN_SEGMENT_BYTES
    wal.open(big)
    assert wal.segment_size > MIN_SEGMENT_BYTES
    guard = DiskGuard(tmp_path, RESERVE, free_bytes=_Disk(0))
    guard.sweep(wal, lambda: big)  # the first sweep in the mode may rotate: it does not
    assert guard.degraded and wal.segments() == [1] and wal.records_size == 0
    wal.append_group("a", b"." * MIN_SEGMENT_BYTES)  # records past it: a rotation frees them
    DiskGuard(tmp_path, RESERVE, free_bytes=_Disk(0)).sweep(wal, lambda: big)
    assert wal.segments()[-1] == 2
    wal.close()


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(n, code): the next n writev write half and fail with code; returns [n left]."""
    real, fails, codes = os.writev, [0], [errno.ENOSPC]

    def writev(fd, parts):
        if fails[0] <= 0:
            return real(fd, parts)
        fails[0] -= 1
        data = b"".join(bytes(p) for p in parts)
        os.write(fd, data[:len(data) // 2])
        raise OSError(codes[0], os.strerror(codes[0]))

    monkeypatch.setattr(os, "writev", writev)

    def arm(n: int, code: int = errno.ENOSPC) -> list[int]:
        fails[0], codes[0] = n, code
        return fails
    return arm


@pytest.mark.parametrize("fsync", ["always", "batch"])
def test_enospc_mid_record_cuts_it_off_and_nothing_is_acknowledged_that_is_not_on_disk(
        tmp_path, full_disk, fsync):
    wal = WriteAheadLog(tmp_path / "wal", fsync=fsync)
    wal.open({"state": {}})
    wal.append_group("g0", b"frame-0")
    wal.wait_durable() if fsync == "always" else wal.request_sync()
    size = os.path.getsize(wal.dir / sorted(os.listdir(wal.dir))[-1])
    fails = full_disk(3)
    if fsync == "batch":  # written inline: the caller is told and refuses the record
        with pytest.raises(DiskFull):
            wal.append_group("g1", b"frame-1" * 100)
        fails[0] = 0
    else:  # the fsync thread keeps it and tries again; its ticket is not durable meanwhile
        wal.append_group("g1", b"frame-1" * 100)
        ticket, seen_full = wal.request_sync(), False
        while fails[0] > 0:
            assert wal.durable() < ticket
            seen_full = seen_full or wal.disk_full
            time.sleep(0.01)
        wal.wait_durable()
        assert seen_full or fails[0] == 0
        assert wal.durable() >= ticket and not wal.disk_full
    wal.append_group("g2", b"frame-2")
    wal.request_sync()
    wal.wait_durable()
    wal.close()
    again = WriteAheadLog(tmp_path / "wal", fsync=fsync)
    records = [r.group_id for r in again.replay() if r.kind == "G"]
    assert records == (["g0", "g1", "g2"] if fsync == "always" else ["g0", "g2"])
    # the partial writes were cut off: no torn record
    assert again.corrupt_records == 0 and size > 0
    again.close()


@pytest.mark.parametrize("fsync", ["batch", "never"])
def test_inline_control_records_wait_for_space_in_order_and_groups_are_refused_meanwhile(
        tmp_path, full_disk, fsync):
    wal = WriteAheadLog(tmp_path / "wal", fsync=fsync)
    wal.open({"state": {}})
    wal.append_group("g0", b"frame-0")
    wal.request_sync()
    fails = full_disk(4)  # the record's own write, commit's, request_sync's, wait_durable's first
    wal.append_control({"consumed": ["g0"]})  # the buffer acted on it: kept, not raised
    assert wal.disk_full and fails[0] == 3
    with pytest.raises(DiskFull):  # behind a waiting control record a group would break the order
        wal.append_group("g1", b"frame-1")
    assert wal.commit(force=True) is None and wal.disk_full and fails[0] == 2  # still full: waits
    ticket = wal.request_sync()
    assert wal.durable() < ticket and wal.disk_full and fails[0] == 1
    assert not wal.maybe_rotate(lambda: {"state": {}}, force=True)  # it belongs to this segment
    wal.wait_durable()  # tries again until it is written, whatever the fsync policy's timing
    assert wal.durable() >= ticket and not wal.disk_full and fails[0] == 0
    wal.append_group("g2", b"frame-2")
    wal.close()
    again = WriteAheadLog(tmp_path / "wal", fsync=fsync)
    records = [(r.kind, r.group_id or r.control.get("consumed")) for r in again.replay()
               if r.kind == "G" or "consumed" in r.control]
    assert records == [("G", "g0"), ("C", ["g0"]), ("G", "g2")] and again.corrupt_records == 0
    again.close()


def test_records_waiting_for_room_that_statvfs_does_not_see_keep_the_mode_and_one_line(
        tmp_path, full_disk, caplog):
    wal = WriteAheadLog(tmp_path / "wal", fsync="batch")
    wal.open({"state": {}})
    guard = DiskGuard(wal.dir, RESERVE, free_bytes=_Disk(100 * RESERVE))
    fails = full_disk(10 ** 6, errno.EDQUOT)
    wal.append_control({"consumed": ["g0"]})  # kept, waiting for room
    for _ in range(5):
        guard.sweep(wal, lambda: {"state": {}})
    assert guard.degraded
    lines = [r.getMessage() for r in caplog.records if r.name == "buffer.diskspace"]
    assert len(lines) == 1 and "seg-" in lines[0] and "(EDQUOT)" in lines[0], lines
    fails[0] = 0
    wal.request_sync()  # the waiting records are written
    guard.sweep(wal, lambda: {"state": {}})
    assert not guard.degraded
    wal.close()


class _KillAtEverySend:
    """ROUTER stand-in: at each reply, recovers a buffer from a kill -9 copy of the WAL."""

    def __init__(self, svc: BufferService, tmp_path, disk: _Disk, fails: list[int]):
        self.svc, self.tmp_path, self.disk, self.fails = svc, tmp_path, disk, fails
        self.sent: list[tuple[P.Message, BufferService]] = []

    def send(self, peer, req_id, msg):
        run_dir = self.tmp_path / f"killed-{len(self.sent)}"
        shutil.copytree(self.svc.wal.dir, run_dir / self.svc.wal.dir.relative_to(self.tmp_path))
        fails, self.fails[0] = self.fails[0], 0  # the restarted buffer's disk has room
        try:
            restarted = _start(run_dir, self.disk, fsync=self.svc.cfg.fsync)
            restarted.wal.close()
        finally:
            self.fails[0] = fails
        self.sent.append((msg, restarted))

    def close(self):
        pass


@pytest.mark.parametrize("fsync", ["batch", "never"])  # both promise that a reply survives kill -9
def test_replies_wait_for_their_control_record_while_it_waits_for_disk_space(
        tmp_path, full_disk, fsync):
    disk = _Disk(100 * RESERVE)
    svc = _start(tmp_path, disk, fsync=fsync)
    groups = _granted(svc, 3)
    assert [_step(svc, g).status for g in groups[:2]] == ["accepted"] * 2
    first = _step(svc, P.BatchRequest(n_groups=1, trainer_version=0, wait_s=0))
    fails = full_disk(10 ** 6)  # full: estimate had room
    svc.server = sink = _KillAtEverySend(svc, tmp_path, disk, fails)
    # the batch request's consumed mark and hand-out, the credits' leases: each waits for room
    for msg in (P.BatchRequest(n_groups=1, trainer_version=0, wait_s=0, ack_batch=first.batch_id),
                P.CreditRequest(server_id="s", max_credits=2)):
        _send(svc, msg)
        svc.settle()
    assert svc.wal.disk_full and svc.disk.degraded and sink.sent == []  # degraded, not stopped
    _send(svc, groups[2], b"s")  # refused at once: it depends on nothing
    assert [msg.status for msg, _ in sink.sent] == ["unavailable"]
    fails[0] = 0  # space is back: the waiting records are written, then the replies leave
    svc.settle()
    _, (batch, at_batch), (credits, at_credits) = sink.sent
    assert len(batch.groups) == 1 and len(credits.credits) == 2
    held = at_batch.handout.in_transit
    assert [held is not None and held.batch_id == batch.batch_id, at_batch.ledger.consumed == 1,
            {c.lease_id for c in credits.credits} <= set(at_credits.ledger.leases)] == [True] * 3
    svc.wal.close()


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_a_rotation_whose_checkpoint_waits_for_room_keeps_the_segments_it_supersedes(
        tmp_path, full_disk, fsync):
    wal = WriteAheadLog(tmp_path / "wal", fsync=fsync)
    list(wal.replay())
    wal.open({"state": {"cursor": 1}})
    wal.append_control({"changes": {"cursor": 2}})
    wal.request_sync()
    wal.wait_durable()
    fails = full_disk(2)  # the new checkpoint's write and the rotation's commit of it
    assert wal.maybe_rotate(lambda: {"state": {"cursor": 2}}, force=True) and wal.disk_full
    killed = tmp_path / "killed"
    shutil.copytree(wal.dir, killed)
    after = WriteAheadLog(killed, fsync=fsync)
    cursors = [r.control.get("state", r.control.get("changes"))["cursor"] for r in after.replay()
               if r.kind == "C"]
    assert cursors[-1:] == [2], cursors
    after.close()
    fails[0] = 0
    wal.close()


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_a_stop_on_a_full_disk_does_not_wait_for_space(tmp_path, full_disk, fsync):
    """SIGTERM with a reply waiting for room stops the buffer, the reply unsent."""
    svc = _start(tmp_path, _Disk(100 * RESERVE), fsync=fsync)
    _step(svc, P.Register(server_id="s", engine_url="http://x", policy_version=0))
    fails = full_disk(10 ** 9)
    sent = len(svc.server.sent)
    _send(svc, P.CreditRequest(server_id="s", max_credits=2), b"s")
    svc.settle()  # the Credits wait for their leases' record, which waits for room
    stopper = threading.Thread(target=svc.stop, daemon=True)
    stopper.start()
    stopper.join(timeout=60)
    stuck = stopper.is_alive()
    fails[0] = 0  # lets a stuck stop finish
    stopper.join(timeout=60)
    assert not stuck and len(svc.server.sent) == sent  # nothing left that was not durable
    again = WriteAheadLog(tmp_path / "wal", fsync=fsync)
    assert again.corrupt_records == 0 and list(again.replay())
    again.close()
