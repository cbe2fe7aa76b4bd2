"""Write-ahead log: append-only segment files, so that an acknowledged group survives a crash.

Layout, durability policies, disk-full handling and damage: WAL.md. Invariants: a ticket is
durable only once every record before it is on disk; a failed write or fsync is fatal
(``WalFailed``), a full disk is not (``DiskFull``); compaction deletes only segments with no
unconsumed group; damage is skipped and counted, never fatal and never accepted."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from areal_like.daemon import fsync_dir
from buffer.wal_format import (  # noqa: F401 (re-exported: the WAL's public names)
    GID_LEN,
    HEADER,
    DiskFull,
    Record,
    WalFailed,
    WalInUse,
    WalRef,
    damaged_group_id,
    lock_directory,
    next_intact,
    record_header,
    record_problem,
    segment_path,
    sync_data,
    unlock_directory,
    write_record,
)

BATCH_FSYNC_S = 0.05  # fsync=batch: a power loss takes at most the last 50 ms of acks
DISK_RETRY_S = 0.5  # a full disk: how often wait_durable or the fsync thread tries queued records
# the bytes msgpack.packb(use_bin_type=True) writes, ~4x faster
_ENCODER = msgspec.msgpack.Encoder()

log = logging.getLogger("buffer.wal")


class WriteAheadLog:
    def __init__(self, directory: str | Path, *, fsync: str = "always",
                 segment_bytes: int = 256 << 20):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._unlock = weakref.finalize(self, unlock_directory,
                                        lock_directory(self.dir))  # also unclosed
        self.fsync_policy, self.segment_bytes = fsync, segment_bytes
        self._fd: int | None = None
        self.segment = self.segment_size = 0  # current segment number, bytes appended to it
        self._checkpoint_size = 0  # bytes of the checkpoint that opens the current segment
        self._live: dict[str, int] = {}  # unconsumed group id -> the segment that holds it
        self._readers: dict[int, int] = {}  # segment -> read-only fd for read_group
        # written since the last sync ticket; time of the last fsync
        self._dirty, self._last_fsync = False, 0.0
        # group commit (fsync=always): tickets <= _synced are durable
        self._cv = threading.Condition()
        self._requested = self._synced = 0
        self._sync_error: BaseException | None = None
        self._fsync_times: list[float] = []
        self._syncer: threading.Thread | None = None
        self._closing = False
        self._queue: list[list] = []  # records not yet written, in order (WAL.md, Durability)
        self._written = 0  # bytes of the current segment written to the file
        self.wakeup_fd: int | None = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                                      if fsync == "always" and hasattr(os, "eventfd") else None)
        # disk_bytes: all segment files, kept without stat calls
        self.corrupt_records = self.disk_bytes = 0
        # records are waiting for disk space (the fsync thread's, or inline control records)
        self.disk_full = False
        self.disk_error = ""  # the last write that found no room: the segment and the errno
        self._control_n, self._last_control = 0, b""  # the last control record's number, bytes
        self._replayed: dict | None = None  # the last control record replay read (not a checkpoint)

    # ---- recovery
    def segments(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("seg-*.wal"))

    def replay(self) -> Iterator[Record]:
        """Yield every intact record of every segment, oldest first (call before ``open``)."""
        segments = self.segments()
        for n in segments:
            yield from self._read_segment(n, newest=n == segments[-1])
        self.segment = segments[-1] if segments else 0
        if self._replayed is not None:  # the checkpoint ``open`` writes carries it, as a rotation's
            # does (append_control): damage to it in its older segment is restored from there
            self._last_control = _copy(self._replayed)

    def _read_segment(self, n: int, newest: bool) -> Iterator[Record]:
        path = segment_path(self.dir, n)
        data = path.read_bytes()
        self.disk_bytes += len(data)
        pos = 0
        while pos < len(data):
            end, problem = record_problem(data, pos)
            if problem is None:
                yield self._parse(data, pos, end, n)
                pos = end
                continue
            nxt = next_intact(data, pos)  # None: a torn or damaged tail
            yield self._damaged(data, pos, nxt, n, problem, newest)
            if nxt is None:
                if newest:  # a torn write of the crash that ended the last run: cut it off
                    with path.open("r+b") as f:
                        f.truncate(pos)
                        os.fsync(f.fileno())
                    self.disk_bytes -= len(data) - pos
                return
            pos = nxt

    def _damaged(self, data: bytes, pos: int, nxt: int | None, segment: int, problem: str,
                 newest: bool) -> Record:
        """A damaged region, logged and counted: a "D" record naming the group it held, if any."""
        self.corrupt_records += 1
        end = len(data) if nxt is None else nxt
        gid = "" if nxt is None and newest else damaged_group_id(data, pos, end)
        name = segment_path(self.dir, segment).name
        if nxt is None:
            log.warning("wal %s: %s at offset %d; skipping the last %d bytes of this segment",
                        name, problem, pos, end - pos)
        else:
            log.warning("wal %s: %s at offset %d; skipped %d damaged bytes to the next intact "
                        "record at offset %d%s", name, problem, pos, end - pos, end,
                        f" (it held group {gid})" if gid else "")
        return Record("D", segment, group_id=gid, ref=WalRef(segment, pos, end - pos))

    def _parse(self, data: bytes, pos: int, end: int, segment: int) -> Record:
        start = pos + HEADER.size
        if data[start:start + 1] == b"G":
            (n,) = GID_LEN.unpack_from(data, start + 1)
            gid = data[start + 3:start + 3 + n].decode()
            self._live[gid] = segment
            return Record("G", segment, group_id=gid, frame=data[start + 3 + n:end],
                          ref=WalRef(segment, pos, end - pos))
        control = msgspec.msgpack.decode(data[start + 1:end])
        for gid in control.get("consumed", ()):
            self._live.pop(gid, None)
        self._replayed = None if control.get("checkpoint") else control
        return Record("C", segment, control=control)

    # ---- writing
    def open(self, checkpoint: dict) -> None:
        """Start a fresh segment beginning with ``checkpoint``, then compact."""
        self.segment += 1
        self._fd = os.open(segment_path(self.dir, self.segment),
                           os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.segment_size = self._written = 0
        self.append_control({**checkpoint, "checkpoint": True})
        self._checkpoint_size = self.segment_size
        self._fsync_dir()
        self.commit(force=True)
        if not self._queue:  # until the checkpoint is written, older segments hold the state
            self.compact()
        if self.fsync_policy == "always" and self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, name="wal-fsync", daemon=True)
            self._syncer.start()

    def _write(self, parts: list[bytes | memoryview]) -> int:
        n = HEADER.size + sum(map(len, parts))
        if self._syncer is not None:  # fsync=always: the fsync thread checksums and writes it
            with self._cv:
                self._queue.append(parts)
        else:
            # keeps the GIL for the checksum: 30 us on a 400 KB group, a GIL round trip can
            # cost more
            self._write_inline(parts)
        self.segment_size += n
        self.disk_bytes += n
        self._dirty = True
        return n

    def _write_inline(self, parts: list[bytes | memoryview]) -> None:
        """fsync=batch|never: a group that does not fit raises ``DiskFull``; a control record waits
        in ``_queue`` for ``commit``."""
        if not self._queue:
            try:
                record = [record_header(parts, 0), *parts]
                self._written += write_record(self._fd, record, self._written)
                return
            except DiskFull as e:
                if parts[0] != b"C":
                    raise
                log.warning("wal: disk full; %s (control records wait and are written when space "
                            "returns)", e)
                self._full(e)
            except OSError as e:  # fatal (EFBIG, EIO): durable() raises from now on
                raise self._fail(e) from None
        elif parts[0] != b"C":
            raise DiskFull(errno.ENOSPC, "control records are waiting for disk space")
        self._queue.append(parts)
        self.disk_full = True

    def append_group(self, group_id: str, frame: bytes | memoryview) -> WalRef:
        """Log a group; the reference reads its frame back until the group is consumed."""
        gid = group_id.encode()
        offset = self.segment_size
        n = self._write([b"G", GID_LEN.pack(len(gid)), gid, frame])
        self._live[group_id] = self.segment
        return WalRef(self.segment, offset, n)

    def append_control(self, control: dict) -> int:
        """Log a control record, numbered and carrying a copy of the one before (WAL.md, Damage)."""
        self._control_n = 0 if control.get("checkpoint") else self._control_n + 1
        numbered = {**control, "n": self._control_n}
        prev = {"prev": self._last_control} if self._last_control else {}
        payload = _ENCODER.encode({**numbered, **prev})
        self._last_control = b"" if control.get("checkpoint") else _copy(numbered)
        n = self._write([b"C", payload])
        for gid in control.get("consumed", ()):
            self._live.pop(gid, None)
        return n

    def read_group(self, ref: WalRef) -> memoryview:
        """The frame of a live group record, checked against its CRC."""
        if ref.segment == self.segment and ref.offset + ref.length > self._written:
            self.request_sync()  # still queued for the fsync thread: written out first
            self.wait_durable()
        fd = self._readers.get(ref.segment)
        if fd is None:
            fd = self._readers[ref.segment] = os.open(segment_path(self.dir, ref.segment),
                                                      os.O_RDONLY)
        data = os.pread(fd, ref.length, ref.offset)
        end, problem = record_problem(data, 0)
        if problem or end != len(data) or end < HEADER.size + 3 or data[HEADER.size] != ord("G"):
            name = segment_path(self.dir, ref.segment).name
            raise OSError(f"WAL record at {name}:{ref.offset} is damaged")
        (n,) = GID_LEN.unpack_from(data, HEADER.size + 1)
        return memoryview(data)[HEADER.size + 3 + n:]

    # ---- durability
    def request_sync(self) -> int:
        """Ticket for everything appended so far: durable once ``durable() >= ticket``."""
        if self.fsync_policy != "always":
            self._requested += 1
            self._commit_inline()
            return self._requested
        with self._cv:
            if self._dirty:
                self._dirty = False
                self._requested += 1
                self._cv.notify()
            return self._requested

    def _commit_inline(self) -> None:
        """fsync=batch|never: write what waits; every ticket is durable once nothing waits."""
        if (t := self.commit()) is not None:
            self._fsync_times.append(t)
        if not self._queue:
            self._synced = self._requested

    def durable(self) -> int:
        """The highest ticket whose records are on disk. Raises ``WalFailed`` if the disk failed."""
        if self._sync_error is not None:
            raise self._sync_error
        return self._synced

    def _full(self, e: DiskFull) -> None:
        """Records wait for room; ``disk_error`` says where and why (``e``)."""
        self.disk_full = True
        self.disk_error = (f"{segment_path(self.dir, self.segment)}: {os.strerror(e.errno)} "
                           f"({errno.errorcode.get(e.errno, e.errno)})")

    @property
    def failed(self) -> bool:
        return self._sync_error is not None

    def _fail(self, e: BaseException) -> WalFailed:
        """Record the fatal error ``e``: nothing is made durable from now on."""
        code = getattr(e, "errno", None)
        why = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})" if code else repr(e)
        self._sync_error = WalFailed(
            f"WAL {segment_path(self.dir, self.segment)}: writing it to disk failed: {why}; "
            f"every acknowledged record is on disk, no more will be")
        return self._sync_error

    def clear_wakeup(self) -> None:
        """Drain ``wakeup_fd`` (before checking ``durable()``, so no wake-up is lost)."""
        if self.wakeup_fd is not None:
            try:
                os.eventfd_read(self.wakeup_fd)
            except BlockingIOError:
                pass

    def wait_durable(self, *, unless_full: bool = False) -> None:
        """Until every ticket is durable; ``unless_full``: or until the disk is found full (a
        stopping buffer does not wait for space that may never come: what waits was never
        acknowledged)."""
        def waiting() -> bool:
            return self._synced < self._requested and not (unless_full and self.disk_full)
        while self.fsync_policy != "always" and self._synced < self._requested and not self.failed:
            self._commit_inline()  # written inline: tried again here, as the fsync thread would
            if not waiting():
                break
            time.sleep(DISK_RETRY_S)
        with self._cv:
            while waiting() and self._sync_error is None:
                self._cv.wait(0.1)
        self.durable()

    def fsync_seconds(self) -> list[float]:
        """Group commit durations since the last call."""
        with self._cv:
            out, self._fsync_times = self._fsync_times, []
        return out

    def _sync_loop(self) -> None:
        while True:
            with self._cv:
                while self._synced >= self._requested and not self._closing:
                    self._cv.wait()
                if self._synced >= self._requested:
                    return
                target, fd = self._requested, self._fd
            t0 = time.monotonic()
            try:
                self._write_queued(fd)  # every record of ticket `target` (and maybe more)
                sync_data(fd)  # covers every write made before this call, so all of ticket `target`
            except DiskFull as e:
                # kept in the queue: written once there is space; nothing acked meanwhile
                if self._closing:
                    self._fail(e)
                    return
                if not self.disk_full:
                    log.warning("wal: disk full; %s (the records wait and are written when space "
                                "returns)", e)
                self._full(e)
                time.sleep(DISK_RETRY_S)
                continue
            except Exception as e:  # fatal (durable() raises), never a silent hang
                self._fail(e)  # the daemon logs it once, when it stops
                with self._cv:
                    self._cv.notify_all()
                return
            self.disk_full = False
            with self._cv:
                self._synced = target
                self._fsync_times.append(time.monotonic() - t0)
                self._cv.notify_all()
            if self.wakeup_fd is not None:
                os.eventfd_write(self.wakeup_fd, 1)

    def _write_queued(self, fd: int) -> None:
        with self._cv:
            queue, self._queue = self._queue, []
        # crc32c and os.writev release the GIL while they read the parts
        for i, parts in enumerate(queue):
            try:
                record = [record_header(parts, -1), *parts]
                self._written += write_record(fd, record, self._written)
            except DiskFull:
                with self._cv:
                    self._queue[:0] = queue[i:]  # in order, before what was appended meanwhile
                raise

    def commit(self, force: bool = False) -> float | None:
        """Write the records waiting for space, then fsync per the policy (the syncer must be
        idle); returns the fsync's seconds if one ran."""
        if not self._dirty or self._fd is None:
            return None
        try:
            self._write_queued(self._fd)
        except DiskFull as e:
            self._full(e)
            return None  # still full: they wait, in order, for the next try
        except OSError as e:
            raise self._fail(e) from None
        self.disk_full = False
        now = time.monotonic()
        if not force and (self.fsync_policy == "never" or
                          (self.fsync_policy == "batch"
                           and now - self._last_fsync < BATCH_FSYNC_S)):
            return None
        try:
            sync_data(self._fd)
        except OSError as e:
            raise self._fail(e) from None
        self._dirty = False
        self._last_fsync = time.monotonic()
        return self._last_fsync - now

    # ---- segments
    @property
    def records_size(self) -> int:
        """Bytes appended to the current segment after its opening checkpoint."""
        return self.segment_size - self._checkpoint_size

    def maybe_rotate(self, checkpoint: Callable[[], dict], *, force: bool = False) -> bool:
        """Open a new segment when the records after its checkpoint fill ``segment_bytes``, or
        now."""
        if self.records_size < self.segment_bytes and not force:
            return False
        if self._queue and self._syncer is None:  # records waiting for space belong to this segment
            return False
        self.wait_durable()
        self.commit(force=True)
        os.close(self._fd)
        self.open(checkpoint())
        return True

    def compact(self) -> list[int]:
        """Delete the segments older than the oldest one that holds an unconsumed group."""
        oldest = min(self._live.values(), default=self.segment)
        removed = [n for n in self.segments() if n < min(oldest, self.segment)]
        for n in removed:
            path = segment_path(self.dir, n)
            self.disk_bytes -= path.stat().st_size
            path.unlink()
            if (fd := self._readers.pop(n, None)) is not None:
                os.close(fd)
        if removed:
            self._fsync_dir()
            log.info("wal: compacted segments %s", removed)
        return removed

    def close(self) -> None:
        if self._syncer is not None:
            with self._cv:
                self._closing = True
                self._cv.notify_all()
            self._syncer.join(timeout=60)
            self._syncer = None
        if self._fd is not None:
            if self._sync_error is None:  # after a failure: release everything, write nothing more
                self.commit(force=self.fsync_policy != "never")
            os.close(self._fd)
            self._fd = None
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()
        if self.wakeup_fd is not None:
            os.close(self.wakeup_fd)
            self.wakeup_fd = None
        self._unlock()  # last: nothing of this log writes to the directory any more

    def _fsync_dir(self) -> None:
        if self.fsync_policy != "never":
            fsync_dir(self.dir)


def _copy(control: dict) -> bytes:
    """The encoded copy of ``control`` the next control record carries (``append_control``)."""
    record = {k: v for k, v in control.items() if k != "prev"}
    if isinstance(changes := record.get("changes"), dict):
        record["changes"] = {k: v for k, v in changes.items() if k != "in_transit"}
    return _ENCODER.encode(record)
