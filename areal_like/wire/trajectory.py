"""One sampled response, ``Trajectory``: token arrays that travel as raw bytes, the per-token
versions and loss mask as runs (the format: areal_like/DESIGN.md section 3), stored as they are
so that msgspec (de)codes them in C; the array attributes are read-only views made on access.

Invariant: every ``Trajectory`` decoded has the wire dtypes and a finite reward (msgspec), and
every one decoded or built has aligned arrays and well-formed runs (``validate``).
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
    """Every value of a wire-form loss mask is 0 or 1 (not run on decode: group_checks runs it)."""
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
    # plain bytes, read-only, as a decoded frame's
    return RUNS, n, pairs.view(np.uint8).data.toreadonly()


def one_run(value: int, n: int) -> tuple[str, int, memoryview]:
    """The runs of ``n`` tokens of one value (no run for no token)."""
    return RUNS, n, memoryview(_PAIR.pack(value, n) if n else b"")


def runs_ok(wire: tuple) -> bool:
    """``wire`` holds well-formed runs of its length (cheap for one run, the common case)."""
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
    out = (np.full(wire[1], pairs[0], _I4) if len(pairs) == 2
           else np.repeat(pairs[0::2], np.diff(pairs[1::2], prepend=0)))
    out.flags.writeable = False
    return out


class Trajectory(Message, tag="trajectory", omit_defaults=True):
    """One sampled response; entry t of each per-token array belongs to output token t. A context
    token's (``loss_mask`` 0) ``behav_logp`` is 0 and its version the generated token's before it,
    so ``head_version`` is always a generated token's. ``msgspec.structs.replace`` checks no field:
    a reward put in that way must be a finite ``float``. Fields at their default are not sent
    (``routed_experts`` travels only where routing replay asked for it)."""

    prompt_ids_wire: I32 = msgspec.field(name="prompt_ids")  # [P] prompt token ids
    output_ids_wire: I32 = msgspec.field(name="output_ids")  # [T] generated token ids
    # [T] log pi_behav(token) as the engine sampled it (fp32, temperature-scaled policy)
    behav_logp_wire: F32 = msgspec.field(name="behav_logp")
    # runs of [T]: policy_version that produced each token
    versions_wire: R32 = msgspec.field(name="versions")
    # runs of [T]: 1 generated (trained on), 0 context
    loss_mask_wire: R32 = msgspec.field(name="loss_mask")
    reward: Finite  # scalar outcome reward
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    metadata: dict[str, Any] = {}  # free-form, msgpack-able
    # routing replay: the experts the engine routed each fed position to, int32 [P + T - 1, layers,
    # top_k] flattened (row r: prompt + output token r; the last output token is never fed)
    routed_experts_wire: I32 | None = msgspec.field(default=None, name="routed_experts")
    # [T] on-policy distillation (``distill``): log pi_teacher(token | prompt, tokens before it),
    # fp32, 0 on context tokens; None: no teacher scored this sample
    teacher_logp_wire: F32 | None = msgspec.field(default=None, name="teacher_logp")

    @classmethod
    def of(cls, *, prompt_ids: Any, output_ids: Any, behav_logp: Any, versions: Any, reward: float,
           finish_reason: str, metadata: dict | None = None, loss_mask: Any = None,
           routed_experts: Any = None, teacher_logp: Any = None) -> Trajectory:
        """Build from 1-D array-likes (of the wire dtype: no copy); ``loss_mask`` omitted: every
        token generated. ``reward``: any finite real number; ``routed_experts``: int32
        ``[P + T - 1, layers, k]`` (any shape: flattened) or None; ``teacher_logp``: float32 [T]
        or None. ProtocolError naming the field,
        for a reward that is no finite number too (user code fails its episode here)."""
        reward = _finite_float(reward)
        out = wire_array(output_ids, "<i4", "output_ids")
        if loss_mask is None:
            mask = one_run(1, out[1])
        elif not mask_values_ok(mask := runs_of(loss_mask, "loss_mask")):
            raise ProtocolError("values must be 0 (context) or 1 (generated)", "loss_mask")
        return cls(wire_array(prompt_ids, "<i4", "prompt_ids"), out,
                   wire_array(behav_logp, "<f4", "behav_logp"), runs_of(versions, "versions"), mask,
                   reward, finish_reason, {} if metadata is None else metadata,
                   None if routed_experts is None
                   else wire_array(np.asarray(routed_experts).reshape(-1), "<i4", "routed_experts"),
                   None if teacher_logp is None
                   else wire_array(teacher_logp, "<f4", "teacher_logp"))

    def validate(self) -> None:
        """Bytes match lengths, runs are well formed, per-token arrays have ``output_ids``'
        length."""
        p, o, b, v, m = (self.prompt_ids_wire, self.output_ids_wire, self.behav_logp_wire,
                         self.versions_wire, self.loss_mask_wire)
        t = o[1]
        if (b[1] == t == v[1] == m[1] and o[2].nbytes == b[2].nbytes == 4 * t
                and p[2].nbytes == 4 * p[1] and runs_ok(v) and runs_ok(m)):
            return self._validate_optional()  # every trajectory received: one expression
        for name in ("prompt_ids", "output_ids", "behav_logp", "versions", "loss_mask"):
            tag, n, data = getattr(self, f"{name}_wire")
            if tag == RUNS and not runs_ok((tag, n, data)):
                raise ProtocolError("runs must be (value, end) int32 pairs, ends increasing to the "
                                    "length", name)
            if tag != RUNS and data.nbytes != 4 * n:
                raise ProtocolError("array length does not match its bytes", name)
            if name != "prompt_ids" and n != t:
                raise ProtocolError(f"length {n} != len(output_ids) {t}", name)
        self._validate_optional()

    def _validate_optional(self) -> None:
        """The optional arrays, where present: the teacher's log-probs one finite value per output
        token, the routes a [positions, layers, top_k] array."""
        if self.teacher_logp_wire is not None:
            _, n, data = self.teacher_logp_wire
            t = self.output_ids_wire[1]
            if n != t or data.nbytes != 4 * n:
                raise ProtocolError(f"length {n} != len(output_ids) {t}", "teacher_logp")
            if not np.isfinite(np.frombuffer(data, _F4)).all():
                raise ProtocolError("values must be finite", "teacher_logp")
        if self.routed_experts_wire is None:
            return
        _, n, data = self.routed_experts_wire
        rows = self.prompt_ids_wire[1] + self.output_ids_wire[1] - 1
        if data.nbytes != 4 * n or (n % rows if rows > 0 else n):
            raise ProtocolError(f"{n} values are no [{rows} positions, layers, top_k] array",
                                "routed_experts")

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
    def routed_experts(self) -> np.ndarray | None:
        """int32 [P + T - 1, layers, top_k] flattened, or None (not recorded)."""
        if self.routed_experts_wire is None:
            return None
        return np.frombuffer(self.routed_experts_wire[2], _I4)

    @property
    def teacher_logp(self) -> np.ndarray | None:
        """float32 [T], or None (no teacher scored this sample)."""
        if self.teacher_logp_wire is None:
            return None
        return np.frombuffer(self.teacher_logp_wire[2], _F4)

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

    def __reduce__(self) -> tuple:  # memoryviews do not pickle; arrays do
        return _trajectory_of, (self._public(),)

    def __repr__(self) -> str:
        return f"Trajectory({', '.join(f'{k}={v!r}' for k, v in self._public().items())})"


def _finite_float(value: Any) -> float:
    """``value`` as a finite float (a bool is no number); ProtocolError naming ``reward``."""
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
