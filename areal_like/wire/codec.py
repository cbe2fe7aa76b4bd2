"""Field values <-> their wire form for ``areal_like.wire.protocol``: ``Message`` (the base),
``wire_array`` (a 1-D array as the ``(dtype, length, memoryview)`` triple msgspec handles in C),
``error_from`` (a msgspec error as a ``ProtocolError`` naming msgspec's path) and ``field_names``.

Invariant: msgspec checks every field on decode (types, tags, unknown or missing fields, the
``Finite`` and ``Count`` ranges); ``validate()`` holds only rules across fields. Construction
checks no field: senders are this project's code, with plain Python types.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated, Any, ClassVar

import msgspec
import numpy as np

# every float field of every message is finite (NaN fails both bounds)
Finite = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class ProtocolError(ValueError):
    """A frame or message that cannot be accepted. ``field`` names what is wrong."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


_DTYPES = {"<i4": np.dtype("<i4"), "<f4": np.dtype("<f4")}  # the array dtypes on the wire, by tag


def wire_array(value: Any, tag: str, name: str) -> tuple[str, int, memoryview]:
    """A 1-D array-like as ``(tag, length, bytes)``: that dtype contiguous without a copy, else
    converted (an int32 field takes only whole numbers that fit); raw bytes are refused."""
    dtype = _DTYPES[tag]
    if (type(value) is np.ndarray and value.dtype == dtype and (data := value.data).ndim == 1
            and data.c_contiguous):
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
                raise ProtocolError(f"expected whole numbers, got {src.dtype} with fractions or "
                                    "non-finite values", name)
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
_NOT_FINITE = re.compile(rf"^Expected `float` [<>]= -?{re.escape(repr(sys.float_info.max))}$")
_INSIDE_ARRAY = re.compile(r"^(.*\.(?:prompt_ids|output_ids|behav_logp|versions|loss_mask))"
                           r"\[\d+\]$")


def error_from(e: Exception, version: int) -> ProtocolError:
    """``e`` (from decoding a frame) as a ProtocolError naming the field."""
    if not isinstance(e, msgspec.ValidationError):  # not msgpack at all
        return ProtocolError(f"not a msgpack frame ({e})", "frame")
    reason, _, where = str(e).partition(" - at `")
    # a bad map key is reported at its map
    where = where.removesuffix("`").removeprefix("key` in `")
    path = where.removeprefix("$").removeprefix(".")
    field = None
    if isinstance(e.__cause__, ProtocolError):  # raised by a message's validate()
        field, reason = e.__cause__.field, e.__cause__.reason
    elif _NOT_FINITE.match(reason):
        reason = "must be finite"
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

    TYPE: ClassVar[str] = ""  # the tag (areal_like/wire/protocol.py sets it for every class)

    def __post_init__(self) -> None:  # on construction, and on decode after msgspec's checks
        self.validate()

    def validate(self) -> None:
        """Rules across fields; raise ProtocolError naming the field."""


def field_names(cls: type[Message]) -> tuple[str, ...]:
    """A message class's field names as on the wire, in wire order (not ``type``, ``protocol``)."""
    return tuple(f.encode_name for f in msgspec.structs.fields(cls) if f.name != "protocol")
