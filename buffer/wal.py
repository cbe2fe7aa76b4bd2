"""Write-ahead log: append-only segment files, so that an acknowledged group survives a crash.

Layout: ``<wal_dir>/seg-<n>.wal``, n increasing. Every start and every rotation opens a new
segment whose first record is a checkpoint (the small control state, see ``BufferService``), so a
segment never continues after a crash and older segments' control records are superseded.

Records (framing and checksums: ``wal_format.py``) are group records (a TrajectoryGroup's wire
frame as received) and control records (a msgpack map: "state" or "changes", "consumed", "seen",
...). A control record's ``consumed`` list marks groups handed to the trainer or dropped; replay yields
everything in order and the caller applies it, so restart rebuilds exactly the unconsumed groups.

Durability (``fsync``):
* ``always`` (default): ``request_sync()`` returns a ticket and a background thread writes and
  syncs (``fdatasync``: the data and the file size, not the timestamps, which replay never reads)
  everything appended so far; the service sends a reply only once ``durable() >= ticket``. One
  fsync covers a whole poll batch (group commit), and the loop keeps receiving and appending the
  next batch while the disk flushes the previous one (pipelining), which is how the safe policy
  keeps up with the network. Appends are queued and that thread writes them with direct I/O
  (``segment_io.DirectAppender``: no page cache) where the file system allows it (``direct``);
  a record lost with the process before its fsync was never acknowledged.
* ``batch``: fsync at most every ``BATCH_FSYNC_S``, inline; replies may precede the fsync.
* ``never``: the OS flushes when it likes.
With ``batch`` and ``never`` (and ``always`` where direct I/O is refused, e.g. older tmpfs) records
are written with ``os.writev`` straight to the file descriptor (no user-space buffer), so anything
acknowledged survives the *process* dying (``kill -9``); fsync decides what survives the
*machine* dying.

Reading back: ``append_group`` returns a ``WalRef`` and ``read_group`` returns that record's frame
(CRC checked), so the store keeps only references and the frames live on disk (direct I/O) or in
the page cache (clean once synced, reclaimable), never in the daemon's own memory. A referenced
record is live, so its segment is never compacted while the reference is in use.

A new segment's blocks are reserved up front (``reserve_blocks``); rotation and close free what no
record used, and after a crash (no close) the next start's replay frees it in every old segment.

Compaction (at every start and rotation): a segment is deleted once it is not the current one,
every group record in it has been consumed, and so has every older segment. Only a prefix is
deleted: a consumed mark may live in a later segment than its group, so deleting from the
middle could resurrect a group.

A failed fsync is fatal: ``durable()`` raises from then on and the daemon exits.

One writer per directory: the log holds an exclusive ``flock`` on ``<wal_dir>/LOCK`` from the moment
it is made until ``close`` (the kernel drops it when the process dies, ``kill -9`` included), and a
second log on the same directory, in any process, fails at once with ``WalInUse`` naming the
holder's PID. Two buffers appending to, truncating and compacting the same segments would lose
acknowledged groups without either noticing (two jobs given one ``run_dir``, a buffer started by
hand beside a running job).

A torn or corrupt record (short header or payload, CRC mismatch, absurd length) ends the replay of
its segment with a warning naming file and offset; the rest of that segment is skipped and a
torn tail of the newest segment is truncated. It is never fatal and never accepted. The zero
padding a direct append leaves up to a block boundary is the clean end of a segment, and is cut.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from buffer.segment_io import DirectAppender, DirectReader, is_zero_tail, open_direct, release_reserved, reserve_blocks
from buffer.wal_format import HEADER, Record, WalRef, group_frame, group_record, parse_record, record_at, record_header
from buffer.wal_format import segment_path as _segment_path

_CONTROL_ENCODER = msgspec.msgpack.Encoder()  # the bytes msgpack.packb(use_bin_type=True) writes, ~4x faster
BATCH_FSYNC_S = 0.05  # fsync=batch: bounds what a power loss can take to the last 50 ms of acks
LOCK_FILE = "LOCK"  # in the WAL directory: flocked by the one log that may write there

log = logging.getLogger("buffer.wal")


class WalFailed(OSError):
    """The WAL cannot make anything durable any more (a failed write or fsync): fatal for the
    daemon, never to be mistaken for one damaged record."""


class WalInUse(RuntimeError):
    """Another log (in this or another process) holds the WAL directory."""


class _DirectoryLock:
    """The exclusive ``flock`` on ``<directory>/LOCK``, held while ``fd`` is open. The holder's PID is
    written into the file for the error message of the next one to try."""

    def __init__(self, directory: Path):
        self.fd: int | None = None
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WalInUse(f"WAL directory {directory} is in use by another buffer (pid {holder}): one buffer "
                           f"per wal_dir; stop that one or give this one its own run_dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("wal: %s cannot be locked (%s): nothing stops a second buffer on it", directory, e)
            return
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        _HELD.add(self)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_HELD: weakref.WeakSet[_DirectoryLock] = weakref.WeakSet()


def _release_inherited_locks() -> None:
    """In a forked child (multiprocessing): its copies of the lock descriptors share the parent's
    open file and would keep the directories locked after the parent let go or died."""
    for lock in list(_HELD):
        lock.release()


os.register_at_fork(after_in_child=_release_inherited_locks)


def _sync_data(fd: int) -> None:
    """fdatasync (data and size, not timestamps); fsync where the OS has none (macOS). Looked up per
    call: one per group commit."""
    getattr(os, "fdatasync", os.fsync)(fd)


class WriteAheadLog:
    def __init__(self, directory: str | Path, *, fsync: str = "always", segment_bytes: int = 256 << 20,
                 direct: bool = True):
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"fsync={fsync!r}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        # released by close(), or when a log that was never closed is collected
        self._lock = _DirectoryLock(self.dir)
        self._unlock = weakref.finalize(self, self._lock.release)
        self.fsync_policy = fsync
        self.segment_bytes = segment_bytes
        self.direct = direct and fsync == "always"  # direct I/O wanted; each segment falls back if refused
        self._fd: int | None = None
        self._appender: DirectAppender | None = None  # the current segment's, when it is written directly
        self._direct_reader = DirectReader()
        self.segment = 0  # current segment number
        self._segment_size = 0
        self._live: dict[int, set[str]] = {}  # segment -> unconsumed group ids recorded in it
        self._where: dict[str, int] = {}  # group id -> segment
        self._dirty = False
        self._last_fsync = 0.0
        # group commit in the background (fsync=always): tickets <= _synced are durable
        self._cv = threading.Condition()
        self._requested = 0
        self._synced = 0
        self._sync_error: BaseException | None = None
        self._fsync_times: list[float] = []
        self._syncer: threading.Thread | None = None
        self._syncer_idle = False  # waiting on _cv for a request (under _cv)
        # readable once the fsync thread made a ticket durable: a loop waiting for requests wakes up
        # to send the replies at once instead of at its next poll timeout (fsync=always, the only
        # policy with that thread; Linux, None elsewhere)
        self.wakeup_fd: int | None = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                                      if fsync == "always" and hasattr(os, "eventfd") else None)
        self._closing = False
        self._readers: dict[int, int] = {}  # segment -> read-only fd for read_group (O_DIRECT if self.direct)
        self.corrupt_records = 0
        self.disk_bytes = 0  # size of all segment files, kept current without stat calls

    # ---- recovery
    def segments(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("seg-*.wal"))

    def replay(self) -> Iterator[Record]:
        """Yield every intact record of every segment, oldest first (call before ``open``)."""
        segments = self.segments()
        for n in segments:
            self._live.setdefault(n, set())
            yield from self._read_segment(n, newest=n == segments[-1])
        self.segment = segments[-1] if segments else 0

    def _read_segment(self, n: int, newest: bool) -> Iterator[Record]:
        path = _segment_path(self.dir, n)
        data = path.read_bytes()
        self.disk_bytes += len(data)
        release_reserved(path, len(data))  # replay runs before ``open``: no segment read here is written again
        pos = 0
        while pos < len(data):
            end, problem = record_at(data, pos)
            if problem is not None and is_zero_tail(data, pos):  # a direct append's padding: the end
                log.info("wal %s: cut %d bytes of padding at offset %d", path.name, len(data) - pos, pos)
                os.truncate(path, pos)
                self.disk_bytes -= len(data) - pos
                return
            if problem is not None:
                self.corrupt_records += 1
                log.warning("wal %s: %s at offset %d; skipping the last %d bytes of this segment",
                            path.name, problem, pos, len(data) - pos)
                if newest:  # a torn write of the crash that ended the last run: cut it off
                    with path.open("r+b") as f:
                        f.truncate(pos)
                        os.fsync(f.fileno())
                    self.disk_bytes -= len(data) - pos
                return
            record = parse_record(data, pos, end, n)
            if record.kind == "G":
                self._track(record.group_id, n)
            else:
                self._untrack(record.control.get("consumed", ()))
            yield record
            pos = end

    # ---- writing
    def open(self, checkpoint: dict) -> None:
        """Start a fresh segment beginning with ``checkpoint``, then compact."""
        self.segment += 1
        path = _segment_path(self.dir, self.segment)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        fd = open_direct(path, os.O_WRONLY) if self.direct else None
        if fd is not None:
            self._appender = DirectAppender(fd, record_header)
        elif self.direct:
            log.info("wal: %s refuses direct I/O; appending through the page cache", self.dir)
            self.direct = False
        self._fd = fd if fd is not None else os.open(path, os.O_WRONLY | os.O_APPEND)
        reserve_blocks(self._fd, self.segment_bytes)
        self._segment_size = 0
        self._live[self.segment] = set()
        self.append_control({**checkpoint, "checkpoint": True})
        self._fsync_dir()
        self.commit(force=True)
        self.compact()
        if self.fsync_policy == "always" and self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, name="wal-fsync", daemon=True)
            self._syncer.start()

    def _write(self, parts: list[bytes | memoryview]) -> int:
        n = HEADER.size + sum(len(p) for p in parts)
        if self._appender is not None:  # checksummed and written by the fsync thread (request_sync)
            self._appender.add(parts)
        elif (written := os.writev(self._fd, [record_header(parts, gil_release=0), *parts])) != n:
            raise OSError(f"short write to the WAL ({written} of {n} bytes)")  # a full disk
        self._segment_size += n
        self.disk_bytes += n
        self._dirty = True
        return n

    def append_group(self, group_id: str, frame: bytes) -> WalRef:
        """Log a group; the returned reference reads its frame back (``read_group``) until the
        group is consumed: its segment is not compacted before that."""
        offset = self._segment_size
        n = self._write(group_record(group_id, frame))
        self._track(group_id, self.segment)
        return WalRef(self.segment, offset, n)

    def read_group(self, ref: WalRef) -> memoryview:
        """The frame of a live group record, checked against its CRC: read with direct I/O, or from
        the page cache (fsync batch/never) unless the kernel evicted it."""
        if ref.segment == self.segment and self._appender is not None \
                and ref.offset + ref.length > self._appender.written:
            self.request_sync()  # still queued in memory: write it out first
            self.wait_durable()
        fd = self._readers.get(ref.segment)
        if fd is None:
            path = _segment_path(self.dir, ref.segment)
            fd = open_direct(path, os.O_RDONLY) if self.direct else None
            fd = os.open(path, os.O_RDONLY) if fd is None else fd
            self._readers[ref.segment] = fd
        if self.direct:
            data = self._direct_reader.read(fd, ref.offset, ref.length)
        else:
            data = os.pread(fd, ref.length, ref.offset)
        try:
            return group_frame(data)
        except ValueError:
            raise OSError(f"WAL record at {ref.segment_name}:{ref.offset} is damaged") from None

    def append_control(self, control: dict) -> int:
        n = self._write([b"C", _CONTROL_ENCODER.encode(control)])
        self._untrack(control.get("consumed", ()))
        return n

    def request_sync(self) -> int:
        """Ticket for everything appended so far: durable once ``durable() >= ticket``."""
        if self.fsync_policy != "always":
            if (t := self.commit()) is not None:
                self._fsync_times.append(t)
            self._requested = self._synced = self._requested + 1
            return self._requested
        with self._cv:
            if self._dirty:
                self._dirty = False
                self._requested += 1
                if self._syncer_idle:  # else it re-checks _requested before it waits (notify is slow Python)
                    self._cv.notify_all()
            return self._requested

    def durable(self) -> int:
        """The highest ticket whose records are on disk. Raises if the disk failed."""
        if self._sync_error is not None:
            raise WalFailed(f"WAL fsync failed: {self._sync_error}") from self._sync_error
        return self._synced

    def clear_wakeup(self) -> None:
        """Drain ``wakeup_fd`` (before checking ``durable()``, so no wake-up is lost)."""
        if self.wakeup_fd is not None:
            try:
                os.eventfd_read(self.wakeup_fd)
            except BlockingIOError:
                pass

    def wait_durable(self) -> None:
        with self._cv:
            while self._synced < self._requested and self._sync_error is None:
                self._cv.wait(0.1)
        self.durable()

    def fsync_seconds(self) -> list[float]:
        """Group commit durations since the last call (the direct write, if any, and the fsync)."""
        with self._cv:
            out, self._fsync_times = self._fsync_times, []
        return out

    def _sync_loop(self) -> None:
        while True:
            with self._cv:
                while self._synced >= self._requested and not self._closing:
                    self._syncer_idle = True
                    self._cv.wait()
                    self._syncer_idle = False
                if self._synced >= self._requested:
                    return
                target, fd, appender = self._requested, self._fd, self._appender
            t0 = time.monotonic()
            try:
                if appender is not None:
                    appender.flush()  # every record queued so far, so all of ticket `target`
                _sync_data(fd)  # covers every write made before this call, so all of ticket `target`
            except Exception as e:  # any failure is fatal (durable() raises), never a silent hang
                self._sync_error = e.with_traceback(None)  # its frames would pin the staging buffers
                return
            with self._cv:
                self._synced = target
                self._fsync_times.append(time.monotonic() - t0)
                self._cv.notify_all()
            if self.wakeup_fd is not None:
                os.eventfd_write(self.wakeup_fd, 1)

    def commit(self, force: bool = False) -> float | None:
        """Inline fsync per the policy (the syncer must be idle); returns its seconds if one ran."""
        if not self._dirty or self._fd is None:
            return None
        now = time.monotonic()
        if not force and (self.fsync_policy == "never" or
                          (self.fsync_policy == "batch" and now - self._last_fsync < BATCH_FSYNC_S)):
            return None
        if self._appender is not None:
            self._appender.flush()
        _sync_data(self._fd)
        self._dirty = False
        self._last_fsync = time.monotonic()
        return self._last_fsync - now

    def maybe_rotate(self, checkpoint: Callable[[], dict]) -> bool:
        """Open a new segment when the current one is full (call after commit)."""
        if self._segment_size < self.segment_bytes:
            return False
        self.wait_durable()
        self.commit(force=True)
        self._close_segment()
        self.open(checkpoint())
        return True

    def _close_segment(self) -> None:
        if self._appender is not None:  # everything is written (commit): drop the staging buffer
            self._appender.close()
            self._appender = None
        os.ftruncate(self._fd, self._segment_size)  # frees the blocks reserve_blocks allocated and no record used
        os.close(self._fd)
        self._fd = None

    def compact(self) -> list[int]:
        removed = []
        for n in sorted(self._live):
            if n == self.segment or self._live[n]:
                break
            path = _segment_path(self.dir, n)
            self.disk_bytes -= path.stat().st_size if path.exists() else 0
            path.unlink(missing_ok=True)
            del self._live[n]
            if (fd := self._readers.pop(n, None)) is not None:
                os.close(fd)
            removed.append(n)
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
        if self._fd is not None and self._sync_error is None:
            self.commit(force=self.fsync_policy != "never")
            self._close_segment()
        elif self._fd is not None:  # the disk failed: release everything, write nothing more
            if self._appender is not None:
                self._appender.close()
                self._appender = None
            os.close(self._fd)
            self._fd = None
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()
        self._direct_reader.close()
        if self.wakeup_fd is not None:
            os.close(self.wakeup_fd)
            self.wakeup_fd = None
        self._unlock()  # last: nothing of this log writes to the directory any more

    # ---- bookkeeping
    def _track(self, group_id: str, segment: int) -> None:
        self._where[group_id] = segment
        self._live.setdefault(segment, set()).add(group_id)

    def _untrack(self, group_ids) -> None:
        for gid in group_ids:
            seg = self._where.pop(gid, None)
            if seg is not None:
                self._live[seg].discard(gid)

    def _fsync_dir(self) -> None:
        if self.fsync_policy == "never":
            return
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
