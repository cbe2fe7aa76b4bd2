"""How the write-ahead log's bytes reach its segment files and come back.

Two ways to append, chosen per segment by ``wal.WriteAheadLog``:

* **buffered** (``os.writev`` into the page cache): a record is in the kernel once the call
  returns, so it survives the process being killed before any fsync. Used by ``fsync=batch`` and
  ``never``, whose acks may precede the fsync, and wherever direct I/O is refused (older tmpfs).
* **direct** (``DirectAppender``, ``O_DIRECT``, used by ``fsync=always``): records are queued in
  memory and the WAL's fsync thread copies them into a page-aligned staging buffer that it writes
  to the device, then fdatasyncs. Nothing is acked before that, so a queued record lost with the
  process was never acknowledged. Why: copying a 400 KB group into the page cache took 100-470 us
  of the buffer's CPU per group on the VMs this was measured on (fresh page-cache pages are
  faulted in, and the fsync then walks them again); the direct path costs one copy into a warm
  buffer, and the page cache stays empty instead of holding every stored group.

Direct I/O writes whole aligned blocks. The last, partly filled block of a flush is written padded
with zeros and written again, with more records, by the next flush; its old bytes are rewritten
unchanged, so a torn rewrite cannot damage a record that was already acknowledged. After a crash
a segment may therefore end in zeros up to a block boundary: replay treats an all-zero tail as
the clean end of the records (``is_zero_tail``). A closed segment is truncated to its records.

Reads of a directly written segment (``DirectReader``) also bypass the page cache: the aligned
blocks around a record are read into a kept buffer and the record is copied out.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
from collections.abc import Callable

import numpy as np

BLOCK = 4096  # O_DIRECT alignment of offsets, lengths and buffers: a multiple of every device's sector
STAGE_BYTES = 2 << 20  # staging buffer: writes of up to 2 MiB (a multiple of BLOCK)
FALLOC_FL_KEEP_SIZE = 1  # linux/falloc.h: reserve blocks past the end without changing the file size
O_DIRECT = getattr(os, "O_DIRECT", 0)


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _private_map(nbytes: int) -> mmap.mmap:
    """Page-aligned memory, as O_DIRECT requires: private anonymous pages (a shared mapping is shmem,
    whose pages the kernel pins for I/O on a slower path)."""
    return mmap.mmap(-1, _round_up(nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def reserve_blocks(fd: int, nbytes: int) -> None:
    """Allocate a new segment's blocks up front, keeping its size 0 (replay never reads past the
    records). Appends then land in allocated blocks: ext4 skips its per-block delayed-allocation
    work, a quarter of the CPU of a 400 KB buffered append (measured). Closing or rotating frees
    what no record used; after a crash the next start's replay frees it (``release_reserved``).
    Best effort: a file system without fallocate just allocates as it goes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, nbytes)
    except (OSError, AttributeError):
        pass


def release_reserved(path: os.PathLike, size: int) -> None:
    """Free the blocks ``reserve_blocks`` left past the data of a segment a crash never closed:
    truncating to the current size drops them (ext4 and tmpfs, checked, free preallocated blocks past
    the new size even when it does not change). A segment without a reservation, or one that grew
    since it was read, is left alone. A stat per segment at start."""
    st = os.stat(path)
    if st.st_size == size and st.st_blocks * 512 > size + st.st_blksize:
        os.truncate(path, size)


def is_zero_tail(data: bytes | memoryview, pos: int) -> bool:
    """Whether everything from ``pos`` on is zero padding a direct append left (less than a block)."""
    rest = len(data) - pos  # padding ends the file on a block boundary; a buffered segment never does
    return 0 < rest < BLOCK and len(data) % BLOCK == 0 and not any(memoryview(data)[pos:])


def open_direct(path: os.PathLike, flags: int) -> int | None:
    """``os.open`` with O_DIRECT, or None where the file system refuses it (tmpfs, some overlays)."""
    if not O_DIRECT:
        return None
    try:
        return os.open(path, flags | O_DIRECT, 0o644)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return None


class DirectAppender:
    """A segment's records appended with O_DIRECT: ``add`` queues a record (any thread), ``flush``
    writes everything queued so far (one thread at a time; the caller fsyncs afterwards). Each
    record is written as ``header(parts)`` followed by its parts: the header (a checksum) is computed
    by the flushing thread, off the thread that queues."""

    def __init__(self, fd: int, header: Callable[[list], bytes], start: int = 0, stage_bytes: int = STAGE_BYTES):
        if start % BLOCK:
            raise ValueError(f"a direct segment starts at a block boundary, not at {start}")
        self.fd = fd
        self._header = header
        self._map = _private_map(stage_bytes)
        self._stage = np.frombuffer(self._map, np.uint8)  # numpy copies release the GIL
        self._view = memoryview(self._map)
        self._base = start  # file offset of stage[0]: a block boundary
        self._fill = 0  # stage[:_fill] holds stream bytes (the first of them may already be on disk)
        self._queue: list = []
        self._queue_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self.written = start  # stream bytes on the device (not yet synced: the caller fsyncs)

    def add(self, parts: list) -> None:
        """Queue a record's bytes-like parts (kept referenced until written)."""
        with self._queue_lock:
            self._queue.append(parts)

    def flush(self) -> int:
        """Write every queued byte; returns the stream size now on the device."""
        with self._flush_lock:
            with self._queue_lock:
                records, self._queue = self._queue, []
            stage, size = self._stage, len(self._stage)
            for part in (p for parts in records for p in (self._header(parts), *parts)):
                src = np.frombuffer(part, np.uint8)
                pos = 0
                while pos < len(src):
                    n = min(len(src) - pos, size - self._fill)
                    stage[self._fill:self._fill + n] = src[pos:pos + n]
                    self._fill += n
                    pos += n
                    if self._fill == size:  # a full stage: write it, start the next at its end
                        self._pwrite(size)
                        self._base += size
                        self._fill = 0
            if self._fill:
                end = _round_up(self._fill)
                stage[self._fill:end] = 0  # padding; rewritten with records by the next flush
                self._pwrite(end)
                keep_from = self._fill - self._fill % BLOCK  # the partial last block stays staged
                if keep_from:
                    stage[:self._fill - keep_from] = stage[keep_from:self._fill]
                    self._base += keep_from
                    self._fill -= keep_from
            self.written = self._base + self._fill
            return self.written

    def _pwrite(self, nbytes: int) -> None:
        done = 0
        while done < nbytes:  # a regular file writes everything or fails; loop for the rare short write
            n = os.pwrite(self.fd, self._view[done:nbytes], self._base + done)
            if n <= 0 or n % BLOCK:
                raise OSError(f"short direct write to the WAL ({done + n} of {nbytes} bytes)")
            done += n

    def close(self) -> None:
        self._view.release()
        del self._stage
        self._map.close()


class DirectReader:
    """Reads records of segments by their offsets with O_DIRECT, into a kept aligned buffer."""

    def __init__(self) -> None:
        self._map: mmap.mmap | None = None

    def read(self, fd: int, offset: int, length: int) -> bytes:
        start = offset - offset % BLOCK
        span = _round_up(offset + length) - start
        if self._map is None or len(self._map) < span:
            if self._map is not None:
                self._map.close()
            self._map = _private_map(max(span, 1 << 20))
        with memoryview(self._map) as view:
            got = os.preadv(fd, [view[:span]], start)
            return bytes(view[offset - start:min(got, offset - start + length)])

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
