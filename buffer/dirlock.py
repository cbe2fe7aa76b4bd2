"""One writer per WAL directory: an exclusive ``flock`` on ``<directory>/LOCK``.

Two buffers appending to, truncating and compacting the same segments would lose acknowledged
groups without either noticing (two jobs given one ``run_dir``, a buffer started by hand beside a
running job). The lock is held from the log's construction to its ``close``; the kernel drops it
when the process dies (``kill -9`` included); a second log, in any process, fails at once with
``WalInUse`` naming the holder's PID. Where the file system has no locks it warns and runs unguarded.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import weakref
from pathlib import Path

LOCK_FILE = "LOCK"

log = logging.getLogger("buffer.wal")


class WalInUse(RuntimeError):
    """Another log (in this or another process) holds the WAL directory."""


class DirectoryLock:
    """The exclusive ``flock`` on ``<directory>/LOCK`` while ``fd`` is open; the file names the holder."""

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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        _HELD.add(self)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_HELD: weakref.WeakSet[DirectoryLock] = weakref.WeakSet()
# a forked child's copies of the lock descriptors would keep the directories locked after the parent let go
os.register_at_fork(after_in_child=lambda: [lock.release() for lock in list(_HELD)])
