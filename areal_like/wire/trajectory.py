"""One sampled response, ``Trajectory``: token arrays that travel as raw bytes.

Token ids and logprobs travel as raw little-endian bytes, the 3-element array ``[dtype: str,
length: int, data: bytes]``, never as Python lists (20-100x slower to encode and decode). Per-token
versions and the loss mask travel as runs (protocol version 3): ``["runs<i4", length, data]``, data
the little-endian int32 pairs ``(value, end)`` of each run of equal values, ``end`` the index after
its last token (strictly increasing, the last one ``length``). A response sampled under one version
with every token generated is 8 bytes of each where it was 4 per token: a 4,096-token trajectory
travels, is encrypted and is stored in about half the bytes. A ``Trajectory`` stores these triples
itself, so msgspec encodes them and decodes them (a zero-copy ``memoryview`` of the frame) without
calling Python per array; its array attributes are made on access (``numpy.frombuffer`` views for
ids and logprobs, the runs expanded for versions and the mask; all read-only). Build one with
``Trajectory.of(...)`` from full arrays (``as_i32`` / ``as_f32`` give arrays of the wire dtypes).

Invariant: every ``Trajectory`` decoded has the wire dtypes and a finite reward (msgspec checks
each field), and every one decoded or built has aligned arrays (one entry per output token) and
well-formed runs (``validate``, one expression while all is well). ``Trajectory.of`` converts the
arrays and the reward (a finite real number, to float) and refuses what it cannot convert; the
other fields are taken as given (plain Python types: the codec's docstring). Not a top-level
message: it travels inside ``TrajectoryGroup`` (``areal_like/wire/protocol.py``).
"""

from __future__ import annotations

import math
import numbers
import struct
from typing import Any, Literal

import msgspec
import numpy as np

from areal_like.wire.codec import Count, Finite, Message, ProtocolError, field_names, wire_array

_I4, _F4 = np.dtype("<i4"), np.dtype("<f4")  # both 4 bytes an item (Trajectory's checks rely on it)
_PAIR, _END = struct.Struct("<ii"), struct.Struct("<4xi")  # one run: (value, end); its end
_U4 = np.dtype("<u4")  # a loss mask read unsigned: every value is 0 or 1 iff its max is <= 1
I32 = tuple[Literal["<i4"], Count, memoryview]  # an array on the wire: [dtype, length, bytes]
F32 = tuple[Literal["<f4"], Count, memoryview]
RUNS = "runs<i4"
R32 = tuple[Literal["runs<i4"], Count, memoryview]  # runs: [tag, length, (value, end) int32 pairs]


def as_i32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype="<i4"))


def as_f32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype="<f4"))


def mask_values_ok(mask_wire: tuple) -> bool:
    """Every value of a wire-form loss mask (runs) is 0 or 1. Not run on decode: ``Trajectory.of``,
    the buffer's admission (``areal_like/wire/group_checks.py``) and the trainer's data source check
    it."""
    return not mask_wire[1] or int(np.frombuffer(mask_wire[2], _U4)[0::2].max()) <= 1


def runs_of(values: Any, name: str) -> tuple[str, int, memoryview]:
    """A 1-D int32 array-like as its runs' wire form (``wire_array``'s conversions and errors)."""
    _, n, data = wire_array(values, "<i4", name)
    a = np.frombuffer(data, _I4)
    changes = np.flatnonzero(a[1:] != a[:-1])
    if not len(changes):  # no token, or one run: the common case
        return one_run(int(a[0]) if n else 0, n)
    ends = np.append(changes + 1, n)
    pairs = np.empty(2 * len(ends), _I4)
    pairs[0::2], pairs[1::2] = a[ends - 1], ends
    return RUNS, n, pairs.view(np.uint8).data.toreadonly()  # plain bytes, read-only, as a decoded frame's


def one_run(value: int, n: int) -> tuple[str, int, memoryview]:
    """The runs of ``n`` tokens of one value (no run for no token)."""
    return RUNS, n, memoryview(_PAIR.pack(value, n) if n else b"")


def runs_ok(wire: tuple) -> bool:
    """``wire`` (tag, length, data) holds well-formed runs of ``length`` tokens (see the module docstring).
    Cheap for one run (the common case); reads the pairs otherwise."""
    n, data = wire[1], wire[2]
    size = data.nbytes
    if size == 8:
        return _END.unpack(data)[0] == n >= 1
    if not n or not size or size % 8 or size > 8 * n:
        return not n and not size
    ends = np.frombuffer(data, _I4)[1::2]
    return bool(ends[0] >= 1 and ends[-1] == n and np.all(ends[1:] > ends[:-1]))


def runs_array(wire: tuple) -> np.ndarray:
    """The full (read-only) array of a runs wire form."""
    pairs = np.frombuffer(wire[2], _I4)
    out = np.full(wire[1], pairs[0], _I4) if len(pairs) == 2 else np.repeat(pairs[0::2], np.diff(pairs[1::2], prepend=0))
    out.flags.writeable = False
    return out


class Trajectory(Message, tag="trajectory"):
    """One sampled response. Not a top-level message; travels inside TrajectoryGroup.

    ``output_ids``, ``behav_logp`` and ``versions`` are aligned: entry t belongs to
    output token t. ``versions[t]`` is the policy_version of the weights that produced
    token t (a trajectory interrupted by a weight update spans several versions).
    ``loss_mask[t]`` is 1 when the policy generated token t (it is trained on) and 0 when it is
    context: an environment's or a tool's message, or chat-template markup, in a multi-turn
    episode. A context token's ``behav_logp`` is 0 (meaningless; nothing reads it) and its version
    is that of the generated token before it, so the oldest version of a trajectory is always
    that of a generated token (``head_version``: staleness).

    Holds each array in its wire form (``*_wire``, see the module docstring); ``Trajectory.of``
    builds one from arrays. To change a field, build a new one (``msgspec.structs.replace`` is
    fine for ``reward``, ``finish_reason`` and ``metadata``; it checks no field, so a reward put in
    that way must be a finite ``float``: the receiver's decode refuses anything else).
    """

    prompt_ids_wire: I32 = msgspec.field(name="prompt_ids")  # [P] prompt token ids
    output_ids_wire: I32 = msgspec.field(name="output_ids")  # [T] generated token ids
    # [T] log pi_behav(token) as the engine sampled it (fp32, temperature-scaled policy)
    behav_logp_wire: F32 = msgspec.field(name="behav_logp")
    versions_wire: R32 = msgspec.field(name="versions")  # runs of [T]: policy_version that produced each token
    loss_mask_wire: R32 = msgspec.field(name="loss_mask")  # runs of [T]: 1 generated (trained on), 0 context
    reward: Finite  # scalar outcome reward
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    metadata: dict[str, Any] = {}  # free-form, msgpack-able

    @classmethod
    def of(cls, *, prompt_ids: Any, output_ids: Any, behav_logp: Any, versions: Any, reward: float,
           finish_reason: str, metadata: dict | None = None, loss_mask: Any = None) -> Trajectory:
        """Build from 1-D array-likes, converted to the wire dtype (ids and logprobs of that dtype
        are taken without a copy; versions and the mask become runs); ``loss_mask`` omitted: every output token generated (single-turn).
        ``reward``: any finite real number (numpy's too), stored as a float. Raises ProtocolError
        naming the field, for a reward that is no finite number too: an environment's or an agent's
        (user code) fails its episode here, where it is built, as a bad array does."""
        reward = _finite_float(reward)
        out = wire_array(output_ids, "<i4", "output_ids")
        if loss_mask is None:
            mask = one_run(1, out[1])
        elif not mask_values_ok(mask := runs_of(loss_mask, "loss_mask")):
            raise ProtocolError("values must be 0 (context) or 1 (generated)", "loss_mask")
        return cls(wire_array(prompt_ids, "<i4", "prompt_ids"), out,
                   wire_array(behav_logp, "<f4", "behav_logp"), runs_of(versions, "versions"), mask,
                   reward, finish_reason, {} if metadata is None else metadata)

    def validate(self) -> None:
        """Each array's bytes match its length, the runs are well formed, and every per-token array
        has ``output_ids``' length (the types are msgspec's, or ``of``'s, to check)."""
        p, o, b, v, m = (self.prompt_ids_wire, self.output_ids_wire, self.behav_logp_wire,
                         self.versions_wire, self.loss_mask_wire)
        t = o[1]
        if (b[1] == t == v[1] == m[1] and o[2].nbytes == b[2].nbytes == 4 * t
                and p[2].nbytes == 4 * p[1] and runs_ok(v) and runs_ok(m)):
            return  # every trajectory received: one expression while all is well
        for name in ("prompt_ids", "output_ids", "behav_logp", "versions", "loss_mask"):
            tag, n, data = getattr(self, f"{name}_wire")
            if tag == RUNS and not runs_ok((tag, n, data)):
                raise ProtocolError("runs must be (value, end) int32 pairs, ends increasing to the "
                                    "length", name)
            if tag != RUNS and data.nbytes != 4 * n:
                raise ProtocolError("array length does not match its bytes", name)
            if name != "prompt_ids" and n != t:
                raise ProtocolError(f"length {n} != len(output_ids) {t}", name)

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
        return runs_array(self.versions_wire)

    @property
    def loss_mask(self) -> np.ndarray:
        return runs_array(self.loss_mask_wire)

    @property
    def n_tokens(self) -> int:
        return self.output_ids_wire[1]

    @property
    def version_values(self) -> np.ndarray:
        """The value of each run of ``versions``, in token order: what min and max over ``versions``
        see, without expanding the runs."""
        return np.frombuffer(self.versions_wire[2], _I4)[0::2]

    @property
    def head_version(self) -> int:
        return int(self.version_values.min()) if self.versions_wire[1] else 0

    def _public(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in field_names(Trajectory)}

    def __reduce__(self) -> tuple:  # memoryviews do not pickle; arrays do (and deepcopy copies them)
        return _trajectory_of, (self._public(),)

    def __repr__(self) -> str:
        return f"Trajectory({', '.join(f'{k}={v!r}' for k, v in self._public().items())})"


def _finite_float(value: Any) -> float:
    """``value`` as a finite float; ProtocolError naming ``reward`` when it is none (a bool is a
    bool, not a number: it does not decode as a float either)."""
    if type(value) is float and math.isfinite(value):
        return value  # what every in-tree sender passes
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ProtocolError(f"expected float, got {type(value).__name__}", "reward")
    try:
        out = float(value)
    except OverflowError:  # an int past a double's range
        out = math.inf
    if not math.isfinite(out):
        raise ProtocolError(f"must be finite, got {out}", "reward")
    return out


def _trajectory_of(fields: dict[str, Any]) -> Trajectory:
    return Trajectory.of(**fields)


Trajectory.TYPE = Trajectory.__struct_config__.tag
