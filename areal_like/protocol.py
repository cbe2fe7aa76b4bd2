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
import operator
import types
import typing
from collections.abc import Callable
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
        self.reason = message

    def under(self, prefix: str) -> ProtocolError:
        """The same error for a field nested under ``prefix`` (``trajectories[2]`` + ``reward``)."""
        if not self.field:
            return ProtocolError(self.reason, prefix)
        sep = "" if self.field.startswith("[") else "."
        return ProtocolError(self.reason, f"{prefix}{sep}{self.field}")


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
#
# Each message class gets, once, an encode plan and a decode plan: one converter per field built
# from its type annotation. Encoding coerces what is unambiguous (numpy ints, int64 token arrays,
# lists for arrays) so a sender never puts a wrong dtype on the wire; decoding is strict.

_Encoder = Callable[[Any], Any]
_Parser = Callable[[Any, str], Any]
_ENCODE_PLANS: dict[type, list[tuple[str, _Encoder]]] = {}
_DECODE_PLANS: dict[type, tuple[frozenset[str], list[tuple[str, _Parser, bool]]]] = {}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=globals())


def _optional_inner(tp: Any) -> Any | None:
    """``X | None`` -> X; anything else -> None."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
        raise TypeError(f"unsupported union {tp}")  # schema bug, caught at first use
    return None


# ---- encode


def _encode_array(dtype: np.dtype) -> _Encoder:
    def enc(value: Any) -> list:
        arr = np.ascontiguousarray(value, dtype=dtype)  # no copy when it already is <i4/<f4
        if arr.ndim != 1:
            raise ProtocolError(f"expected a 1-D array, got shape {arr.shape}")
        return [dtype.str, int(arr.shape[0]), memoryview(arr)]  # msgpack packs the buffer as bin: one copy

    return enc


def _encode_int(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ProtocolError("expected int, got bool")
    return operator.index(value)  # accepts numpy integers, refuses floats


def _encode_float(value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError(f"expected float, got {type(value).__name__}")
    return float(value)


def _encode_bool(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ProtocolError(f"expected bool, got {type(value).__name__}")
    return bool(value)


def _encoder(tp: Any) -> _Encoder:
    if tp in _ARRAY_DTYPES:
        return _encode_array(_ARRAY_DTYPES[tp])
    if (inner := _optional_inner(tp)) is not None:
        inner_enc = _encoder(inner)
        return lambda v: None if v is None else inner_enc(v)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        item_enc = _encoder(item_tp)

        def enc_list(value: Any) -> list:
            out = []
            for i, x in enumerate(value):
                try:
                    out.append(item_enc(x))
                except ProtocolError as e:
                    raise e.under(f"[{i}]") from None
            return out

        return enc_list
    if isinstance(tp, type) and issubclass(tp, Message):
        return lambda v: _message_to_wire(v, tp)
    return {int: _encode_int, float: _encode_float, bool: _encode_bool}.get(tp, lambda v: v)  # str, dict


def _encode_plan(cls: type) -> list[tuple[str, _Encoder]]:
    plan = _ENCODE_PLANS.get(cls)
    if plan is None:
        hints = _hints(cls)
        plan = _ENCODE_PLANS[cls] = [(f.name, _encoder(hints[f.name])) for f in dataclasses.fields(cls)]
    return plan


def _message_to_wire(msg: Any, cls: type | None = None) -> dict:
    if not isinstance(msg, cls or Message):
        raise ProtocolError(f"expected {(cls or Message).__name__}, got {type(msg).__name__}")
    msg.validate()
    out: dict[str, Any] = {"type": msg.TYPE}
    for name, enc in _encode_plan(type(msg)):
        try:
            out[name] = enc(getattr(msg, name))
        except ProtocolError as e:
            raise e.under(name) from None
        except (TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"cannot encode: {e}", name) from None
    return out


def encode(msg: Message) -> bytes:
    """Serialise a top-level message to bytes. Raises ProtocolError naming the field if the
    message is invalid (the sender finds out, not the receiver)."""
    if not isinstance(msg, Message) or type(msg) in _NESTED_ONLY:
        raise ProtocolError(f"not a top-level message: {type(msg).__name__}")
    try:
        wire = _message_to_wire(msg)
    except ProtocolError:
        raise
    except Exception as e:  # e.g. validate() on a reward that is not a number
        raise ProtocolError(f"cannot encode: {type(e).__name__}: {e}", "frame") from None
    wire["protocol"] = PROTOCOL_VERSION
    try:
        data = msgpack.packb(wire, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:  # e.g. a numpy scalar inside a free-form dict
        raise ProtocolError(f"cannot encode: {e}", "frame") from None
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{len(data)} bytes exceeds the limit of {MAX_FRAME_BYTES}", "frame")
    return data


# ---- decode


def _parse_array(dtype: np.dtype) -> _Parser:
    def parse(value: Any, path: str) -> np.ndarray:
        if not (isinstance(value, list) and len(value) == 3):
            raise ProtocolError("expected array [dtype, length, bytes]", path)
        dt, n, data = value
        if dt != dtype.str:
            raise ProtocolError(f"dtype {dt!r}, expected {dtype.str!r}", path)
        if type(n) is not int or n < 0 or type(data) is not bytes or len(data) != n * dtype.itemsize:
            raise ProtocolError("array length does not match its bytes", path)
        return np.frombuffer(data, dtype=dtype)  # zero copy, read-only

    return parse


def _parse_scalar(tp: type) -> _Parser:
    accepted = (float, int) if tp is float else (tp,)

    def parse(value: Any, path: str) -> Any:
        if type(value) not in accepted:  # exact types: bool is not an int here
            raise ProtocolError(f"expected {tp.__name__}, got {type(value).__name__}", path)
        return tp(value) if tp is float else value

    return parse


def _parse_dict(value: Any, path: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ProtocolError("expected a map with string keys", path)
    return value


def _parser(tp: Any) -> _Parser:
    if tp in _ARRAY_DTYPES:
        return _parse_array(_ARRAY_DTYPES[tp])
    if (inner := _optional_inner(tp)) is not None:
        inner_parse = _parser(inner)
        return lambda v, path: None if v is None else inner_parse(v, path)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        item_parse = _parser(item_tp)

        def parse_list(value: Any, path: str) -> list:
            if type(value) is not list:
                raise ProtocolError(f"expected list, got {type(value).__name__}", path)
            return [item_parse(v, f"{path}[{i}]") for i, v in enumerate(value)]

        return parse_list
    if isinstance(tp, type) and issubclass(tp, Message):
        return lambda v, path: _message_from_wire(tp, v, path)
    if tp in (int, float, bool, str):
        return _parse_scalar(tp)
    if tp is dict:
        return _parse_dict
    raise TypeError(f"unsupported field type {tp}")  # schema bug


def _decode_plan(cls: type) -> tuple[frozenset[str], list[tuple[str, _Parser, bool]]]:
    plan = _DECODE_PLANS.get(cls)
    if plan is None:
        hints = _hints(cls)
        fields = [(f.name, _parser(hints[f.name]),
                   f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                  for f in dataclasses.fields(cls)]
        plan = _DECODE_PLANS[cls] = (frozenset(f.name for f in dataclasses.fields(cls)) | {"type"}, fields)
    return plan


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _message_from_wire(cls: type[Message], value: Any, path: str) -> Message:
    if type(value) is not dict:
        raise ProtocolError(f"expected map, got {type(value).__name__}", path or "frame")
    if value.get("type") != cls.TYPE:
        raise ProtocolError(f"expected type {cls.TYPE!r}, got {value.get('type')!r}", _join(path, "type"))
    allowed, fields = _decode_plan(cls)
    for key in value:
        if key not in allowed and not (key == "protocol" and not path):
            raise ProtocolError("unknown field", _join(path, str(key)))
    kwargs = {}
    for name, parse, required in fields:
        if name in value:
            kwargs[name] = parse(value[name], _join(path, name))
        elif required:
            raise ProtocolError("missing field", _join(path, name))
    msg = cls(**kwargs)
    try:
        msg.validate()
    except ProtocolError as e:
        if path:
            raise e.under(path) from None
        raise
    return msg


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse and validate one frame. Raises only ProtocolError, for any input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"frame must be bytes, got {type(data).__name__}", "frame")
    n_bytes = data.nbytes if isinstance(data, memoryview) else len(data)
    if n_bytes > MAX_FRAME_BYTES:
        raise ProtocolError(f"{n_bytes} bytes exceeds the limit of {MAX_FRAME_BYTES}", "frame")
    try:
        wire = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME_BYTES)
    except Exception as e:  # msgpack raises many types (ExtraData, ValueError, TypeError, ...)
        raise ProtocolError(f"not a msgpack frame ({type(e).__name__})", "frame") from None
    if type(wire) is not dict:
        raise ProtocolError(f"expected a map, got {type(wire).__name__}", "frame")
    proto = wire.get("protocol")
    if type(proto) is not int or proto != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {proto!r} (this side speaks {PROTOCOL_VERSION})", "protocol")
    type_name = wire.get("type")
    cls = TOP_LEVEL_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_name!r}", "type")
    try:
        return _message_from_wire(cls, wire, "")
    except ProtocolError:
        raise
    except Exception as e:  # belt and braces: nothing but ProtocolError escapes
        raise ProtocolError(f"malformed frame ({type(e).__name__}: {e})", "frame") from None


_NESTED_ONLY = {Trajectory, Credit, RosterEntry, SyncMember, BucketSpec}
TOP_LEVEL_TYPES = {name: cls for name, cls in _REGISTRY.items() if cls not in _NESTED_ONLY}
