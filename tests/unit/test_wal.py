"""WriteAheadLog: round trip, consumed marks, compaction, torn and corrupt tails."""

from __future__ import annotations

import logging
import os

import pytest

from buffer.wal import WalFailed, WalInUse, WriteAheadLog, _segment_path


def replay(path, **kw) -> tuple[WriteAheadLog, list]:
    wal = WriteAheadLog(path, **kw)
    return wal, [(r.kind, r.group_id, r.frame, r.control) for r in wal.replay()]


def test_round_trip_in_order(tmp_path):
    wal = WriteAheadLog(tmp_path)
    list(wal.replay())
    wal.open({"state": {"v": 0}})
    wal.append_group("g1", b"frame-1")
    wal.append_control({"consumed": ["g1"], "state": {"v": 1}})
    wal.append_group("g2", b"\x00" * 1000)
    wal.commit()
    assert wal.commit() is None  # nothing new: no second fsync
    wal.close()
    _, recs = replay(tmp_path)
    assert recs == [("C", "", b"", {"state": {"v": 0}, "checkpoint": True}), ("G", "g1", b"frame-1", None),
                    ("C", "", b"", {"consumed": ["g1"], "state": {"v": 1}}), ("G", "g2", b"\x00" * 1000, None)]


def test_every_start_opens_a_new_segment(tmp_path):
    wal = WriteAheadLog(tmp_path)
    list(wal.replay())
    wal.open({"n": 0})
    wal.append_group("live", b"...")
    wal.close()
    for i in (1, 2):
        wal = WriteAheadLog(tmp_path)
        assert [r.group_id for r in wal.replay() if r.kind == "G"] == ["live"]
        wal.open({"n": i})
        wal.close()
    # segment 2 holds only a checkpoint, but only a prefix is compacted and segment 1 holds "live"
    assert WriteAheadLog(tmp_path).segments() == [1, 2, 3]
    wal = WriteAheadLog(tmp_path)
    list(wal.replay())
    wal.open({"n": 3})
    wal.append_control({"consumed": ["live"]})
    assert wal.compact() == [1, 2, 3] and wal.segments() == [4]
    wal.close()


@pytest.mark.parametrize("damage", ["truncate_payload", "truncate_header", "flip_byte", "garbage_length"])
def test_torn_or_corrupt_tail_is_skipped_and_logged(tmp_path, damage, caplog):
    wal = WriteAheadLog(tmp_path)
    list(wal.replay())
    wal.open({})
    wal.append_group("good", b"x" * 100)
    wal.append_group("last", b"y" * 100)
    wal.close()
    path = _segment_path(tmp_path, 1)
    data = bytearray(path.read_bytes())
    size_good = len(data) - (8 + 1 + 2 + 4 + 100)  # everything before the last record
    if damage == "truncate_payload":
        data = data[:-30]
    elif damage == "truncate_header":
        data = data[:size_good + 5]
    elif damage == "flip_byte":
        data[-1] ^= 0xFF
    else:
        data[size_good:size_good + 4] = (2**31).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="buffer.wal"):
        wal2, recs = replay(tmp_path)
    assert [r[1] for r in recs if r[0] == "G"] == ["good"]  # never the damaged one
    assert wal2.corrupt_records == 1
    assert any("seg-000000000001.wal" in m and "offset" in m for m in caplog.messages)
    assert path.stat().st_size == size_good  # the torn tail of the newest segment was cut off
    wal2.open({})
    wal2.append_group("after", b"z")
    wal2.close()
    _, recs = replay(tmp_path)  # clean now; new records follow in a new segment
    assert [r[1] for r in recs if r[0] == "G"] == ["good", "after"]


def test_corruption_in_an_older_segment_skips_only_its_rest(tmp_path):
    wal = WriteAheadLog(tmp_path, segment_bytes=1)  # rotate after every commit
    list(wal.replay())
    wal.open({})
    for gid in ("a", "b"):
        wal.append_group(gid, gid.encode() * 10)
        wal.commit()
        wal.maybe_rotate(lambda: {})
    wal.close()
    first = _segment_path(tmp_path, 1)
    data = bytearray(first.read_bytes())
    data[-1] ^= 1
    first.write_bytes(bytes(data))
    _, recs = replay(tmp_path)
    assert [r[1] for r in recs if r[0] == "G"] == ["b"]
    assert first.exists()  # kept for inspection; only the newest segment's tail is truncated


def test_compaction_deletes_fully_consumed_prefix_only(tmp_path):
    wal = WriteAheadLog(tmp_path, segment_bytes=1)
    list(wal.replay())
    wal.open({})  # segment 1
    for gid in ("a", "b", "c"):  # one group per segment: 1, 2, 3; current becomes 4
        wal.append_group(gid, b"." * 50)
        wal.commit()
        wal.maybe_rotate(lambda: {"checkpoint_of": "state"})
    assert wal.segments() == [1, 2, 3, 4]
    wal.append_control({"consumed": ["b"]})  # segment 2 is clear but segment 1 is not: nothing deleted
    assert wal.compact() == [] and wal.segments() == [1, 2, 3, 4]
    wal.append_control({"consumed": ["a"]})
    assert wal.compact() == [1, 2]
    size_before = wal.disk_bytes
    wal.close()
    assert size_before == sum(p.stat().st_size for p in tmp_path.glob("seg-*.wal"))
    _, recs = replay(tmp_path)  # "c" still there, "a"/"b" gone with their segments
    assert [r[1] for r in recs if r[0] == "G"] == ["c"]


@pytest.mark.parametrize("policy", ["always", "batch", "never"])
def test_records_survive_the_process_without_close(tmp_path, policy):
    """What was committed is readable without close/fsync: writev goes straight to the kernel
    (batch, never), the direct appender writes at commit (always)."""
    wal = WriteAheadLog(tmp_path, fsync=policy)
    list(wal.replay())
    wal.open({})
    wal.append_group("g", b"payload")
    wal.commit()
    fd = wal._fd  # simulate the process vanishing: no close, no final commit
    wal._lock.release()  # the kernel drops a dead process's directory lock
    _, recs = replay(tmp_path)
    assert [r[1] for r in recs if r[0] == "G"] == ["g"]
    os.close(fd)


def test_group_commit_tickets_become_durable_in_order(tmp_path):
    wal = WriteAheadLog(tmp_path)  # fsync=always: a background thread runs the fsyncs
    list(wal.replay())
    wal.open({})
    assert wal.request_sync() == wal.durable()  # nothing appended: nothing to wait for
    wal.append_group("a", b"1")
    first = wal.request_sync()
    wal.append_group("b", b"2")
    second = wal.request_sync()
    assert second == first + 1
    wal.wait_durable()
    assert wal.durable() >= second and len(wal.fsync_seconds()) >= 1 and wal.fsync_seconds() == []
    wal.close()


def test_a_failing_fsync_is_fatal_not_silent(tmp_path, monkeypatch):
    wal = WriteAheadLog(tmp_path)
    list(wal.replay())
    wal.open({})

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("buffer.wal.os.fsync", broken_fsync)
    monkeypatch.setattr("buffer.wal.os.fdatasync", broken_fsync)  # group commit syncs data (and the size)
    wal.append_group("a", b"1")
    ticket = wal.request_sync()
    with pytest.raises(OSError, match="WAL fsync failed"):
        wal.wait_durable()
    assert wal._synced < ticket  # never reported durable
    monkeypatch.undo()
    wal._syncer = None  # the syncer thread ended with the error
    os.close(wal._fd)
    wal._fd = None


def test_group_frames_are_read_back_from_the_log_and_checked(tmp_path):
    wal = WriteAheadLog(tmp_path)
    list(wal.replay())
    wal.open({})
    refs = {gid: wal.append_group(gid, gid.encode() * 1000) for gid in ("a", "bb")}
    wal.append_control({"consumed": []})
    assert {gid: bytes(wal.read_group(ref)) for gid, ref in refs.items()} == {"a": b"a" * 1000, "bb": b"bb" * 1000}
    wal.close()
    wal2 = WriteAheadLog(tmp_path)
    replayed = {r.group_id: r.ref for r in wal2.replay() if r.kind == "G"}
    assert replayed == refs  # replay finds them where the writer put them
    assert bytes(wal2.read_group(replayed["bb"])) == b"bb" * 1000
    with _segment_path(tmp_path, 1).open("r+b") as f:  # one flipped bit in the last byte of "a"'s frame
        f.seek(refs["a"].offset + refs["a"].length - 1)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 1]))
    with pytest.raises(OSError, match="damaged"):
        wal2.read_group(refs["a"])
    wal2.close()


WAL_WITHOUT_FDATASYNC = """
import os, sys
del os.fdatasync  # as on macOS, whose os module has no fdatasync
from buffer.wal import WriteAheadLog
for policy in ("always", "batch"):
    wal = WriteAheadLog(os.path.join(sys.argv[1], policy), fsync=policy)
    list(wal.replay())
    wal.open({})
    ref = wal.append_group("a", b"frame")
    wal.request_sync()
    wal.wait_durable()
    assert bytes(wal.read_group(ref)) == b"frame"
    wal.close()
print("ok")
"""


def test_the_log_syncs_where_the_os_has_no_fdatasync(tmp_path):
    """macOS has no os.fdatasync: the log falls back to fsync instead of failing to open."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", WAL_WITHOUT_FDATASYNC, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


WAL_KILLED_MID_SEGMENT = """
import sys, time
from buffer.wal import WriteAheadLog
wal = WriteAheadLog(sys.argv[1], segment_bytes=int(sys.argv[2]))
list(wal.replay())
wal.open({})
wal.append_group("a", b"frame" * 100)
wal.request_sync()
wal.wait_durable()
print("ready", flush=True)
time.sleep(600)  # killed -9 here: the active segment keeps its block reservation
"""


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_restart_releases_the_reservation_a_crash_left_behind(tmp_path):
    """After kill -9 the segment that was active keeps its fallocate reservation (KEEP_SIZE: blocks
    past the end of the data). Replay frees it in every old segment; the new active segment gets its
    own reservation, which close frees as before."""
    import signal
    import subprocess
    import sys

    reserve = 8 << 20
    child = subprocess.Popen([sys.executable, "-c", WAL_KILLED_MID_SEGMENT, str(tmp_path), str(reserve)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    crashed = _segment_path(tmp_path, 1)
    if _allocated(crashed) < reserve:
        pytest.skip("this file system does not keep fallocate(KEEP_SIZE) reservations")
    wal = WriteAheadLog(tmp_path, segment_bytes=reserve)
    assert [r.group_id for r in wal.replay() if r.kind == "G"] == ["a"]
    assert _allocated(crashed) < 1 << 20  # the data only (a few KB), the reservation is gone
    wal.open({})
    assert wal.segment == 2 and _allocated(_segment_path(tmp_path, 2)) >= reserve  # the new active segment
    wal.append_group("b", b"frame")
    wal.close()
    assert _allocated(_segment_path(tmp_path, 2)) < 1 << 20
    _, recs = replay(tmp_path)
    assert [r[1] for r in recs if r[0] == "G"] == ["a", "b"]


# ---- direct appends (fsync=always): what a review found


def test_a_zeroed_tail_off_a_block_boundary_is_corruption_not_padding(tmp_path, caplog):
    """A direct append pads only up to a block boundary, so its zero tail always ends the file at a
    multiple of BLOCK. A buffered segment (fsync=batch/never, older versions, file systems refusing
    O_DIRECT) never has padding: a zeroed last record there (a lost write after a power failure,
    whose ack fsync=batch may already have sent) must be counted and warned about as corruption,
    not cut silently at INFO as 'padding'."""
    wal = WriteAheadLog(tmp_path, fsync="batch")
    list(wal.replay())
    wal.open({})
    wal.append_group("good", b"x" * 100)
    last = wal.append_group("last", b"y" * 100)
    wal.close()
    path = _segment_path(tmp_path, 1)
    data = bytearray(path.read_bytes())
    assert len(data) % 4096 != 0  # a buffered segment: its size is not block aligned
    data[last.offset:] = bytes(len(data) - last.offset)  # the last record reads back as zeros
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="buffer.wal"):
        wal2, recs = replay(tmp_path)
    assert [r[1] for r in recs if r[0] == "G"] == ["good"]
    assert wal2.corrupt_records == 1  # not taken for a direct append's padding
    assert any("offset" in m for m in caplog.messages)


def test_a_failed_direct_write_is_not_taken_for_a_damaged_record_at_hand_out(tmp_path, monkeypatch):
    """fsync=always, direct: a hand-out of a group still queued in the appender makes read_group
    wait for the fsync thread. When that thread's write fails (EIO), read_group raises the WAL's
    fatal WalFailed, which must stop the daemon: handout._load_all must not take it for a damaged
    record and drop the intact, accepted group as 'unreadable'."""
    import numpy as np

    from areal_like import protocol as P
    from areal_like.config import BufferConfig, RunConfig, TaskConfig
    from buffer.recovery import recover
    from buffer.service import BufferService

    class FakeServer:
        def __init__(self):
            self.sent = []

        def send(self, peer, req_id, msg):
            self.sent.append(msg)

        publish = send

        def close(self):
            pass

    cfg = RunConfig(run_dir=str(tmp_path), task=TaskConfig(num_prompts=100), buffer=BufferConfig(
        max_staleness=1, groups_per_step=2, max_inflight=16, capacity=64))
    svc = BufferService(cfg)
    recover(svc)
    if not svc.wal.direct:
        pytest.skip("this file system refuses O_DIRECT")
    svc.server, svc.publisher = FakeServer(), FakeServer()

    def handle(msg):
        frame = P.encode(msg)
        svc.handle(b"peer", b"req", P.decode(frame), frame)

    handle(P.Register(server_id="s", engine_url="http://x", policy_version=0))
    handle(P.CreditRequest(server_id="s", max_credits=2))
    svc._persist_and_reply()  # as the loop does: the credits' control record, then their reply
    svc.wal.wait_durable()
    svc._send_durable_replies()
    credits = svc.server.sent[-1].credits
    groups = []
    for c in credits:
        t = P.Trajectory.of(prompt_ids=P.as_i32([1]), output_ids=P.as_i32([2, 3]), behav_logp=P.as_f32([-1, -1]),
                         versions=P.as_i32(np.zeros(2)), reward=1.0, finish_reason="stop")
        groups.append(P.TrajectoryGroup(group_id=f"s-{c.lease_id}", server_id="s", lease_id=c.lease_id,
                                        prompt_index=c.prompt_index, epoch=c.epoch, trajectories=[t]))
    handle(groups[0])
    svc.wal.wait_durable()  # the first group is on disk

    def broken_pwrite(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("buffer.segment_io.os.pwrite", broken_pwrite)
    frame = P.encode(groups[1])
    assert svc._on_group(P.decode(frame), frame).status == "accepted"  # queued for the fsync thread
    handle(P.BatchRequest(n_groups=2, trainer_version=0, wait_s=0.0, ack_batch=""))
    try:
        with pytest.raises(WalFailed):
            svc._serve_batches()
        assert svc.counts["groups_dropped_unreadable"] == 0
    finally:
        monkeypatch.undo()
        svc.wal._syncer = None  # the syncer thread ended with the error
        os.close(svc.wal._fd)
        svc.wal._fd = None


WAL_READER_ON_FD_0 = """
import os, sys
from buffer.wal import WriteAheadLog
wal = WriteAheadLog(sys.argv[1])
list(wal.replay())
wal.open({})
assert wal.direct
ref = wal.append_group("a", b"frame")
wal.request_sync()
wal.wait_durable()
os.close(0)  # a daemon started without stdin: the next open returns descriptor 0
assert bytes(wal.read_group(ref)) == b"frame"
wal.close()
try:
    os.fstat(0)
except OSError:
    print("closed")
else:
    print("leaked", os.readlink("/proc/self/fd/0"))
"""


def test_a_reader_descriptor_numbered_0_is_kept_and_closed(tmp_path):
    """An O_DIRECT reader descriptor numbered 0 (a daemon without stdin) is used and closed like any
    other, not taken for 'none' (a leaked one would keep a compacted segment's blocks allocated)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", WAL_READER_ON_FD_0, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "closed"


def test_one_log_per_directory(tmp_path):
    """A second log on a directory that a log holds fails at once, naming the holder; closing (or
    dropping) the first lets the next one in."""
    wal = WriteAheadLog(tmp_path)
    with pytest.raises(WalInUse, match=f"in use by another buffer \\(pid {os.getpid()}\\)"):
        WriteAheadLog(tmp_path)
    wal.close()
    again = WriteAheadLog(tmp_path)
    del again  # never closed: the lock goes with the object
    WriteAheadLog(tmp_path, fsync="never").close()


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    """Where flock is not supported (ENOLCK: some network file systems) the log still opens, and
    says that nothing stops a second buffer."""
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("buffer.wal.fcntl.flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="buffer.wal"):
        wal = WriteAheadLog(tmp_path)
    assert "nothing stops a second buffer" in caplog.text
    list(wal.replay())
    wal.open({})
    wal.close()


def _signal_and_wait(running, release) -> None:
    running.set()
    release.wait(60)


def test_a_forked_child_does_not_keep_the_directory_locked(tmp_path):
    """A child forked while the log is open (multiprocessing's default on Linux) shares the lock
    file; it lets go of it at once, so the directory is free as soon as the parent closes its log."""
    import multiprocessing as mp

    wal = WriteAheadLog(tmp_path)
    ctx = mp.get_context("fork")
    running, release, child = ctx.Event(), ctx.Event(), None
    try:
        child = ctx.Process(target=_signal_and_wait, args=(running, release))
        child.start()
        assert running.wait(60)  # past the fork handlers
        wal.close()
        WriteAheadLog(tmp_path).close()  # the child is still alive and holds no lock
        assert child.is_alive()
    finally:
        release.set()
        if child is not None:
            child.join(timeout=60)
