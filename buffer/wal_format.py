"""The write-ahead log's on-disk records: framing, checksums, parsing (no I/O, no state).

Record framing (little-endian)::

    u32 length | u32 crc32c(payload) | payload
    payload = b"G" + u16 len(group_id) + group_id + frame     # a TrajectoryGroup, wire bytes as received
            | b"C" + msgpack map                              # control: {"state", "consumed", "seen", ...}

The checksum is CRC-32C (hardware-accelerated: ~30 us on a 400 KB group where zlib's CRC-32 takes
~300 us); segments written before the switch carry zlib CRC-32 and are still read (a record whose
CRC-32C does not match is checked against CRC-32 before it is called corrupt).

``record_at`` says whether an intact record starts at an offset, and if not, what is wrong with
it (short header or payload, CRC mismatch, absurd length): ``wal.WriteAheadLog`` decides what that
means for the segment (torn tail, padding, corruption).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import crc32c
import msgpack

MAX_RECORD_BYTES = 1 << 30  # a length above this is corruption, not a record (frames are <= 256 MiB)
HEADER = struct.Struct("<II")
GID_LEN = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class WalRef:
    """Where a group record lives: ``read_group`` returns its frame while the group is live."""
    segment: int
    offset: int  # of the record header in the segment file
    length: int  # header + payload bytes

    @property
    def segment_name(self) -> str:
        return segment_path(Path(), self.segment).name


@dataclass(slots=True)
class Record:
    kind: str  # "G" (group) | "C" (control)
    segment: int
    group_id: str = ""  # kind G
    frame: bytes = b""  # kind G: the TrajectoryGroup wire frame
    control: dict | None = None  # kind C
    ref: WalRef | None = None  # kind G


def segment_path(directory: Path, n: int) -> Path:
    return directory / f"seg-{n:012d}.wal"


def checksum_ok(payload: memoryview, crc: int) -> bool:
    return crc32c.crc32c(payload) == crc or zlib.crc32(payload) == crc  # the second: segments of older versions


def record_header(parts: list[bytes | memoryview], gil_release: int = -1) -> bytes:
    """``u32 length | u32 crc32c`` of a record's payload parts. ``gil_release``: crc32c's mode (0:
    keep the GIL, the loop's own records: 30 us on a 400 KB group, a GIL round trip can cost more;
    -1: release it for big parts, the fsync thread's, so the loop runs meanwhile)."""
    crc = length = 0
    for p in parts:
        crc = crc32c.crc32c(p, crc, gil_release)
        length += len(p)
    return HEADER.pack(length, crc)


def group_record(group_id: str, frame: bytes | memoryview) -> list[bytes | memoryview]:
    """A group record's payload parts (the frame itself is not copied)."""
    gid = group_id.encode()
    return [b"G", GID_LEN.pack(len(gid)), gid, frame]


def record_at(data: bytes, pos: int) -> tuple[int, str | None]:
    """``(end, None)`` if an intact record starts at ``pos``, else ``(pos, what is wrong)``."""
    if len(data) - pos < HEADER.size:
        return pos, "truncated header"
    length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if length < 1 or length > MAX_RECORD_BYTES:
        return pos, f"invalid length {length}"
    if end > len(data):
        return pos, f"truncated payload ({len(data) - pos - HEADER.size} of {length} bytes)"
    if not checksum_ok(memoryview(data)[pos + HEADER.size:end], crc):
        return pos, "checksum mismatch"
    return end, None


def parse_record(data: bytes, pos: int, end: int, segment: int) -> Record:
    """The intact record ``data[pos:end]`` (see ``record_at``); a group's frame is a copy, so the
    segment's bytes can be freed."""
    start = pos + HEADER.size
    if data[start:start + 1] == b"G":
        (n,) = GID_LEN.unpack_from(data, start + 1)
        return Record("G", segment, group_id=data[start + 3:start + 3 + n].decode(),
                      frame=data[start + 3 + n:end], ref=WalRef(segment, pos, end - pos))
    return Record("C", segment, control=msgpack.unpackb(data[start + 1:end], raw=False))


def group_frame(record: bytes | memoryview) -> memoryview:
    """The frame of a whole group record (header included), or ValueError if it is not one intact."""
    view = memoryview(record)
    length, crc = HEADER.unpack_from(view, 0) if len(view) >= HEADER.size else (0, 0)
    if length != len(view) - HEADER.size or length < 3 or view[HEADER.size] != ord("G") \
            or not checksum_ok(view[HEADER.size:], crc):
        raise ValueError("damaged")
    (n,) = GID_LEN.unpack_from(view, HEADER.size + 1)
    return view[HEADER.size + 3 + n:]
