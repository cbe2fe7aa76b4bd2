"""The WAL's lowest layer: segment names, record checks, one record's write (cut back to the last
whole record on a full disk), the directory lock, and the exceptions. The layout is described in
``wal.py``."""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

from areal_like.daemon import ComponentStopped, LockHeld, pid_lock

HEADER = struct.Struct("<II")
GID_LEN = struct.Struct("<H")
# a length above this is corruption, not a record (frames are <= 256 MiB)
MAX_RECORD_BYTES = 1 << 30


class WalFailed(ComponentStopped, OSError):
    """A write or fsync failed: nothing is made durable any more (fatal: WAL.md, Durability)."""


class WalInUse(RuntimeError):
    """Another log (in this or another process) holds the WAL directory."""


class DiskFull(OSError):
    """A record did not fit (ENOSPC, EDQUOT); the file was cut back to its last whole record."""


SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # DiskFull; any other write error (EFBIG: the file may
# grow no more, EIO) is fatal


_LOCKS: set[int] = set()  # the lock descriptors held (lock_directory)


def _close_locks_in_child() -> None:
    """A forked child's copies would keep the directories locked after the parent let go."""
    for fd in _LOCKS:
        os.close(fd)
    _LOCKS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


def lock_directory(directory: Path) -> int | None:
    """One writer per WAL directory (WAL.md, Layout): an exclusive ``flock`` on ``LOCK``, its
    descriptor (None where the file system has no locks)."""
    try:
        fd = pid_lock(directory / "LOCK", 0o644)
    except LockHeld as held:
        holder = "unknown" if held.holder == "?" else held.holder
        raise WalInUse(f"WAL directory {directory} is in use by another buffer (pid {holder}): "
                       "one buffer per wal_dir; "
                       "stop that one or give this one its own run_dir") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        logging.getLogger("buffer.wal").warning(
            "wal: %s cannot be locked (%s): nothing stops a second buffer on it", directory, e)
        return None
    _LOCKS.add(fd)
    return fd


def unlock_directory(fd: int | None) -> None:
    if fd in _LOCKS:
        _LOCKS.discard(fd)
        os.close(fd)


@dataclass(frozen=True, slots=True)
class WalRef:
    segment: int
    offset: int  # of the record header in the segment file
    length: int  # header + payload bytes


@dataclass(slots=True)
class Record:
    kind: str  # "G" (group) | "C" (control) | "D" (a damaged region, intact records after it)
    segment: int
    group_id: str = ""  # kind G; kind D: the group the damaged region held, when it still names one
    frame: bytes = b""  # kind G: the TrajectoryGroup wire frame
    control: dict | None = None  # kind C
    ref: WalRef | None = None  # kind G; kind D: the damaged bytes


def segment_path(directory: Path, n: int) -> Path:
    return Path(directory) / f"seg-{n:012d}.wal"


def record_problem(data: bytes, pos: int) -> tuple[int, str | None]:
    """``(end, None)`` if an intact record starts at ``pos``, else ``(pos, what is wrong)``."""
    if len(data) - pos < HEADER.size:
        return pos, "truncated header"
    length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if length < 1 or length > MAX_RECORD_BYTES:
        return pos, f"invalid length {length}"
    if end > len(data):
        return pos, f"truncated payload ({len(data) - pos - HEADER.size} of {length} bytes)"
    if crc32c.crc32c(memoryview(data)[pos + HEADER.size:end]) != crc:
        return pos, "checksum mismatch"
    return end, None


def record_header(parts: list[bytes | memoryview], gil_release: int) -> bytes:
    crc = 0
    for p in parts:
        crc = crc32c.crc32c(p, crc, gil_release)
    return HEADER.pack(sum(len(p) for p in parts), crc)


def write_record(fd: int, record: list[bytes | memoryview], end: int) -> int:
    """Write one record at the end of the file (``end`` bytes long), or cut it off and raise."""
    n = sum(len(p) for p in record)
    try:
        written = os.writev(fd, record)
        if 0 < written < n:  # a short write: writing the rest completes the record or says why not
            written += os.write(fd, b"".join(record)[written:])
    except OSError as e:
        os.ftruncate(fd, end)
        if e.errno not in SPACE_ERRNOS:
            raise
        raise DiskFull(e.errno, f"{os.strerror(e.errno)}: no room for a {n}-byte record") from None
    if written != n:
        os.ftruncate(fd, end)
        raise DiskFull(errno.ENOSPC, f"no space left for a {n}-byte WAL record")
    return n


def sync_data(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync


_KINDS = (ord("G"), ord("C"))  # a record could start at q if the byte after its header is a kind
_SCAN_BYTES = 16 << 20  # searched for kind bytes this much at a time
MAX_GID_BYTES = 1024  # longer group ids are refused (credits.invalid_group); the WAL has 16 bits
_MAP_HEADS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # a msgpack map starts with one of these


def _chained(data: bytes, q: int) -> bool:
    """A candidate record at ``q`` is worth its checksum: it fits and chains (WAL.md, Damage)."""
    length = HEADER.unpack_from(data, q)[0]
    end = q + HEADER.size + length
    if length < 1 or end > len(data):
        return False
    return len(data) - end <= HEADER.size or data[end + HEADER.size] in _KINDS


def next_intact(data: bytes, start: int) -> int | None:
    """The offset of the first intact record after a damaged one at ``start`` (where to read on:
    what lies between is the damage), or None when none follows (a torn or damaged tail)."""
    view = np.frombuffer(data, np.uint8)
    for chunk in range(start + 1 + HEADER.size, len(data), _SCAN_BYTES):
        part = view[chunk:chunk + _SCAN_BYTES]
        for k in np.flatnonzero((part == _KINDS[0]) | (part == _KINDS[1])).tolist():
            q = chunk + k - HEADER.size
            if _chained(data, q) and record_problem(data, q)[1] is None:
                return q
    return None


def damaged_group_id(data: bytes, start: int, end: int) -> str:
    """The group id a damaged region ``[start, end)`` still names ("" if none)."""
    at = start + HEADER.size
    if end - at < 1 + GID_LEN.size or data[at:at + 1] != b"G":
        return ""
    (n,) = GID_LEN.unpack_from(data, at + 1)
    gid = data[at + 3:at + 3 + n]
    if not 0 < n <= MAX_GID_BYTES or at + 3 + n >= end or data[at + 3 + n] not in _MAP_HEADS:
        return ""
    return gid.decode() if gid.isascii() and gid.decode().isprintable() else ""
