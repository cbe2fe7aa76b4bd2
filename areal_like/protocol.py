"""Wire protocol: small, typed, immutable messages encoded with msgpack.

Every frame is a msgpack map ``{"type": str, "protocol": int, **fields}``. Token ids,
logprobs and per-token versions travel as raw little-endian bytes, encoded as the
3-element array ``[dtype: str, length: int, data: bytes]`` and decoded with
``numpy.frombuffer`` (zero copy, read-only views). Python lists are never used for
arrays: they are 20-100x slower to encode and decode (msgpack, one trajectory of 512 / 4096
tokens: ~100 / ~830 us as lists, ~5 / ~8 us as bytes, measured on a 2-core CPU).

``decode`` validates everything: unknown type, other protocol version, missing,
extra or wrongly typed fields, non-finite rewards, arrays whose lengths disagree,
oversized frames. Any problem raises ``ProtocolError`` naming the field; no other
exception escapes ``decode`` for any input bytes. ``encode`` runs the same checks (a
Trajectory runs them when it is built), so an invalid message fails at its sender. The
machinery (and why it is fast) is in ``areal_like/codec.py``; this module is the schema.

Compatibility: a field added with a default keeps the protocol version, since frames without it
(older senders, groups already in a buffer's WAL) still decode. A component built before the
field rejects frames that carry it ("unknown field"), so upgrade the buffer before the rollout
servers and the trainer, and do not downgrade a buffer over a WAL written by a newer one.
Version 2 (multi-turn episodes): ``Trajectory.loss_mask``, required, so a version-1 frame is refused
("unsupported protocol version 1") rather than read as if every token were generated; a WAL written
by a version-1 buffer does not carry over. Added in version 1 with defaults: ``TrajectoryGroup.want_credits``,
``Ack.credits``, ``Register.torch_version`` / ``cuda_version`` / ``nccl_version`` and the same three
on ``RosterEntry``.

Message flow (areal_like/DESIGN.md section 3):
    rollout -> buffer : Register, Heartbeat, CreditRequest, TrajectoryGroup, SyncDone
    buffer -> rollout : RegisterAck, HeartbeatAck, Credits, Ack
    trainer -> buffer : BatchRequest, VersionUpdate, RosterRequest, WeightSyncPlan, SyncStatusRequest
    buffer -> trainer : Batch, Ack, Roster, SyncStatus
    buffer -> rollout (PUB): VersionUpdate, WeightSyncPlan
    anyone -> buffer  : StatsRequest -> Stats
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import numpy as np

from areal_like.codec import Codec, ProtocolError

__all__ = ["PROTOCOL_VERSION", "MAX_FRAME_BYTES", "ProtocolError", "Message", "encode", "encode_into", "decode", "TOP_LEVEL_TYPES"]

PROTOCOL_VERSION = 2  # 2: Trajectory.loss_mask (module docstring)
MAX_FRAME_BYTES = 256 * 1024 * 1024  # one batch of many long groups stays far below this
MAX_CREDITS_PER_REQUEST = 4096  # leases one TrajectoryGroup may ask for with its ack


# Array dtypes on the wire, by field-annotation marker.
class I32(np.ndarray):
    """Annotation marker: little-endian int32 array."""


class F32(np.ndarray):
    """Annotation marker: little-endian float32 array."""


_I4, _F4 = np.dtype("<i4"), np.dtype("<f4")  # both 4 bytes an item (Trajectory's checks rely on it)
_isfinite = math.isfinite
_ARRAY_DTYPES = {I32: _I4, F32: _F4}
# An array on the wire: [dtype, length, little-endian bytes]; on decode msgspec checks the tag and length >= 0
_I32Wire = tuple[Literal["<i4"], Annotated[int, msgspec.Meta(ge=0)], memoryview]
_F32Wire = tuple[Literal["<f4"], Annotated[int, msgspec.Meta(ge=0)], memoryview]


def as_i32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype="<i4"))


def as_f32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype="<f4"))


def _wire_array(value: Any, dtype: np.dtype, name: str) -> tuple[str, int, memoryview]:
    """A 1-D array-like as ``(dtype, length, bytes)``. An array of the exact dtype, contiguous, is
    taken as it is (no copy); lists, other dtypes (int64 ids, float64 logprobs) and strided views
    are converted; an int32 field takes only whole numbers that fit. Scalars, other shapes and
    raw bytes are refused."""
    if type(value) is np.ndarray and value.dtype == dtype and value.ndim == 1 and value.flags.c_contiguous:
        return dtype.str, len(value), value.data
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"raw bytes are ambiguous here; pass an array of {dtype.str}", name)
    try:
        src = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"not an array: {e}", name) from None
    if src.ndim != 1:
        raise ProtocolError(f"expected a 1-D array, got shape {src.shape}", name)
    if dtype.kind == "i" and len(src) and src.dtype != dtype:
        if src.dtype.kind == "f":  # np.zeros(n) and the like: whole numbers are taken
            if not np.all(np.isfinite(src)) or not np.all(src == np.trunc(src)):
                raise ProtocolError(f"expected whole numbers, got {src.dtype} with fractions or non-finite values", name)
        elif src.dtype.kind not in "iu":
            raise ProtocolError(f"expected integers, got {src.dtype}", name)
        info = np.iinfo(dtype)
        if src.min() < info.min or src.max() > info.max:
            raise ProtocolError(f"values outside {dtype.str}", name)
    try:
        arr = np.ascontiguousarray(src, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot convert to {dtype.str}: {e}", name) from None
    return dtype.str, len(arr), arr.data


_ONLY_STR = frozenset((str,))


def _str_keys(d: dict) -> bool:
    return _ONLY_STR.issuperset(map(type, d))  # no Python frame per key


def _as_float(value: Any, name: str) -> float:
    if type(value) is float:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError(f"expected float, got {type(value).__name__}", name)
    try:
        return float(value)
    except OverflowError:
        raise ProtocolError(f"must be finite, got {value}", name) from None


class Message:
    """Base of every message. Subclasses are frozen slotted dataclasses (Trajectory: a frozen msgspec
    Struct, see there)."""

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


_new_struct = type(msgspec.Struct).__call__  # what super().__call__ reaches, without building a super object


class _TrajectoryMeta(type(msgspec.Struct)):
    """``Trajectory(prompt_ids=..., ...)`` takes arrays by their public names and stores each in its
    wire form (msgspec Structs cannot define ``__init__``; decoding does not pass through here)."""

    def __call__(cls, *, prompt_ids: Any, output_ids: Any, behav_logp: Any, versions: Any, reward: Any,
                 finish_reason: str, metadata: dict | None = None, loss_mask: Any = None) -> Trajectory:
        if metadata is None:
            metadata = {}
        if loss_mask is None and type(output_ids) is np.ndarray and output_ids.ndim == 1:
            loss_mask = np.ones(len(output_ids), _I4)  # single-turn: every output token was generated
        # The common case (contiguous 1-D arrays of the wire dtypes, exact scalar types) in one test;
        # it is most of what building a trajectory costs. Metadata keys are checked here and not in
        # __post_init__, which also runs on decode, where msgspec checks them.
        if (type(prompt_ids) is np.ndarray and type(output_ids) is np.ndarray and type(behav_logp) is np.ndarray
                and type(versions) is np.ndarray and type(loss_mask) is np.ndarray and prompt_ids.dtype is _I4
                and output_ids.dtype is _I4 and behav_logp.dtype is _F4 and versions.dtype is _I4
                and loss_mask.dtype is _I4):
            p, o, b, v, m = prompt_ids.data, output_ids.data, behav_logp.data, versions.data, loss_mask.data
            if (p.c_contiguous and o.c_contiguous and b.c_contiguous and v.c_contiguous and m.c_contiguous
                    and p.ndim == o.ndim == b.ndim == v.ndim == m.ndim == 1 and type(reward) is float
                    and type(finish_reason) is str and type(metadata) is dict and (not metadata or _str_keys(metadata))):
                return _new_struct(cls, "trajectory", ("<i4", len(p), p), ("<i4", len(o), o), ("<f4", len(b), b),
                                   ("<i4", len(v), v), ("<i4", len(m), m), reward, finish_reason,
                                   metadata)  # positional: fields' order
        reward = _as_float(reward, "reward")
        if type(finish_reason) is not str:
            raise ProtocolError(f"expected str, got {type(finish_reason).__name__}", "finish_reason")
        if type(metadata) is not dict or not _str_keys(metadata):
            raise ProtocolError("expected a map with string keys", "metadata")
        out = _wire_array(output_ids, _I4, "output_ids")
        mask = _wire_array(np.ones(out[1], _I4) if loss_mask is None else loss_mask, _I4, "loss_mask")
        return _new_struct(cls, "trajectory", _wire_array(prompt_ids, _I4, "prompt_ids"), out,
                           _wire_array(behav_logp, _F4, "behav_logp"), _wire_array(versions, _I4, "versions"), mask,
                           reward, finish_reason, metadata)


class Trajectory(msgspec.Struct, Message, metaclass=_TrajectoryMeta, frozen=True, eq=False,
                 forbid_unknown_fields=True):
    """One sampled response. Not a top-level message; travels inside TrajectoryGroup.

    ``output_ids``, ``behav_logp`` and ``versions`` are aligned: entry t belongs to
    output token t. ``versions[t]`` is the policy_version of the weights that produced
    token t (a trajectory interrupted by a weight update spans several versions).
    ``loss_mask[t]`` is 1 when the policy generated token t (it is trained on) and 0 when it is
    context: an environment's or a tool's message, or chat-template markup, in a multi-turn
    episode. A context token's ``behav_logp`` is 0 (meaningless; nothing reads it) and its version
    is that of the generated token before it, so the oldest version of a trajectory is always
    that of a generated token (``head_version``: staleness). Omitted at construction: all ones.

    Built with ``Trajectory(prompt_ids=..., output_ids=..., behav_logp=..., versions=..., reward=...,
    finish_reason=..., metadata=..., loss_mask=...)`` from 1-D array-likes (converted to the wire dtype);
    invalid values raise ProtocolError naming the field, at construction. To change a field, build
    a new one the same way (``msgspec.structs.replace`` re-runs only ``__post_init__``'s checks,
    not those of metadata keys).

    Unlike the other messages this one is a msgspec Struct that holds each array in its wire form
    ``(dtype, length, bytes)``: msgspec encodes and decodes it in C, with no Python per array,
    which is most of what a group costs on the wire (benchmarks/bench_transport.py). The array
    attributes are numpy views of those bytes (read-only when decoded), made on each access.
    """

    TYPE: ClassVar[str] = "trajectory"
    # the wire layout (reference decoder and docs): field -> type, and which fields may be absent
    FIELDS: ClassVar[dict[str, Any]] = {"prompt_ids": I32, "output_ids": I32, "behav_logp": F32, "versions": I32,
                                        "loss_mask": I32, "reward": float, "finish_reason": str, "metadata": dict}
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"metadata"})

    type: Literal["trajectory"]  # a field, not a msgspec tag: required in every frame, as for the other messages
    prompt_ids_wire: _I32Wire = msgspec.field(name="prompt_ids")  # [P] prompt token ids
    output_ids_wire: _I32Wire = msgspec.field(name="output_ids")  # [T] generated token ids
    # [T] log pi_behav(token) as the engine sampled it (fp32, temperature-scaled policy)
    behav_logp_wire: _F32Wire = msgspec.field(name="behav_logp")
    versions_wire: _I32Wire = msgspec.field(name="versions")  # [T] policy_version that produced each token
    loss_mask_wire: _I32Wire = msgspec.field(name="loss_mask")  # [T] 1 generated (trained on), 0 context
    reward: float  # scalar outcome reward; finite
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    metadata: dict[str, Any] = {}  # free-form, msgpack-able

    def __post_init__(self) -> None:  # on construction and on decode: one expression while all is well
        t, b, v, m = self.output_ids_wire[1], self.behav_logp_wire, self.versions_wire, self.loss_mask_wire
        if not (b[1] == t == v[1] == m[1] and self.output_ids_wire[2].nbytes == b[2].nbytes == v[2].nbytes
                == m[2].nbytes == 4 * t and not (np.frombuffer(m[2], _I4) & -2).any()
                and self.prompt_ids_wire[2].nbytes == 4 * self.prompt_ids_wire[1] and type(self.reward) is float
                and _isfinite(self.reward) and type(self.finish_reason) is str and type(self.metadata) is dict):
            self.validate()  # names the field
            raise AssertionError("validate() accepted what __post_init__ refused")  # unreachable

    def validate(self) -> None:
        for name in ("prompt_ids", "output_ids", "behav_logp", "versions", "loss_mask"):
            wire = getattr(self, f"{name}_wire")
            if type(wire) is not tuple or len(wire) != 3 or type(wire[2]) is not memoryview:
                raise ProtocolError("expected a (dtype, length, memoryview) triple", name)
            if wire[2].nbytes != 4 * wire[1]:
                raise ProtocolError("array length does not match its bytes", name)
        t = self.output_ids_wire[1]
        if (n := self.behav_logp_wire[1]) != t:
            raise ProtocolError(f"length {n} != len(output_ids) {t}", "behav_logp")
        if (n := self.versions_wire[1]) != t:
            raise ProtocolError(f"length {n} != len(output_ids) {t}", "versions")
        if (n := self.loss_mask_wire[1]) != t:
            raise ProtocolError(f"length {n} != len(output_ids) {t}", "loss_mask")
        if (np.frombuffer(self.loss_mask_wire[2], _I4) & -2).any():
            raise ProtocolError("values must be 0 (context) or 1 (generated)", "loss_mask")
        if type(self.reward) is not float:
            raise ProtocolError(f"expected float, got {type(self.reward).__name__}", "reward")
        if not math.isfinite(self.reward):
            raise ProtocolError(f"must be finite, got {self.reward}", "reward")
        if type(self.finish_reason) is not str:
            raise ProtocolError(f"expected str, got {type(self.finish_reason).__name__}", "finish_reason")
        if type(self.metadata) is not dict or not _str_keys(self.metadata):
            raise ProtocolError("expected a map with string keys", "metadata")

    @property
    def prompt_ids(self) -> np.ndarray:
        return np.frombuffer(self.prompt_ids_wire[2], _I4)

    @property
    def output_ids(self) -> np.ndarray:
        return np.frombuffer(self.output_ids_wire[2], _I4)

    @property
    def behav_logp(self) -> np.ndarray:
        return np.frombuffer(self.behav_logp_wire[2], _F4)

    @property
    def versions(self) -> np.ndarray:
        return np.frombuffer(self.versions_wire[2], _I4)

    @property
    def loss_mask(self) -> np.ndarray:
        return np.frombuffer(self.loss_mask_wire[2], _I4)

    @property
    def n_tokens(self) -> int:
        return self.output_ids_wire[1]

    @property
    def head_version(self) -> int:
        return int(self.versions.min()) if self.versions_wire[1] else 0

    def _public(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def __reduce__(self) -> tuple:  # memoryviews do not pickle; arrays do (and deepcopy copies them)
        return _trajectory_from_fields, (self._public(),)

    def __repr__(self) -> str:
        return f"Trajectory({', '.join(f'{k}={v!r}' for k, v in self._public().items())})"


def _trajectory_from_fields(fields: dict[str, Any]) -> Trajectory:
    return Trajectory(**fields)


_REGISTRY[Trajectory.TYPE] = Trajectory


@message
class Register(Message):
    TYPE: ClassVar[str] = "register"
    server_id: str
    engine_url: str  # HTTP base URL of the engine this server owns (weight-sync peer)
    engine_ranks: int = 1  # ranks the engine contributes to the weight-update group (its TP size)
    policy_version: int = -1  # version the engine serves now (-1: unknown)
    # The engine's runtime, checked by the trainer before it joins a weight-sync group ("": unknown,
    # an older sender); see areal_like/versions.py.
    torch_version: str = ""
    cuda_version: str = ""
    nccl_version: str = ""


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
    evaluating: bool = False  # running an evaluation: leave it out of weight syncs until it says False


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
    want_credits: int = 0  # leases the sender wants with the ack (saves a CreditRequest round trip)

    def validate(self) -> None:
        if not self.trajectories:
            raise ProtocolError("a group needs at least one trajectory", "trajectories")
        if not 0 <= self.want_credits <= MAX_CREDITS_PER_REQUEST:
            raise ProtocolError(f"must be 0 to {MAX_CREDITS_PER_REQUEST}, got {self.want_credits}", "want_credits")

    @property
    def head_version(self) -> int:
        return min(t.head_version for t in self.trajectories)

    @property
    def n_tokens(self) -> int:
        return sum(t.n_tokens for t in self.trajectories)


@message
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    ref: str  # id of what is acknowledged (group id, version, ...)
    status: str  # "accepted" | "duplicate" | "rejected" | "ok"
    reason: str = ""
    credits: list[Credit] = field(default_factory=list)  # leases asked for by TrajectoryGroup.want_credits

    def validate(self) -> None:
        if self.status not in ("accepted", "duplicate", "rejected", "ok"):
            raise ProtocolError(f"unknown status {self.status!r}", "status")


@message
class BatchRequest(Message):
    TYPE: ClassVar[str] = "batch_request"
    n_groups: int
    trainer_version: int  # the version the batch will train (step v -> v+1)
    wait_s: float = 5.0  # how long the buffer may hold the request before answering empty
    ack_batch: str = ""  # batch_id of the last Batch received ("" = none): the buffer marks it consumed;
    # a batch still in transit that is not acked here was lost on the way and goes back to the store


@message
class Batch(Message):
    TYPE: ClassVar[str] = "batch"
    groups: list[TrajectoryGroup]  # exactly n_groups fresh groups, or empty
    trainer_version: int
    reason: str = ""  # why empty
    batch_id: str = ""  # unique id of a non-empty batch; the next BatchRequest acks it with ack_batch


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
    torch_version: str = ""  # from the member's Register ("": not reported)
    cuda_version: str = ""
    nccl_version: str = ""


@message
class Roster(Message):
    TYPE: ClassVar[str] = "roster"
    members: list[RosterEntry]
    policy_version: int
    evaluating: list[str] = field(default_factory=list)  # servers out of the roster while they evaluate


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
    plan_id: str = ""  # unique per push attempt: a re-push of the same version is a new plan
    # how the weights travel: "distributed" (the group above) | "tensor" | "disk" (trainer and engine on one GPU)
    path: str = "distributed"
    payloads: list[str] = field(default_factory=list)  # tensor: one SGLang payload per bucket; disk: [directory]


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
    pause_s: dict = field(default_factory=dict)  # server id -> seconds its engine was not generating


@message
class StatsRequest(Message):
    TYPE: ClassVar[str] = "stats_request"


@message
class Stats(Message):
    TYPE: ClassVar[str] = "stats"
    values: dict  # flat str -> number


# --------------------------------------------------------------------------- codec

_NESTED_ONLY = {Trajectory, Credit, RosterEntry, SyncMember, BucketSpec}
TOP_LEVEL_TYPES = {name: cls for name, cls in _REGISTRY.items() if cls not in _NESTED_ONLY}
_CODEC = Codec(base=Message, top_level=TOP_LEVEL_TYPES, array_dtypes=_ARRAY_DTYPES, version=PROTOCOL_VERSION)


def encode(msg: Message) -> bytes:
    """Serialise a top-level message. Raises ProtocolError naming the field if the message is
    invalid (the sender finds out, not the receiver)."""
    return _CODEC.encode(msg, MAX_FRAME_BYTES)


def encode_into(msg: Message, buffer: bytearray) -> None:
    """``encode`` into a caller-owned buffer (resized to the frame, allocation kept): the
    transport reuses one buffer per socket instead of allocating every frame."""
    _CODEC.encode_into(msg, buffer, MAX_FRAME_BYTES)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse and validate one frame. Raises only ProtocolError, for any input. Arrays are
    read-only numpy views of the frame."""
    return _CODEC.decode(data, MAX_FRAME_BYTES)


def field_names(cls: type[Message]) -> tuple[str, ...]:
    """The fields of a message class by their public (and wire) names, in wire order."""
    if hasattr(cls, "FIELDS"):  # Trajectory: its attributes hold the arrays in wire form
        return tuple(cls.FIELDS)
    return tuple(f.name for f in dataclasses.fields(cls))


def decode_reference(data: bytes) -> Message:
    """The slower reference decoder ``decode`` falls back to for refused frames (for tests)."""
    return _CODEC.decode_reference(data)


def decode_stored(data: bytes | bytearray | memoryview) -> Message:
    """``decode`` for frames a buffer stored in its WAL. A ``TrajectoryGroup`` written at version 1,
    before loss masks, is read as version 1 meant it: every output token generated (mask all ones).
    Anything else of another version is refused as ``decode`` refuses it."""
    try:
        return decode(data)
    except ProtocolError as e:
        if e.field != "protocol":
            raise
        try:
            wire = msgspec.msgpack.decode(data)
        except msgspec.DecodeError:
            raise e from None
        if not (type(wire) is dict and wire.get("protocol") == 1 and wire.get("type") == TrajectoryGroup.TYPE
                and type(wire.get("trajectories")) is list):
            raise
        for t in wire["trajectories"]:
            out = t.get("output_ids") if type(t) is dict else None
            if type(out) is list and len(out) == 3 and "loss_mask" not in t:
                n = out[1]
                t["loss_mask"] = ["<i4", n, np.ones(n if type(n) is int and n >= 0 else 0, _I4).tobytes()]
        wire["protocol"] = PROTOCOL_VERSION
        return decode(msgspec.msgpack.encode(wire))
