"""Free space under the WAL, and the buffer's degraded mode when it runs out (WAL.md, Disk space).

Invariant: group records stop ``reserve_bytes`` before the disk is full, so control records and
the next start's segment still fit; the mode is left above twice the reserve (hysteresis)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from buffer.wal import WriteAheadLog

# disk full: rotate (so that compaction can free consumed records) at most this often
DEGRADED_ROTATE_S = 1.0
# a segment sized to the disk (1/8 of its free space at start) is never smaller
MIN_SEGMENT_BYTES = 1 << 20


class DiskGuard:
    def __init__(self, path: Path, reserve_bytes: int,
                 free_bytes: Callable[[Path], int] | None = None,
                 log: logging.Logger | None = None):
        self.path, self.reserve = Path(path), reserve_bytes
        self._read = free_bytes or (lambda p: shutil.disk_usage(p).free)
        self.log = log or logging.getLogger("buffer.diskspace")
        self.free = self._read(self.path)
        self.degraded = False
        self._next_rotate = 0.0

    def sweep(self, wal: WriteAheadLog, checkpoint: Callable[[], dict]) -> None:
        """Read the free space again and enter or leave the degraded mode (not left while WAL
        records wait for room: a quota ``statvfs`` does not show); while in it, rotate the WAL now
        and then (compaction)."""
        self.free = self._read(self.path)
        if self.degraded and self.free >= 2 * self.reserve and not wal.disk_full:
            self.degraded = False
            self.log.warning("disk space is back (%d bytes free): accepting groups again",
                             self.free)
        elif not self.degraded and self.free < self.reserve:
            self.degraded = True
            self.log.error("degraded: %s; new groups are refused as unavailable (their senders "
                           "keep them), stored batches are still handed out", self.reason())
        if wal.disk_full and not self.degraded:  # the fsync thread hit ENOSPC anyway
            self.full()
            self.log.error("degraded: no room to write %s; new groups are refused until space "
                           "returns", wal.disk_error)
        now = time.monotonic()
        if self.degraded and not wal.disk_full and now >= self._next_rotate:
            self._next_rotate = now + DEGRADED_ROTATE_S
            # a new segment lets compaction free this one's records; the opening checkpoint does
            # not count (a big one would rotate every DEGRADED_ROTATE_S with no new record)
            if wal.records_size >= MIN_SEGMENT_BYTES:
                wal.maybe_rotate(checkpoint, force=True)

    def room(self, nbytes: int) -> bool:
        """Whether a group record of ``nbytes`` may be written now (it leaves the reserve free)."""
        if self.degraded or self.free - nbytes < self.reserve:
            self.degraded = True
            return False
        return True

    def wrote(self, nbytes: int) -> None:
        self.free -= nbytes

    def full(self) -> None:
        """A write failed with ENOSPC although the estimate had room (another writer filled the
        disk)."""
        self.free, self.degraded = 0, True

    def reason(self) -> str:
        return (f"disk_full: {self.free} bytes free under {self.path}, below the reserve of "
                f"{self.reserve} (buffer.wal_reserve_bytes); send it again later")
