"""Wire protocol: small, typed, immutable msgspec messages in msgpack frames (the format, the
checks, the versions and who sends what: areal_like/DESIGN.md section 3).

Invariant: ``decode`` raises only ``ProtocolError`` (naming the field) for any input bytes.
"""

from __future__ import annotations

import gc
from typing import Annotated, Any, Literal, Union

import msgspec

from areal_like.wire.codec import Count, Finite, Message, ProtocolError, error_from
from areal_like.wire.trajectory import Trajectory

__all__ = ["PROTOCOL_VERSION", "MAX_FRAME_BYTES", "MAX_CREDITS_PER_REQUEST", "Message", "encode",
           "encode_into", "encode_group", "decode", "opened", "TOP_LEVEL_TYPES"]

# 2: Trajectory.loss_mask; 3: versions and loss masks as runs; 4: a group goes to the buffer in a
# GroupSubmit, its leases asked for there (areal_like/DESIGN.md section 3)
PROTOCOL_VERSION = 4
MAX_FRAME_BYTES = 256 * 1024 * 1024  # one batch of many long groups stays far below this
SUBMIT_ENVELOPE_BYTES = 64  # what a GroupSubmit adds to its group's frame (51 bytes at most)
MAX_CREDITS_PER_REQUEST = 4096  # leases one TrajectoryGroup may ask for with its ack
Wanted = Annotated[int, msgspec.Meta(ge=0, le=MAX_CREDITS_PER_REQUEST)]  # leases asked for at once
MAX_GROUP_RANKS = 65536  # ranks of one weight-update group (an engine's TP size, a group's size)
Ranks = Annotated[int, msgspec.Meta(ge=1, le=MAX_GROUP_RANKS)]
# a random token per rollout server process start ("": not told): another one under an id is
# another process (buffer/STALENESS.md)
Incarnation = Annotated[str, msgspec.Meta(max_length=64)]
EngineKind = Annotated[str, msgspec.Meta(max_length=32)]  # rollout.engine.kind ("": not reported)
# a peer's names and addresses reach log lines: bounded, and no control character (no forged line)
ServerId = Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$")]
Url = Annotated[str, msgspec.Meta(max_length=512, pattern=r"^[^\x00-\x1f\x7f]*$")]


class _TopLevel(Message, frozen=True, kw_only=True):
    # kw_only: after every subclass's fields, so the frame ends with it
    protocol: Literal[4] = PROTOCOL_VERSION


class Register(_TopLevel, tag="register"):
    server_id: ServerId
    engine_url: Url  # HTTP base URL of the engine this server owns (weight-sync peer)
    engine_ranks: Ranks = 1  # ranks the engine contributes to the weight-update group (its TP size)
    policy_version: int = -1  # version the engine serves now (-1: unknown)
    torch_version: str = ""  # the engine's runtime ("": unknown; areal_like/weights/versions.py)
    cuda_version: str = ""
    nccl_version: str = ""
    evaluates: bool = False  # it runs the job's evaluations (rollout.eval)
    incarnation: Incarnation = ""
    fresh: bool = False  # its first Register since it started (decides when the buffer knows none)
    engine_kind: EngineKind = ""  # the protocol its engine speaks: how a trainer drives it
    # its sync port (rollout_server/sync_port.py): the trainer's door, begin, adapter, end calls
    sync_url: Url = ""


class RegisterAck(_TopLevel, tag="register_ack"):
    server_id: ServerId
    policy_version: int  # the trainer version the buffer knows
    pub_address: str  # where VersionUpdate announcements are published


class Heartbeat(_TopLevel, tag="heartbeat"):
    server_id: ServerId
    policy_version: int  # version the engine serves
    in_flight: Count = 0  # groups being generated
    # running an evaluation: leave it out of weight syncs until it says False
    evaluating: bool = False
    # its last one: a graceful stop, off the roster now (not buffer.heartbeat_timeout_s later)
    leaving: bool = False
    incarnation: Incarnation = ""  # not its id's last Register's: it is told to stop


class CreditRequest(_TopLevel, tag="credit_request"):
    server_id: ServerId
    max_credits: Wanted
    incarnation: Incarnation = ""


class Credit(Message, tag="credit"):
    """A lease on one prompt: generate one group for dataset index ``prompt_index``."""

    lease_id: str
    prompt_index: Count  # position in the dataset
    epoch: Count  # pass over the dataset
    deadline_s: Finite  # seconds from grant after which the lease is re-issued elsewhere


class Credits(_TopLevel, tag="credits"):
    credits: list[Credit]
    policy_version: int
    reason: str = ""  # why fewer than asked (e.g. "staleness", "capacity", "unknown_server")


class TrajectoryGroup(_TopLevel, tag="trajectory_group"):
    """All samples for one prompt: the unit of storage and of hand-out. Its frame is encoded once,
    by its rollout server (``encode_group``): the buffer stores it as received and hands it out
    inside a ``Batch`` as stored."""

    group_id: str  # globally unique; dedupe key
    server_id: ServerId
    lease_id: str
    prompt_index: Count
    epoch: Count
    trajectories: Annotated[list[Trajectory], msgspec.Meta(min_length=1)]
    incarnation: Incarnation = ""

    @property
    def head_version(self) -> int:
        return min(t.head_version for t in self.trajectories)

    @property
    def n_tokens(self) -> int:
        return sum(len(t.output_ids) for t in self.trajectories)


class GroupSubmit(_TopLevel, tag="group_submit"):
    """A group sent to the buffer: its frame as its sender encoded it (``encode_group``; a re-send
    is the same bytes) and the leases wanted with the ack (saves a CreditRequest round trip)."""

    group: msgspec.Raw  # a TrajectoryGroup frame; the buffer decodes it with ``opened``
    want_credits: Wanted = 0


class Ack(_TopLevel, tag="ack"):
    ref: str  # id of what is acknowledged (group id, version, ...)
    # "unavailable": not stored now (the buffer's disk is full): keep it and send it again later
    status: Literal["accepted", "duplicate", "rejected", "ok", "unavailable"]
    reason: str = ""
    credits: list[Credit] = []  # leases asked for by GroupSubmit.want_credits


class BatchRequest(_TopLevel, tag="batch_request"):
    n_groups: Annotated[int, msgspec.Meta(ge=1)]
    trainer_version: int  # the version the batch will train (step v -> v+1)
    wait_s: Finite = 5.0  # how long the buffer may hold the request before answering empty
    # batch_id of the last Batch received ("" = none): consumed; one in transit not acked is lost
    ack_batch: str = ""


class Batch(_TopLevel, tag="batch"):
    # exactly n_groups fresh groups, or empty; the buffer puts in their stored frames (msgspec.Raw,
    # written as they are), a reader gets them decoded and checked
    groups: list[TrajectoryGroup]
    trainer_version: int
    reason: str = ""  # why empty
    # unique id of a non-empty batch; the next BatchRequest acks it with ack_batch
    batch_id: str = ""


class VersionUpdate(_TopLevel, tag="version_update"):
    policy_version: int


class RosterRequest(_TopLevel, tag="roster_request"):
    pass


class RosterEntry(Message, tag="roster_entry"):
    server_id: ServerId
    engine_url: Url
    engine_ranks: Ranks
    policy_version: int
    torch_version: str = ""  # from the member's Register ("": not reported)
    cuda_version: str = ""
    nccl_version: str = ""
    evaluates: bool = False  # from the member's Register
    incarnation: Incarnation = ""
    engine_kind: EngineKind = ""  # from the member's Register
    sync_url: Url = ""  # from the member's Register
    # the buffer's count of its lease requests and groups: the trainer leaves out a member whose
    # sync ran into the deadline until this (or its incarnation) moves (trainer/weight_sync.py)
    active: int = 0


class Roster(_TopLevel, tag="roster"):
    members: list[RosterEntry]
    policy_version: int
    evaluating: list[str] = []  # servers out of the roster while they evaluate


class HeartbeatAck(_TopLevel, tag="heartbeat_ack"):
    policy_version: int
    known: bool  # False: the buffer lost this server (restart/expiry); it must Register again
    # why a Register under this server's id from another process was refused since its last
    # heartbeat ("": none); it keeps its id (buffer/STALENESS.md, The roster)
    challenged: str = ""


class StatsRequest(_TopLevel, tag="stats_request"):
    pass


class Stats(_TopLevel, tag="stats"):
    values: dict[str, Any]  # flat str -> number


_ALL = (Trajectory, Register, RegisterAck, Heartbeat, HeartbeatAck, CreditRequest, Credit, Credits,
        TrajectoryGroup, GroupSubmit, Ack, BatchRequest, Batch, VersionUpdate, RosterRequest,
        RosterEntry, Roster, StatsRequest, Stats)
for _cls in _ALL:
    _cls.TYPE = _cls.__struct_config__.tag
TOP_LEVEL_TYPES: dict[str, type[Message]] = {c.TYPE: c for c in _ALL if issubclass(c, _TopLevel)}
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Union[tuple(TOP_LEVEL_TYPES.values())])


def _top_level(msg: Message) -> None:
    if type(msg) not in _TOP_CLASSES:
        raise ProtocolError(f"not a top-level message: {type(msg).__name__}")


_TOP_CLASSES = frozenset(TOP_LEVEL_TYPES.values())
_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, msgspec.EncodeError)


def encode(msg: Message) -> bytes:
    """Serialise a top-level message. Raises ProtocolError naming the field (``frame``: a value
    msgpack cannot carry, such as a numpy scalar, or a frame over the limit)."""
    _top_level(msg)
    try:
        data = _ENCODER.encode(msg)
    except _ENCODE_ERRORS as e:  # e.g. a set in a free-form dict
        raise ProtocolError(f"cannot encode: {e}", "frame") from None
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{len(data)} bytes exceeds the limit of {MAX_FRAME_BYTES}", "frame")
    return data


def encode_group(group: TrajectoryGroup) -> msgspec.Raw:
    """A group's frame, encoded once: what every send of it carries (``GroupSubmit.group``).
    ProtocolError as ``encode``, also when its GroupSubmit would be over the limit."""
    if len(data := encode(group)) > MAX_FRAME_BYTES - SUBMIT_ENVELOPE_BYTES:
        raise ProtocolError(f"{len(data)} bytes and a GroupSubmit's envelope exceed the limit of "
                            f"{MAX_FRAME_BYTES}", "frame")
    return msgspec.Raw(data)


def opened(submit: GroupSubmit) -> tuple[TrajectoryGroup, memoryview]:
    """The group a GroupSubmit carries, decoded and checked, and its frame (a view of the
    submit's frame, no copy); else ProtocolError naming the field under ``group``."""
    frame = memoryview(submit.group)
    try:
        group = decode(frame)
    except ProtocolError as e:
        raise ProtocolError(e.reason, f"group.{e.field}") from None
    if not isinstance(group, TrajectoryGroup):
        raise ProtocolError(f"expected a trajectory_group, got {group.TYPE}", "group")
    return group, frame


def encode_into(msg: Message, buffer: bytearray) -> None:
    """``encode`` into a caller-owned buffer (resized to the frame, allocation kept)."""
    _top_level(msg)
    try:
        _ENCODER.encode_into(msg, buffer)
    except _ENCODE_ERRORS as e:
        raise ProtocolError(f"cannot encode: {e}", "frame") from None
    if (n := len(buffer)) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{n} bytes exceeds the limit of {MAX_FRAME_BYTES}", "frame")


def decode(data: bytes | bytearray | memoryview, max_bytes: int | None = None) -> Message:
    """Parse and validate one frame; only ProtocolError, for any input. Arrays are read-only views
    of the frame. A frame over ``max_bytes`` is refused from its length alone: decoding can take
    ~73x its size, so the size bound is the memory bound. The cyclic GC is off while msgspec
    parses: a frame nested deeply runs the stack to the recursion limit, where a finalizer that
    a collection ran (any object's, of any thread's garbage) would fail with RecursionError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"frame must be bytes, got {type(data).__name__}", "frame")
    limit = MAX_FRAME_BYTES if max_bytes is None else max_bytes
    try:
        n = memoryview(data).nbytes
    except ValueError as e:  # a released memoryview
        raise ProtocolError(str(e), "frame") from None
    if n > limit:  # before any copy below
        raise ProtocolError(f"{n} bytes exceeds the limit of {limit}", "frame")
    collecting = gc.isenabled()  # False: another thread decodes, and re-enables it when done
    gc.disable()
    try:
        return _decode(_frame(data))
    finally:
        if collecting:
            gc.enable()


def _decode(data: bytes | memoryview) -> Message:
    try:
        return _DECODER.decode(data)
    except RecursionError:  # arrays or maps nested deeper than the interpreter's recursion limit
        raise ProtocolError("nested too deeply", "frame") from None
    # msgspec reports bad UTF-8 in a key like this
    except (msgspec.MsgspecError, UnicodeDecodeError) as e:
        if (version := _version_of(data)) is not None and version != PROTOCOL_VERSION:
            # named before whatever else is wrong: a version-1 group also lacks loss_mask, which
            # msgspec meets first (the version ends the frame)
            raise ProtocolError(f"unsupported protocol version {version!r} "
                                f"(this side speaks {PROTOCOL_VERSION})",
                                "protocol") from None
        raise error_from(e, PROTOCOL_VERSION) from None


def _frame(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    """``data`` as bytes or a read-only 1-D byte view (what msgspec slices arrays from
    correctly)."""
    if isinstance(data, memoryview):
        return data.toreadonly().cast("B") if data.c_contiguous else data.tobytes()
    if isinstance(data, bytearray):
        return bytes(data)  # decoded arrays must not alias a buffer the caller may reuse
    return data


class _Versioned(msgspec.Struct):
    protocol: Any = None  # of any frame that is a map; the rest is skipped in C


_VERSION_DECODER = msgspec.msgpack.Decoder(_Versioned)


def _version_of(data: bytes | memoryview) -> Any:
    """The ``protocol`` of a refused frame (None: absent, or not a map): read only on the error
    path."""
    try:
        return _VERSION_DECODER.decode(data).protocol
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return None
