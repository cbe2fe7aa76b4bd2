"""Direct-I/O appends and reads of WAL segments (buffer/segment_io.py) and the WAL on top of them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer.segment_io import BLOCK, DirectAppender, DirectReader, open_direct
from buffer.wal import WriteAheadLog, _segment_path


def _direct_fd(path: Path) -> int:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    fd = open_direct(path, os.O_WRONLY)
    if fd is None:
        pytest.skip(f"{path.parent} refuses O_DIRECT")
    return fd


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3 * BLOCK + 17), max_size=5), min_size=1, max_size=6))
def test_the_stream_on_disk_is_what_was_added_whatever_the_flush_points(tmp_path_factory, flushes):
    """Records of any size, flushed at any points, through a 2-block stage: the file holds exactly
    each record's header and parts in order, then zeros up to the next block boundary; ``written``
    is the stream length."""
    path = tmp_path_factory.mktemp("direct") / "seg.wal"
    fd = _direct_fd(path)
    appender = DirectAppender(fd, lambda parts: b"H%dh" % sum(map(len, parts)), stage_bytes=2 * BLOCK)
    stream = bytearray()
    try:
        for sizes in flushes:
            for size in sizes:
                parts = [os.urandom(size), os.urandom(size // 3)]
                stream += b"H%dh" % sum(map(len, parts)) + b"".join(parts)
                appender.add(parts)
            assert appender.flush() == len(stream) == appender.written
            data = path.read_bytes()
            pad = -len(stream) % BLOCK
            assert data == bytes(stream) + bytes(pad)
    finally:
        appender.close()
        os.close(fd)


def test_direct_reads_return_any_record_span(tmp_path):
    path = tmp_path / "seg.wal"
    fd = _direct_fd(path)
    appender = DirectAppender(fd, lambda parts: b"")
    payload = os.urandom(5 * BLOCK + 123)
    appender.add([payload])
    appender.flush()
    appender.close()
    os.close(fd)
    rfd = open_direct(path, os.O_RDONLY)
    reader = DirectReader()
    try:
        for offset, length in ((0, 1), (1, BLOCK), (BLOCK - 1, 2), (3 * BLOCK + 5, 2 * BLOCK + 118), (0, len(payload))):
            assert reader.read(rfd, offset, length) == payload[offset:offset + length]
    finally:
        reader.close()
        os.close(rfd)


def _open(path, **kw) -> WriteAheadLog:
    wal = WriteAheadLog(path, **kw)
    list(wal.replay())
    wal.open({})
    return wal


def test_fsync_always_writes_directly_and_reads_back_what_is_still_queued(tmp_path):
    wal = _open(tmp_path)
    if not wal.direct:
        pytest.skip("this file system refuses O_DIRECT")
    frame = os.urandom(300_000)
    ref = wal.append_group("a", frame)  # queued: the fsync thread writes it
    assert bytes(wal.read_group(ref)) == frame  # written out first, then read without the page cache
    refs = [wal.append_group(f"g{i}", frame[:i * 1000 + 1]) for i in range(20)]
    wal.request_sync()
    wal.wait_durable()
    assert [bytes(wal.read_group(r)) for r in refs] == [frame[:i * 1000 + 1] for i in range(20)]
    wal.close()
    size = _segment_path(tmp_path, 1).stat().st_size
    assert size == wal._segment_size  # close cut the padding
    _, = [r for r in WriteAheadLog(tmp_path).replay() if r.kind == "G" and r.group_id == "g19"]


def test_direct_io_can_be_turned_off_in_the_config(tmp_path):
    from areal_like.config import load_config
    from buffer.recovery import recover
    from buffer.service import BufferService

    cfg = load_config([f"run_dir={tmp_path}", "buffer.direct_io=false"])
    svc = BufferService(cfg)
    recover(svc)
    try:
        assert cfg.buffer.fsync == "always" and not svc.wal.direct and svc.wal._appender is None
    finally:
        svc.wal.close()


def test_fsync_batch_and_never_keep_the_page_cache_path(tmp_path):
    for policy in ("batch", "never"):
        wal = _open(tmp_path / policy, fsync=policy)
        assert not wal.direct and wal._appender is None
        wal.close()


def test_a_file_system_without_direct_io_falls_back_to_the_page_cache(tmp_path, monkeypatch, caplog):
    """Where open(O_DIRECT) is refused (EINVAL: older tmpfs, some overlays; simulated here, as
    every file system of this machine accepts it) the WAL appends through the page cache."""
    monkeypatch.setattr("buffer.wal.open_direct", lambda path, flags: None)
    with caplog.at_level(logging.INFO, logger="buffer.wal"):
        wal = _open(tmp_path)
    assert not wal.direct and wal._appender is None and "refuses direct I/O" in caplog.text
    ref = wal.append_group("a", b"frame")
    wal.request_sync()
    wal.wait_durable()
    assert bytes(wal.read_group(ref)) == b"frame"
    wal.close()
    assert [r.group_id for r in WriteAheadLog(tmp_path).replay() if r.kind == "G"] == ["a"]


KILLED_AFTER_DURABLE = """
import sys, time
from buffer.wal import WriteAheadLog
wal = WriteAheadLog(sys.argv[1])
list(wal.replay())
wal.open({})
assert wal.direct
for i in range(5):
    wal.append_group(f"g{i}", bytes([i]) * (1000 * i + 7))
wal.request_sync()
wal.wait_durable()
wal.append_group("queued", b"never synced")  # not acknowledged: may be lost
print("ready", flush=True)
time.sleep(600)
"""


def test_a_crash_leaves_padding_that_replay_cuts_as_the_clean_end(tmp_path, caplog, spawn_python):
    """kill -9 after a durable ticket: the segment ends in zero padding up to a block boundary;
    replay yields every durable record, counts nothing as corrupt and cuts the padding."""
    probe = _open(tmp_path / "probe")
    direct = probe.direct
    probe.close()
    if not direct:
        pytest.skip("this file system refuses O_DIRECT")
    child = spawn_python(KILLED_AFTER_DURABLE, [tmp_path / "wal"])
    assert child.stdout.readline().strip() == "ready"
    spawn_python.kill9(child)
    seg = _segment_path(tmp_path / "wal", 1)
    assert seg.stat().st_size % BLOCK == 0  # padded
    with caplog.at_level(logging.INFO, logger="buffer.wal"):
        wal = WriteAheadLog(tmp_path / "wal")
        groups = [(r.group_id, r.frame) for r in wal.replay() if r.kind == "G"]
    assert groups == [(f"g{i}", bytes([i]) * (1000 * i + 7)) for i in range(5)]
    assert wal.corrupt_records == 0 and "padding" in caplog.text
    assert seg.stat().st_size % BLOCK != 0  # cut to the records


def test_close_after_a_failed_direct_write_releases_the_segment(tmp_path, monkeypatch):
    """A direct write fails (EIO) in the fsync thread: durable() raises, and the daemon's stop()
    still closes the WAL when no reply is waiting. close() releases the segment's descriptor and
    staging buffers (the kept error must not pin them through its traceback's frames) and writes
    nothing more."""
    wal = _open(tmp_path)
    if not wal.direct:
        pytest.skip("this file system refuses O_DIRECT")
    wal.append_group("a", b"x" * 100)
    wal.request_sync()
    wal.wait_durable()

    def broken_pwrite(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("buffer.segment_io.os.pwrite", broken_pwrite)
    wal.append_group("b", b"y" * 100_000)
    wal.request_sync()
    with pytest.raises(OSError, match="WAL fsync failed"):
        wal.wait_durable()
    monkeypatch.undo()
    fd = wal._fd
    try:
        try:
            wal.close()
        except OSError:
            pass  # the failure may be reported again
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
