"""WriteAheadLog: round trip, consumed marks, compaction, torn and corrupt tails."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import msgspec
import pytest

from buffer.wal import WalFailed, WalInUse, WriteAheadLog, segment_path


def replay(path, **kw) -> tuple[WriteAheadLog, list]:
    wal = WriteAheadLog(path, **kw)
    return wal, [(r.kind, r.group_id, r.frame, r.control) for r in wal.replay()]


def opened(path, checkpoint: dict | None = None, **kw) -> WriteAheadLog:
    wal = WriteAheadLog(path, **kw)
    list(wal.replay())
    wal.open({} if checkpoint is None else checkpoint)
    return wal


def groups(recs) -> list[str]:
    return [r[1] for r in recs if r[0] == "G"]


def test_round_trip_in_order_each_control_record_carrying_the_one_before_it(tmp_path):
    wal = opened(tmp_path, {"state": {"v": 0}})
    wal.append_group("g1", b"frame-1")
    wal.append_control({"consumed": ["g1"], "state": {"v": 1}})
    wal.append_group("g2", b"\x00" * 1000)
    wal.append_control({"consumed": ["g2"]})
    wal.commit()
    assert wal.commit() is None  # nothing new: no second fsync
    wal.close()
    _, recs = replay(tmp_path)
    # control records are numbered in their segment (the checkpoint 0), which is not copied
    first = {"consumed": ["g1"], "state": {"v": 1}, "n": 1}
    assert recs[:4] == [("C", "", b"", {"state": {"v": 0}, "checkpoint": True, "n": 0}),
                        ("G", "g1", b"frame-1", None), ("C", "", b"", first),
                        ("G", "g2", b"\x00" * 1000, None)]
    last = recs[4][3]
    assert msgspec.msgpack.decode(last.pop("prev")) == first
    assert recs[4][:3] == ("C", "", b"") and last == {"consumed": ["g2"], "n": 2} and len(recs) == 5


def test_corruption_in_an_older_segment_skips_only_its_rest(tmp_path):
    wal = opened(tmp_path, segment_bytes=1)  # rotate after every commit
    for gid in ("a", "b"):
        wal.append_group(gid, gid.encode() * 10)
        wal.commit()
        wal.maybe_rotate(lambda: {})
    wal.close()
    first = segment_path(tmp_path, 1)
    data = bytearray(first.read_bytes())
    data[-1] ^= 1
    first.write_bytes(bytes(data))
    _, recs = replay(tmp_path)
    assert groups(recs) == ["b"]
    assert first.exists()  # kept for inspection; only the newest segment's tail is truncated


def test_compaction_deletes_fully_consumed_prefix_only(tmp_path):
    wal = opened(tmp_path, segment_bytes=1)  # segment 1
    for gid in ("a", "b", "c"):  # one group per segment: 1, 2, 3; current becomes 4
        wal.append_group(gid, b"." * 50)
        wal.commit()
        wal.maybe_rotate(lambda: {"checkpoint_of": "state"})
    assert wal.segments() == [1, 2, 3, 4]
    # segment 2 is clear but segment 1 is not: nothing deleted
    wal.append_control({"consumed": ["b"]})
    assert wal.compact() == [] and wal.segments() == [1, 2, 3, 4]
    wal.append_control({"consumed": ["a"]})
    assert wal.compact() == [1, 2]
    size_before = wal.disk_bytes
    wal.close()
    assert size_before == sum(p.stat().st_size for p in tmp_path.glob("seg-*.wal"))
    _, recs = replay(tmp_path)  # "c" still there, "a"/"b" gone with their segments
    assert groups(recs) == ["c"]


def test_a_running_pipeline_keeps_at_most_two_segments(tmp_path):
    # OPERATIONS.md's bound
    wal = opened(tmp_path, segment_bytes=400)
    counts = []
    for i in range(200):  # each group consumed 3 groups later, as a trainer behind the servers
        wal.append_group(f"g{i}", b"." * 50)
        if i >= 3:
            wal.append_control({"consumed": [f"g{i - 3}"]})
        wal.commit()
        if wal.maybe_rotate(lambda: {}):
            counts.append(len(wal.segments()))
    assert len(counts) > 10 and set(counts) == {2}


def run_script(script: str, *args: str) -> str:
    """``script`` run by a fresh Python (stdin closed); its stdout."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


WAL_VANISHES = """
import os, sys
from buffer.wal import WriteAheadLog
wal = WriteAheadLog(sys.argv[1], fsync=sys.argv[2])
list(wal.replay())
wal.open({})
wal.append_group("g", b"payload")
wal.commit()
os._exit(0)  # the process vanishes: no close, no final commit
"""


@pytest.mark.parametrize("policy", ["always", "batch", "never"])
def test_records_survive_the_process_without_close(tmp_path, policy):
    # readable without close/fsync: writev goes straight to the kernel
    run_script(WAL_VANISHES, str(tmp_path), policy)
    _, recs = replay(tmp_path)
    assert groups(recs) == ["g"]


def test_group_commit_tickets_become_durable_in_order_and_queued_frames_read_back(tmp_path):
    wal = opened(tmp_path)  # fsync=always: a background thread runs the fsyncs
    assert wal.request_sync() == wal.durable()  # nothing appended: nothing to wait for
    wal.append_group("a", b"1")
    first = wal.request_sync()
    wal.append_group("b", b"2")
    second = wal.request_sync()
    assert second == first + 1
    wal.wait_durable()
    assert wal.durable() >= second and len(wal.fsync_seconds()) >= 1 and wal.fsync_seconds() == []
    frame = os.urandom(300_000)
    ref = wal.append_group("a", frame)  # queued: the fsync thread writes it
    assert bytes(wal.read_group(ref)) == frame  # written out first, then read
    refs = [wal.append_group(f"g{i}", frame[:i * 1000 + 1]) for i in range(20)]
    assert bytes(wal.read_group(refs[-1])) == frame[:19_001]
    assert [bytes(wal.read_group(r)) for r in refs] == [frame[:i * 1000 + 1] for i in range(20)]
    wal.close()
    _, recs = replay(tmp_path)
    assert groups(recs) == ["a", "b", "a", *(f"g{i}" for i in range(20))]


def test_a_failing_fsync_is_fatal_not_silent(tmp_path, monkeypatch):
    wal = opened(tmp_path)

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("buffer.wal.os.fsync", broken_fsync)
    # group commit syncs data (and the size)
    monkeypatch.setattr("buffer.wal.os.fdatasync", broken_fsync)
    wal.append_group("a", b"1")
    ticket = wal.request_sync()
    with pytest.raises(OSError, match=r"WAL .*seg-.*\.wal: writing it to disk failed: .*\(EIO\)"):
        wal.wait_durable()
    with pytest.raises(OSError):  # never reported durable
        assert wal.durable() < ticket
    monkeypatch.undo()

    def segments_open() -> int:
        fds = [os.path.join("/proc/self/fd", fd) for fd in os.listdir("/proc/self/fd")]
        return sum(1 for fd in fds if os.path.islink(fd)
                   and os.readlink(fd).startswith(os.path.join(os.path.realpath(tmp_path), "seg-")))

    assert segments_open() >= 1
    wal.close()  # after the failure: releases the segment, writes nothing more, does not raise
    assert segments_open() == 0


WAL_WITHOUT_FDATASYNC_OR_STDIN = """
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
    if policy == "batch":
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


def test_the_log_syncs_without_fdatasync_and_closes_a_reader_numbered_0(tmp_path):
    assert run_script(WAL_WITHOUT_FDATASYNC_OR_STDIN, str(tmp_path)) == "closed"


def test_a_failed_write_is_not_taken_for_a_damaged_record_at_hand_out(tmp_path, monkeypatch):
    # fsync=always: the queued write fails in the fsync thread
    from service_harness import answer, start, step

    from areal_like.settings.config import BufferConfig
    from areal_like.wire import protocol as P

    svc = start(tmp_path, BufferConfig(max_staleness=1, groups_per_step=2, max_inflight=16,
                                       capacity=64))
    step(svc, P.Register(server_id="s", engine_url="http://x", policy_version=0))
    sent = [answer(c) for c in step(svc, P.CreditRequest(server_id="s", max_credits=2)).credits]
    step(svc, sent[0])  # the first group is on disk

    def handle(msg):
        frame = P.encode(msg)
        svc.handle(b"peer", b"req", P.decode(frame), frame)

    def broken_writev(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("buffer.wal.os.writev", broken_writev)
    try:
        with pytest.raises(WalFailed):
            handle(sent[1])  # queued for the fsync thread, whose write fails (maybe already here)
            handle(P.BatchRequest(n_groups=2, trainer_version=0, wait_s=0.0, ack_batch=""))
            svc.settle()
        assert svc.instruments.counts["groups_dropped_unreadable"] == 0
    finally:
        monkeypatch.undo()
        svc.wal.close()


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("areal_like.daemon.fcntl.flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="buffer.wal"):
        wal = WriteAheadLog(tmp_path)
    assert "nothing stops a second buffer" in caplog.text
    list(wal.replay())
    wal.open({})
    wal.close()


def _signal_and_wait(running, release) -> None:
    running.set()
    release.wait(60)


def test_one_log_per_directory_and_a_forked_child_keeps_no_lock(tmp_path):
    import multiprocessing as mp

    wal = WriteAheadLog(tmp_path)
    with pytest.raises(WalInUse, match=f"in use by another buffer \\(pid {os.getpid()}\\)"):
        WriteAheadLog(tmp_path)
    ctx = mp.get_context("fork")
    running, release, child = ctx.Event(), ctx.Event(), None
    try:
        child = ctx.Process(target=_signal_and_wait, args=(running, release))
        child.start()
        assert running.wait(60)  # past the fork handlers
        wal.close()
        again = WriteAheadLog(tmp_path)  # the child is still alive and holds no lock
        assert child.is_alive()
        del again  # never closed: the lock goes with the object
        WriteAheadLog(tmp_path, fsync="never").close()
    finally:
        release.set()
        if child is not None:
            child.join(timeout=60)


def _three_groups(tmp_path, **kw) -> tuple[bytearray, list[int]]:
    """A closed log of a checkpoint and 300-byte groups a, b, c: (segment bytes, offsets)."""
    wal = opened(tmp_path, **kw)
    offsets = [wal.append_group(f"s0-L{gid}", b"\x87" + gid.encode() * 299).offset for gid in "abc"]
    wal.close()
    return bytearray(segment_path(tmp_path, 1).read_bytes()), offsets


def _damaged(data: bytearray, how: str, b: int, c: int) -> bytes:
    """``data`` with each "+"-joined damage of ``how`` done to record b (mid-segment) or c."""
    for part in how.split("+"):
        if part == "flip_frame_byte":
            data[b + 8 + 150] ^= 0x10
        elif part == "zero_header":
            data[b:b + 8] = bytes(8)
        elif part == "garbage_length":
            data[b:b + 4] = (2**31).to_bytes(4, "little")
        elif part == "flip_gid_len":  # the group id's length: the id can no longer be read
            data[b + 9] ^= 0x7F
        elif part == "truncate_payload":
            del data[-30:]
        elif part == "truncate_header":
            del data[c + 5:]
        elif part == "flip_last_byte":
            data[-1] ^= 0x10
        elif part == "garbage_last_length":
            data[c:c + 4] = (2**31).to_bytes(4, "little")
        elif part == "zero_last":  # off a 4 KiB boundary: corruption, not a direct append's padding
            assert len(data) % 4096 != 0
            data[c:] = bytes(len(data) - c)
        else:  # "torn": a torn last write after the intact c
            data += (1000).to_bytes(4, "little") + bytes(4) + b"G\x05\x00s0-Ld"
    return bytes(data)


A, B, C, TAIL = ("G", "s0-La"), ("G", "s0-Lb"), ("G", "s0-Lc"), ("D", "")


@pytest.mark.parametrize("how, records, corrupt, kept", [
    # damage mid-segment loses only the damaged record; nothing after it is cut
    *((how, [A, ("D", "s0-Lb"), C], 1, "all")
      for how in ("flip_frame_byte", "zero_header", "garbage_length")),
    ("flip_gid_len", [A, ("D", ""), C], 1, "all"),
    # a torn or corrupt last record (never acknowledged) is cut off and named by no group
    *((how, [A, B, TAIL], 1, "c") for how in ("truncate_payload", "truncate_header",
                                              "flip_last_byte", "garbage_last_length",
                                              "zero_last")),
    # after damage mid-segment: a damaged tail is cut, an intact record between them kept
    ("flip_frame_byte+torn", [A, ("D", "s0-Lb"), C, TAIL], 2, "all"),
    ("flip_frame_byte+flip_last_byte", [A, TAIL], 1, "b"),
])
def test_damage_loses_only_the_damaged_records_and_a_damaged_tail_is_cut(
        tmp_path, caplog, how, records, corrupt, kept):
    data, (_, b, c) = _three_groups(tmp_path, fsync="batch" if how == "zero_last" else "always")
    sizes = {"all": len(data), "b": b, "c": c}
    path = segment_path(tmp_path, 1)
    path.write_bytes(_damaged(data, how, b, c))
    with caplog.at_level(logging.WARNING, logger="buffer.wal"):
        wal, recs = replay(tmp_path)
    assert [(r[0], r[1]) for r in recs if r[0] != "C"] == records
    assert wal.corrupt_records == corrupt and path.stat().st_size == sizes[kept]
    said = f"at offset {b}; skipped {c - b} damaged bytes" if records[2:] == [C] else "offset"
    assert any("seg-000000000001.wal" in m and said in m for m in caplog.messages), caplog.messages
    wal.open({})
    wal.append_group("after", b"z")
    wal.close()
    _, recs = replay(tmp_path)  # clean now; new records follow in a new segment
    assert groups(recs) == [gid for kind, gid in records if kind == "G"] + ["after"]


def test_a_checkpoint_larger_than_a_segment_does_not_rotate_by_itself(tmp_path):
    # a long run's checkpoint of dedupe ids, counted as records, rotated at every loop (soak run)
    wal = WriteAheadLog(tmp_path, segment_bytes=1000)
    list(wal.replay())
    big = {"seen": [f"rollout-0-{i:08d}" for i in range(200)]}  # ~4 KB: larger than a segment
    wal.open(big)
    assert wal.segment_size > wal.segment_bytes
    assert not wal.maybe_rotate(lambda: big) and wal.segments() == [1]
    wal.append_group("a", b"." * 600)
    assert not wal.maybe_rotate(lambda: big)  # 600 bytes of records: not full yet
    wal.append_group("b", b"." * 600)
    wal.commit()
    assert wal.maybe_rotate(lambda: big) and wal.segments() == [1, 2]
    assert not wal.maybe_rotate(lambda: big) and wal.segments() == [1, 2]
    wal.close()
