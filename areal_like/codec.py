"""Field values <-> their wire form, for the messages of ``areal_like.protocol``.

* ``checker(annotation)``: what a message's ``__post_init__`` runs on a field, on construction
  and on decode. A value of the exact wire type passes as it is (what msgspec decodes always is);
  an unambiguous other form (numpy scalars, tuples, a ``torch.Size``) is converted to it; anything
  else raises ``ProtocolError`` naming the field.
* ``wire_array``: a 1-D array-like as the wire triple ``(dtype, length, memoryview)`` that a
  ``Trajectory`` stores, so msgspec encodes and decodes it in C with no Python per array.
* ``error_from``: a msgspec decode error as a ``ProtocolError`` whose ``field`` is the path msgspec
  reports (``trajectories[3].reward``).
* ``Message``: the base of every message, which runs those checks and its ``validate()`` on
  construction and on decode; ``field_names``: a message's public (wire) field names.
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any, Callable, ClassVar, Literal

import msgspec
import numpy as np

Check = Callable[[Any, str], Any]


class ProtocolError(ValueError):
    """A frame or message that cannot be accepted. ``field`` names what is wrong."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


def _name(value: Any) -> str:
    return type(value).__name__


def _int(value: Any, name: str) -> int:
    if type(value) is int:
        return value
    if isinstance(value, np.integer):
        return int(value)
    raise ProtocolError(f"expected int, got {_name(value)}", name)  # bool included: not an int on the wire


def _float(value: Any, name: str) -> float:
    """Every float field of every message is finite (a NaN or infinite wait or deadline is no
    number a receiver can act on; areal_like/DESIGN.md)."""
    if type(value) is float and math.isfinite(value):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError(f"expected float, got {_name(value)}", name)
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ProtocolError(f"must be finite, got {value}", name)
    return out


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ProtocolError(f"expected bool, got {_name(value)}", name)


def _str(value: Any, name: str) -> str:
    if type(value) is str:
        return value
    raise ProtocolError(f"expected str, got {_name(value)}", name)  # str subclasses do not encode


_ONLY_STR = frozenset((str,))


def _dict(value: Any, name: str) -> dict:
    if type(value) is dict and _ONLY_STR.issuperset(map(type, value)):  # no Python frame per key
        return value
    raise ProtocolError("expected a map with string keys", name)


def _list_of(item: Check, exact: type | None) -> Check:
    only = frozenset((exact,))

    def check(value: Any, name: str) -> list:
        if type(value) is list and only.issuperset(map(type, value)):
            return value  # the common case, and every decoded list
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise ProtocolError(f"expected list, got {_name(value)}", name)
        return [item(x, f"{name}[{i}]") for i, x in enumerate(value)]

    return check


def _instance_of(cls: type) -> Check:
    def check(value: Any, name: str) -> Any:
        if type(value) is not cls:
            raise ProtocolError(f"expected {cls.__name__}, got {_name(value)}", name)
        return value  # it checked itself when it was built

    return check


def _one_of(choices: tuple) -> Check:
    def check(value: Any, name: str) -> Any:
        if value not in choices or type(value) is not type(choices[0]):
            raise ProtocolError(f"must be one of {list(choices)}, got {value!r}", name)
        return value

    return check


_SCALARS: dict[Any, Check] = {int: _int, float: _float, bool: _bool, str: _str, dict: _dict}


def checker(tp: Any) -> Check:
    """The check for a field annotated ``tp`` (see the module docstring)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS or origin is dict:
        return _SCALARS[origin or tp]
    if origin is list:
        exact = args[0] if args[0] in (int, float, bool, str) or _is_struct(args[0]) else None
        return _list_of(checker(args[0]), exact)
    if origin is Literal:
        return _one_of(args)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = checker(next(a for a in args if a is not type(None)))
        return lambda value, name: None if value is None else inner(value, name)
    if _is_struct(tp):
        return _instance_of(tp)
    raise TypeError(f"unsupported field type {tp}")  # a schema bug, found at import


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


_DTYPES = {"<i4": np.dtype("<i4"), "<f4": np.dtype("<f4")}  # the array dtypes on the wire, by tag


def wire_array(value: Any, tag: str, name: str) -> tuple[str, int, memoryview]:
    """A 1-D array-like as ``(tag, length, bytes)``. A contiguous array of that dtype is taken as it
    is (no copy); lists, other dtypes (int64 ids, float64 logprobs) and strided views are converted;
    an int32 field takes only whole numbers that fit. Scalars, other shapes and raw bytes are refused."""
    dtype = _DTYPES[tag]
    if type(value) is np.ndarray and value.dtype == dtype and (data := value.data).ndim == 1 and data.c_contiguous:
        return tag, len(data), data
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"raw bytes are ambiguous here; pass an array of {tag}", name)
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
            raise ProtocolError(f"values outside {tag}", name)
    try:
        arr = np.ascontiguousarray(src, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot convert to {tag}: {e}", name) from None
    return tag, len(arr), arr.data


_FIELD_IN_TEXT = re.compile(r"^Object (?:missing required|contains unknown) field `(.+)`$")
_INSIDE_ARRAY = re.compile(r"^(.*\.(?:prompt_ids|output_ids|behav_logp|versions|loss_mask))\[\d+\]$")


def error_from(e: Exception, version: int) -> ProtocolError:
    """``e`` (from decoding a frame) as a ProtocolError naming the field."""
    if not isinstance(e, msgspec.ValidationError):  # not msgpack at all
        return ProtocolError(f"not a msgpack frame ({e})", "frame")
    reason, _, where = str(e).partition(" - at `")
    where = where.removesuffix("`").removeprefix("key` in `")  # a bad map key is reported at its map
    path = where.removeprefix("$").removeprefix(".")
    field = None
    if isinstance(e.__cause__, ProtocolError):  # raised by a message's __post_init__
        field, reason = e.__cause__.field, e.__cause__.reason
    elif match := _FIELD_IN_TEXT.match(reason):
        field = match.group(1)
    field = (f"{path}.{field}" if path else field) if field else path or "frame"
    if match := _INSIDE_ARRAY.match(field):  # [dtype, length, bytes]: name the array, not its item
        field = match.group(1)
    if field == "protocol":
        reason = f"unsupported protocol version ({reason}; this side speaks {version})"
    return ProtocolError(reason, field)


class Message(msgspec.Struct, frozen=True, eq=False, tag_field="type", forbid_unknown_fields=True):
    """Base of every message (``eq=False``: arrays compare elementwise, messages by identity)."""

    TYPE: ClassVar[str] = ""  # the tag (areal_like/protocol.py sets it for every class)
    _checks: ClassVar[tuple] = ()  # (field, checker) pairs, from the annotations (protocol.py)

    def __post_init__(self) -> None:  # on construction and on decode
        for name, check in self._checks:
            value = getattr(self, name)
            if (canonical := check(value, name)) is not value:
                msgspec.structs.force_setattr(self, name, canonical)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise ProtocolError naming the field."""


def field_names(cls: type[Message]) -> tuple[str, ...]:
    """The fields of a message class by their public (and wire) names, in wire order; the
    frame's ``type`` and ``protocol`` are not fields."""
    return tuple(f.encode_name for f in msgspec.structs.fields(cls) if f.name != "protocol")
