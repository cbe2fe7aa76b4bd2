"""Write-ahead log: append-only segment files, so that an acknowledged group survives a crash.

Layout: ``<wal_dir>/seg-<n>.wal``, n increasing. Every start and every rotation opens a new
segment whose first record is a checkpoint (the small control state, see ``BufferService``), so a
segment never continues after a crash and older segments' control records are superseded.

Record framing (little-endian)::

    u32 length | u32 crc32(payload) | payload
    payload = b"G" + u16 len(group_id) + group_id + frame     # a TrajectoryGroup, wire bytes as received
            | b"C" + msgpack map                              # control: {"state", "consumed", "seen", ...}

A control record's ``consumed`` list marks groups handed to the trainer or dropped; replay yields
everything in order and the caller applies it, so restart rebuilds exactly the unconsumed groups.

Writing is pipelined: ``append_*`` only queues a record; the writer thread checksums it, writes
it with ``os.writev`` straight to the file descriptor (no user-space buffer) and syncs per the
policy. ``request_sync()`` returns a ticket (the number of records appended so far) and the
service sends a reply only once ``durable() >= ticket``, so the daemon loop keeps decoding and
validating while the disk works. A written record survives the *process* dying (``kill -9``);
fsync decides what survives the *machine* dying:
* ``always`` (default): the writer fsyncs after every batch it takes from the queue, before the
  ticket counts as durable. One fsync covers every record that queued up during the previous one
  (group commit), which is how the safe policy keeps up with the network.
* ``batch``: fsync at most every ``BATCH_FSYNC_S``; replies may precede the fsync.
* ``never``: the OS flushes when it likes.
A failed write or fsync is fatal: ``durable()`` raises from then on.

Compaction (at every start and rotation): a segment is deleted once it is not the current one,
every group record in it has been consumed, and so has every older segment. Only a prefix is
deleted: a consumed mark may live in a later segment than its group, so deleting from the
middle could resurrect a group.

A torn or corrupt record (short header or payload, CRC mismatch, absurd length) ends the replay of
its segment with a warning naming file and offset; the rest of that segment is skipped and a
torn tail of the newest segment is truncated. It is never fatal and never accepted.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

BATCH_FSYNC_S = 0.05  # fsync=batch: bounds what a power loss can take to the last 50 ms of acks
MAX_RECORD_BYTES = 1 << 30  # a length above this is corruption, not a record (frames are <= 256 MiB)
_HEADER = struct.Struct("<II")
_GID_LEN = struct.Struct("<H")

log = logging.getLogger("buffer.wal")


@dataclass(slots=True)
class Record:
    kind: str  # "G" (group) | "C" (control)
    segment: int
    group_id: str = ""  # kind G
    frame: bytes = b""  # kind G: the TrajectoryGroup wire frame
    control: dict | None = None  # kind C


def _segment_path(directory: Path, n: int) -> Path:
    return directory / f"seg-{n:012d}.wal"


class WriteAheadLog:
    def __init__(self, directory: str | Path, *, fsync: str = "always", segment_bytes: int = 64 << 20):
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"fsync={fsync!r}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync_policy = fsync
        self.segment_bytes = segment_bytes
        self._fd: int | None = None
        self.segment = 0  # current segment number
        self._segment_size = 0
        self._live: dict[int, set[str]] = {}  # segment -> unconsumed group ids recorded in it
        self._where: dict[str, int] = {}  # group id -> segment
        self._last_fsync = 0.0
        # the writer thread: records queue up under _cv; tickets (record counts) <= _done are on disk
        self._cv = threading.Condition()
        self._io_lock = threading.Lock()  # held while the fd is written, synced or swapped
        self._queue: list[list[bytes | memoryview]] = []
        self._seq = 0  # records appended
        self._done = 0  # records written (and synced per the policy)
        self._unsynced = False
        self._error: BaseException | None = None
        self._fsync_times: list[float] = []
        self._writer: threading.Thread | None = None
        self._closing = False
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
        pos = 0
        while pos < len(data):
            problem = None
            if len(data) - pos < _HEADER.size:
                problem = "truncated header"
            else:
                length, crc = _HEADER.unpack_from(data, pos)
                end = pos + _HEADER.size + length
                if length < 1 or length > MAX_RECORD_BYTES:
                    problem = f"invalid length {length}"
                elif end > len(data):
                    problem = f"truncated payload ({len(data) - pos - _HEADER.size} of {length} bytes)"
                elif zlib.crc32(memoryview(data)[pos + _HEADER.size:end]) != crc:
                    problem = "checksum mismatch"
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
            yield self._parse(data, pos + _HEADER.size, end, n)
            pos = end

    def _parse(self, data: bytes, start: int, end: int, segment: int) -> Record:
        kind = data[start:start + 1]
        if kind == b"G":
            (n,) = _GID_LEN.unpack_from(data, start + 1)
            gid = data[start + 3:start + 3 + n].decode()
            self._track(gid, segment)
            return Record("G", segment, group_id=gid, frame=data[start + 3 + n:end])  # a copy: frees the segment
        control = msgpack.unpackb(data[start + 1:end], raw=False)
        self._untrack(control.get("consumed", ()))
        return Record("C", segment, control=control)

    # ---- writing: the caller enqueues records; the writer thread checksums, writes and syncs them
    def open(self, checkpoint: dict) -> None:
        """Start a fresh segment beginning with ``checkpoint`` (durable on return), then compact."""
        self.segment += 1
        fd = os.open(_segment_path(self.dir, self.segment), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        with self._io_lock:
            self._fd = fd
        self._segment_size = 0
        self._live[self.segment] = set()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="wal-writer", daemon=True)
            self._writer.start()
        self.append_control({**checkpoint, "checkpoint": True})
        self.commit(force=True)
        self._fsync_dir()
        self.compact()

    def _enqueue(self, parts: list[bytes | memoryview]) -> int:
        size = _HEADER.size + sum(memoryview(p).nbytes for p in parts)
        with self._cv:
            self._queue.append(parts)
            self._seq += 1
            self._cv.notify_all()
        self._segment_size += size
        self.disk_bytes += size
        return size

    def append_group(self, group_id: str, frame: bytes | memoryview) -> int:
        gid = group_id.encode()
        n = self._enqueue([b"G", _GID_LEN.pack(len(gid)), gid, frame])
        self._track(group_id, self.segment)
        return n

    def append_control(self, control: dict) -> int:
        n = self._enqueue([b"C", msgpack.packb(control, use_bin_type=True)])
        self._untrack(control.get("consumed", ()))
        return n

    def request_sync(self) -> int:
        """Ticket for everything appended so far: written, and synced per the policy, once
        ``durable() >= ticket``."""
        return self._seq

    def durable(self) -> int:
        """The highest ticket whose records are written (and synced). Raises if the disk failed."""
        if self._error is not None:
            raise OSError(f"WAL write failed: {self._error}") from self._error
        return self._done

    def wait_durable(self) -> None:
        with self._cv:
            while self._done < self._seq and self._error is None:
                self._cv.wait(0.1)
        self.durable()

    def fsync_seconds(self) -> list[float]:
        """fsync durations since the last call (for the latency histogram)."""
        with self._cv:
            out, self._fsync_times = self._fsync_times, []
        return out

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                timed_out = False
                while not self._queue and not self._closing and not timed_out:
                    # fsync=batch: writes not yet synced are synced after at most BATCH_FSYNC_S
                    pending = self._unsynced and self.fsync_policy == "batch"
                    timed_out = not self._cv.wait(BATCH_FSYNC_S if pending else None)
                if not self._queue and self._closing:
                    return
                batch, self._queue, target = self._queue, [], self._seq
            try:
                with self._io_lock:
                    for parts in batch:
                        self._write(parts)
                    seconds = self._sync(force=timed_out and self._unsynced)
            except OSError as e:
                log.error("wal: write failed: %s", e)
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self._done = target
                if seconds is not None:
                    self._fsync_times.append(seconds)
                self._cv.notify_all()

    def _write(self, parts: list[bytes | memoryview]) -> None:
        crc = length = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
            length += memoryview(p).nbytes
        n = os.writev(self._fd, [_HEADER.pack(length, crc), *parts])
        if n != _HEADER.size + length:  # a short write to a regular file means the disk is full
            raise OSError(f"short write to the WAL ({n} of {_HEADER.size + length} bytes)")
        self._unsynced = True

    def _sync(self, force: bool = False) -> float | None:
        """fsync per the policy (caller holds the io lock); returns its seconds if one ran."""
        now = time.monotonic()
        if self._fd is None or not self._unsynced or (not force and (
                self.fsync_policy == "never" or
                (self.fsync_policy == "batch" and now - self._last_fsync < BATCH_FSYNC_S))):
            return None
        os.fsync(self._fd)
        self._unsynced = False
        self._last_fsync = time.monotonic()
        return self._last_fsync - now

    def commit(self, force: bool = False) -> float | None:
        """Wait until every appended record is written (and synced per the policy); ``force``
        fsyncs now whatever the policy. Returns the seconds of that fsync if one ran."""
        self.wait_durable()
        if not force:
            return None
        with self._io_lock:
            return self._sync(force=True)

    def maybe_rotate(self, checkpoint: Callable[[], dict]) -> bool:
        """Open a new segment when the current one is full."""
        if self._segment_size < self.segment_bytes:
            return False
        self.commit(force=True)
        with self._io_lock:
            os.close(self._fd)
            self._fd = None
        self.open(checkpoint())
        return True

    def compact(self) -> list[int]:
        removed = []
        for n in sorted(self._live):
            if n == self.segment or self._live[n]:
                break
            path = _segment_path(self.dir, n)
            self.disk_bytes -= path.stat().st_size if path.exists() else 0
            path.unlink(missing_ok=True)
            del self._live[n]
            removed.append(n)
        if removed:
            self._fsync_dir()
            log.info("wal: compacted segments %s", removed)
        return removed

    def close(self) -> None:
        if self._writer is not None:
            if self._error is None:
                self.wait_durable()
            with self._cv:
                self._closing = True
                self._cv.notify_all()
            self._writer.join(timeout=60)
            self._writer = None
        with self._io_lock:
            if self._fd is not None:
                if self._error is None and self.fsync_policy != "never":
                    self._sync(force=True)
                os.close(self._fd)
                self._fd = None

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
