"""Wire protocol: small, typed, immutable messages encoded with msgpack.

Every frame is a msgpack map ``{"type": str, "protocol": int, **fields}``. Token ids,
logprobs and per-token versions travel as raw little-endian bytes, encoded as the
3-element array ``[dtype: str, length: int, data: bytes]`` and decoded with
``numpy.frombuffer`` (zero copy, read-only views). Python lists are never used for
arrays: they are 10-14x slower to encode (specs/cpu_notes.md section 4).

``decode`` validates everything: unknown type, other protocol version, missing,
extra or wrongly typed fields, non-finite rewards, arrays whose lengths disagree,
oversized frames. Any problem raises ``ProtocolError`` naming the field; no other
exception escapes ``decode`` for any input bytes.

Message flow (DESIGN.md section 1):
    rollout -> buffer : Register, Heartbeat, CreditRequest, TrajectoryGroup, SyncDone
    buffer -> rollout : RegisterAck, HeartbeatAck, Credits, Ack
    trainer -> buffer : BatchRequest, VersionUpdate, RosterRequest, WeightSyncPlan
    buffer -> trainer : Batch, Ack, Roster, SyncStatus
    buffer -> rollout (PUB): VersionUpdate, WeightSyncPlan
    anyone -> buffer  : StatsRequest -> Stats
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 256 * 1024 * 1024  # one batch of many long groups stays far below this


class ProtocolError(ValueError):
    """A frame that cannot be accepted. ``field`` names what is wrong."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


# Array dtypes on the wire, by field-annotation marker.
class I32(np.ndarray):
    """Annotation marker: little-endian int32 array."""


class F32(np.ndarray):
    """Annotation marker: little-endian float32 array."""


_ARRAY_DTYPES = {I32: np.dtype("<i4"), F32: np.dtype("<f4")}


def as_i32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype="<i4"))


def as_f32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype="<f4"))


class Message:
    """Base of every message. Subclasses are frozen slotted dataclasses."""

    __slots__ = ()
    TYPE: ClassVar[str] = ""

    def validate(self) -> None:
        """Cross-field checks; raise ProtocolError naming the field."""


_REGISTRY: dict[str, type[Message]] = {}


def message(cls: type) -> type:
    """Class decorator: frozen, slotted, keyword-only dataclass registered by TYPE."""
    cls = dataclass(frozen=True, slots=True, kw_only=True, eq=False)(cls)  # eq: arrays compare elementwise
    assert cls.TYPE and cls.TYPE not in _REGISTRY, cls
    _REGISTRY[cls.TYPE] = cls
    return cls


# --------------------------------------------------------------------------- messages


@message
class Trajectory(Message):
    """One sampled response. Not a top-level message; travels inside TrajectoryGroup.

    ``output_ids``, ``behav_logp`` and ``versions`` are aligned: entry t belongs to
    output token t. ``versions[t]`` is the policy_version of the weights that produced
    token t (a trajectory interrupted by a weight update spans several versions).
    """

    TYPE: ClassVar[str] = "trajectory"
    prompt_ids: I32  # [P] prompt token ids
    output_ids: I32  # [T] generated token ids
    behav_logp: F32  # [T] log pi_behav(token) as the engine sampled it (fp32, temperature-scaled policy)
    versions: I32  # [T] policy_version that produced each token
    reward: float  # scalar outcome reward; finite
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    metadata: dict = field(default_factory=dict)  # free-form, msgpack-able

    def validate(self) -> None:
        t = len(self.output_ids)
        if len(self.behav_logp) != t:
            raise ProtocolError(f"length {len(self.behav_logp)} != len(output_ids) {t}", "behav_logp")
        if len(self.versions) != t:
            raise ProtocolError(f"length {len(self.versions)} != len(output_ids) {t}", "versions")
        if not math.isfinite(self.reward):
            raise ProtocolError(f"must be finite, got {self.reward}", "reward")

    @property
    def head_version(self) -> int:
        return int(self.versions.min()) if len(self.versions) else 0


@message
class Register(Message):
    TYPE: ClassVar[str] = "register"
    server_id: str
    engine_url: str  # HTTP base URL of the engine this server owns (weight-sync peer)
    engine_ranks: int = 1  # ranks the engine contributes to the weight-update group (its TP size)
    policy_version: int = -1  # version the engine serves now (-1: unknown)


@message
class RegisterAck(Message):
    TYPE: ClassVar[str] = "register_ack"
    server_id: str
    policy_version: int  # the trainer version the buffer knows
    pub_address: str  # where VersionUpdate / WeightSyncPlan announcements are published


@message
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    server_id: str
    policy_version: int  # version the engine serves
    in_flight: int = 0  # groups being generated


@message
class HeartbeatAck(Message):
    TYPE: ClassVar[str] = "heartbeat_ack"
    policy_version: int
    known: bool  # False: the buffer lost this server (restart/expiry); it must Register again
    pending_plan: WeightSyncPlan | None = None  # a sync this server must join (covers missed PUBs)


@message
class CreditRequest(Message):
    TYPE: ClassVar[str] = "credit_request"
    server_id: str
    max_credits: int


@message
class Credit(Message):
    """A lease on one prompt: generate one group for dataset index ``prompt_index``."""

    TYPE: ClassVar[str] = "credit"
    lease_id: str
    prompt_index: int  # position in the dataset
    epoch: int  # pass over the dataset
    deadline_s: float  # seconds from grant after which the lease is re-issued elsewhere


@message
class Credits(Message):
    TYPE: ClassVar[str] = "credits"
    credits: list[Credit]
    policy_version: int
    reason: str = ""  # why fewer than asked (e.g. "staleness", "capacity", "unknown_server")


@message
class TrajectoryGroup(Message):
    """All samples for one prompt: the unit of storage and of hand-out."""

    TYPE: ClassVar[str] = "trajectory_group"
    group_id: str  # globally unique; dedupe key
    server_id: str
    lease_id: str
    prompt_index: int
    epoch: int
    trajectories: list[Trajectory]

    def validate(self) -> None:
        if not self.trajectories:
            raise ProtocolError("a group needs at least one trajectory", "trajectories")

    @property
    def head_version(self) -> int:
        return min(t.head_version for t in self.trajectories)

    @property
    def n_tokens(self) -> int:
        return sum(len(t.output_ids) for t in self.trajectories)


@message
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    ref: str  # id of what is acknowledged (group id, version, ...)
    status: str  # "accepted" | "duplicate" | "rejected" | "ok"
    reason: str = ""

    def validate(self) -> None:
        if self.status not in ("accepted", "duplicate", "rejected", "ok"):
            raise ProtocolError(f"unknown status {self.status!r}", "status")


@message
class BatchRequest(Message):
    TYPE: ClassVar[str] = "batch_request"
    n_groups: int
    trainer_version: int  # the version the batch will train (step v -> v+1)
    wait_s: float = 5.0  # how long the buffer may hold the request before answering empty


@message
class Batch(Message):
    TYPE: ClassVar[str] = "batch"
    groups: list[TrajectoryGroup]  # exactly n_groups fresh groups, or empty
    trainer_version: int
    reason: str = ""  # why empty


@message
class VersionUpdate(Message):
    TYPE: ClassVar[str] = "version_update"
    policy_version: int


@message
class RosterRequest(Message):
    TYPE: ClassVar[str] = "roster_request"


@message
class RosterEntry(Message):
    TYPE: ClassVar[str] = "roster_entry"
    server_id: str
    engine_url: str
    engine_ranks: int
    policy_version: int


@message
class Roster(Message):
    TYPE: ClassVar[str] = "roster"
    members: list[RosterEntry]
    policy_version: int


@message
class SyncMember(Message):
    TYPE: ClassVar[str] = "sync_member"
    server_id: str
    rank_offset: int  # engine TP rank t is group rank rank_offset + t


@message
class BucketSpec(Message):
    """Tensors broadcast together, in this order (SGLang update_weights_from_distributed)."""

    TYPE: ClassVar[str] = "bucket_spec"
    names: list[str]
    dtypes: list[str]  # torch dtype names without "torch." (e.g. "float32")
    shapes: list[list[int]]

    def validate(self) -> None:
        if not (len(self.names) == len(self.dtypes) == len(self.shapes)):
            raise ProtocolError("names, dtypes and shapes differ in length", "names")


@message
class WeightSyncPlan(Message):
    """Trainer -> buffer -> rollout servers: how version ``policy_version`` is pushed."""

    TYPE: ClassVar[str] = "weight_sync_plan"
    policy_version: int
    group_name: str
    master_addr: str
    master_port: int
    world_size: int
    backend: str  # "gloo" | "nccl"
    reform: bool  # members must (re)join the group before receiving
    members: list[SyncMember]
    buckets: list[BucketSpec]
    deadline_s: float  # the whole sync, from publication


@message
class SyncDone(Message):
    TYPE: ClassVar[str] = "sync_done"
    server_id: str
    policy_version: int
    ok: bool
    reason: str = ""
    pause_s: float = 0.0  # how long the engine was not generating


@message
class SyncStatusRequest(Message):
    TYPE: ClassVar[str] = "sync_status_request"
    policy_version: int


@message
class SyncStatus(Message):
    TYPE: ClassVar[str] = "sync_status"
    policy_version: int
    done: list[str]  # server ids that loaded the version
    failed: list[str]


@message
class StatsRequest(Message):
    TYPE: ClassVar[str] = "stats_request"


@message
class Stats(Message):
    TYPE: ClassVar[str] = "stats"
    values: dict  # flat str -> number


# --------------------------------------------------------------------------- codec

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls, globalns=globals())
    return _HINTS[cls]


def _to_wire(value: Any) -> Any:
    if isinstance(value, Message):
        out = {"type": value.TYPE}
        for f in dataclasses.fields(value):
            out[f.name] = _to_wire(getattr(value, f.name))
        return out
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        return [arr.dtype.str, int(arr.shape[0]) if arr.ndim else 1, arr.tobytes()]
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    return value


def encode(msg: Message) -> bytes:
    """Serialise a top-level message to bytes."""
    if not isinstance(msg, Message):
        raise ProtocolError(f"not a message: {type(msg).__name__}")
    wire = _to_wire(msg)
    wire["protocol"] = PROTOCOL_VERSION
    return msgpack.packb(wire, use_bin_type=True)


def _from_wire(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp in _ARRAY_DTYPES:
        dtype = _ARRAY_DTYPES[tp]
        if not (isinstance(value, list) and len(value) == 3):
            raise ProtocolError("expected array [dtype, length, bytes]", path)
        dt, n, data = value
        if dt != dtype.str:
            raise ProtocolError(f"dtype {dt!r}, expected {dtype.str!r}", path)
        if type(n) is not int or n < 0 or not isinstance(data, bytes) or len(data) != n * dtype.itemsize:
            raise ProtocolError("array length does not match its bytes", path)
        return np.frombuffer(data, dtype=dtype)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _from_wire(inner, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"expected list, got {type(value).__name__}", path)
        (inner,) = typing.get_args(tp)
        return [_from_wire(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and issubclass(tp, Message):
        return _message_from_wire(tp, value, path)
    if tp is float:
        if type(value) not in (float, int):
            raise ProtocolError(f"expected float, got {type(value).__name__}", path)
        return float(value)
    if tp is int:
        if type(value) is not int:
            raise ProtocolError(f"expected int, got {type(value).__name__}", path)
        return value
    if tp is bool:
        if type(value) is not bool:
            raise ProtocolError(f"expected bool, got {type(value).__name__}", path)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ProtocolError(f"expected str, got {type(value).__name__}", path)
        return value
    if tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ProtocolError("expected a map with string keys", path)
        return value
    raise ProtocolError(f"unsupported field type {tp}", path)  # pragma: no cover - schema bug


def _message_from_wire(cls: type[Message], value: Any, path: str) -> Message:
    if not isinstance(value, dict):
        raise ProtocolError(f"expected map, got {type(value).__name__}", path or "frame")
    if value.get("type") != cls.TYPE:
        raise ProtocolError(f"expected type {cls.TYPE!r}, got {value.get('type')!r}", f"{path}.type" if path else "type")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(value) - names - {"type", "protocol"}
    if extra:
        raise ProtocolError("unknown field", f"{path}.{sorted(map(str, extra))[0]}" if path else sorted(map(str, extra))[0])
    kwargs = {}
    for f in dataclasses.fields(cls):
        fpath = f"{path}.{f.name}" if path else f.name
        if f.name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError("missing field", fpath)
            continue
        kwargs[f.name] = _from_wire(hints[f.name], value[f.name], fpath)
    msg = cls(**kwargs)
    try:
        msg.validate()
    except ProtocolError as e:
        if path and e.field:
            raise ProtocolError(str(e).split(": ", 1)[-1], f"{path}.{e.field}") from None
        raise
    return msg


def decode(data: bytes) -> Message:
    """Parse and validate one frame. Raises only ProtocolError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"frame must be bytes, got {type(data).__name__}", "frame")
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{len(data)} bytes exceeds the limit of {MAX_FRAME_BYTES}", "frame")
    try:
        wire = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME_BYTES)
    except Exception as e:  # msgpack raises many types (ExtraData, ValueError, TypeError, ...)
        raise ProtocolError(f"not a msgpack frame ({type(e).__name__})", "frame") from None
    if not isinstance(wire, dict):
        raise ProtocolError(f"expected a map, got {type(wire).__name__}", "frame")
    proto = wire.get("protocol")
    if proto != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {proto!r} (this side speaks {PROTOCOL_VERSION})", "protocol")
    cls = _REGISTRY.get(wire.get("type")) if isinstance(wire.get("type"), str) else None
    if cls is None or cls is Trajectory or cls in _NESTED_ONLY:
        raise ProtocolError(f"unknown message type {wire.get('type')!r}", "type")
    try:
        return _message_from_wire(cls, wire, "")
    except ProtocolError:
        raise
    except Exception as e:  # belt and braces: nothing but ProtocolError escapes
        raise ProtocolError(f"malformed frame ({type(e).__name__}: {e})", "frame") from None


_NESTED_ONLY = {Trajectory, Credit, RosterEntry, SyncMember, BucketSpec}
TOP_LEVEL_TYPES = {name: cls for name, cls in _REGISTRY.items() if cls not in _NESTED_ONLY}
