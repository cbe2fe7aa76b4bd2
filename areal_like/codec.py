"""The codec behind ``areal_like.protocol``: messages <-> msgpack frames.

Two kinds of message class:

* **Structs** (``protocol.Trajectory``, the one that carries arrays): a frozen msgspec Struct in
  its own wire form, each array a ``(dtype, length, memoryview)`` triple. It checks itself when
  built and when decoded (``__post_init__``), and msgspec encodes and decodes it in C with no
  Python per array: a group's arrays are nearly all of its bytes, so this is what a frame costs.
* **Dataclasses** (every other message): frozen, slotted. Encoding runs every ``validate()`` (an
  invalid message fails at its sender) and turns the message into a map; a converter generated
  per class handles messages whose values already have the exact wire types; anything else
  (numpy integers, tuples) takes the reference encoder, which coerces what is unambiguous and
  names the field it cannot encode. Both produce the same bytes.

msgspec then writes the frame in one pass into fresh bytes (``encode``) or into a buffer the
caller keeps (``encode_into``: no allocation per frame); array bytes are copied once, straight
into the frame.

Decoding has two paths that accept exactly the same frames:

* **fast** (every frame): msgspec parses the frame in C into generated mirror structs of the
  dataclasses (unknown fields forbidden, exact scalar types, the ``type`` tag picking the class)
  and into the Struct messages themselves (array dtype tags and non-negative lengths checked in
  C, array bytes as zero-copy ``memoryview`` slices of the frame); a thin generated pass fills
  the dataclasses' slots and runs ``validate()``.
* **reference** (only when the fast path refuses a frame): msgpack objects walked in Python,
  checking in a fixed order, so the ``ProtocolError`` names the first offending field
  (``trajectories[3].behav_logp``). The fuzz test checks that both paths agree on every frame.

Decoded arrays are read-only views of the frame; they keep the frame alive (a group's frame is
little more than its arrays, so nothing is wasted).
"""

from __future__ import annotations

import dataclasses
import operator
import sys
import threading
import types
import typing
from collections.abc import Callable
from typing import Any

import msgpack
import msgspec
import numpy as np

Converter = Callable[[Any], Any]
_MISSING = object()


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


class _Refused(Exception):
    """Fast path: the frame is not acceptable; the reference path says why."""


def _optional_inner(tp: Any) -> Any | None:
    """``X | None`` -> X; anything else -> None."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
        raise TypeError(f"unsupported union {tp}")  # schema bug, caught at first use
    return None


def _list_of(item: Converter, check_list: bool) -> Converter:
    def convert(value: Any) -> list:
        if check_list and type(value) is not list:
            raise ProtocolError(f"expected list, got {type(value).__name__}")
        out = []
        for i, x in enumerate(value):
            try:
                out.append(item(x))
            except ProtocolError as e:
                raise e.under(f"[{i}]") from None
        return out

    return convert


def _enc_hook(obj: Any) -> Any:
    """Extension values the reference decoder hands back inside free-form dicts."""
    if isinstance(obj, msgpack.ExtType):
        return msgspec.msgpack.Ext(obj.code, obj.data)
    if isinstance(obj, msgpack.Timestamp):
        return obj.to_datetime()
    raise TypeError(f"cannot encode {type(obj).__name__}")


# msgspec writes the frame straight into the bytes it returns: one copy of the array bytes,
# byte-for-byte the same frame as msgpack.packb(use_bin_type=True), about 2.5x faster.
_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def _ext_hook(code: int, data: memoryview) -> msgpack.ExtType:
    return msgpack.ExtType(code, bytes(data))  # same object the reference path produces


def _refuse() -> Any:
    raise _Refused


def _is_struct(tp: Any) -> bool:
    """A message class that is a msgspec Struct in its wire form (``protocol.Trajectory``): it
    validates itself when built or decoded, and msgspec encodes and decodes it as it is."""
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _bind(ns: dict, obj: Any) -> str:
    """Name under which generated source refers to ``obj``."""
    name = f"_g{len(ns)}"
    ns[name] = obj
    return name


# --------------------------------------------------------------------------- scalars


def _encode_int(value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, (bool, np.bool_)):
        raise ProtocolError("expected int, got bool")
    return operator.index(value)  # accepts numpy integers, refuses floats


def _encode_float(value: Any) -> float:
    if type(value) is float:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError(f"expected float, got {type(value).__name__}")
    return float(value)


def _encode_bool(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ProtocolError(f"expected bool, got {type(value).__name__}")
    return bool(value)


def _parse_int(value: Any) -> int:
    if type(value) is not int:  # exact type: bool is not an int on the wire
        raise ProtocolError(f"expected int, got {type(value).__name__}")
    return value


def _parse_float(value: Any) -> float:
    t = type(value)
    if t is float:
        return value
    if t is int:
        return float(value)
    raise ProtocolError(f"expected float, got {t.__name__}")


def _parse_exact(tp: type) -> Converter:
    def parse(value: Any) -> Any:
        if type(value) is not tp:
            raise ProtocolError(f"expected {tp.__name__}, got {type(value).__name__}")
        return value

    return parse


def _parse_dict(value: Any) -> dict:
    if type(value) is not dict or not all(type(k) is str for k in value):
        raise ProtocolError("expected a map with string keys")
    return value


class Codec:
    """Encode/decode for one message family (see the module docstring)."""

    def __init__(self, *, base: type, top_level: dict[str, type], array_dtypes: dict[type, np.dtype],
                 version: int):
        self.base, self.top_level, self.array_dtypes, self.version = base, top_level, array_dtypes, version
        self._top_classes = frozenset(top_level.values())
        self._encode_plans: dict[type, list[tuple[str, Converter]]] = {}
        self._decode_plans: dict[type, tuple[frozenset[str], list[tuple[str, Converter, bool]]]] = {}
        self._mirrors: dict[tuple[type, bool], type] = {}
        self._builders: dict[tuple[type, bool], Converter] = {}
        self._fast_encoders: dict[type, Converter] = {}
        self._fast_decoder: msgspec.msgpack.Decoder | None = None
        # The fast paths are built on first use, by one thread while any other waits: two threads
        # building msgspec decoders over the same new struct types at once crashed the process
        # (SIGSEGV inside msgspec), and a half-built converter is a stand-in that is not ready.
        self._build_lock = threading.RLock()  # re-entrant: builders recurse into nested message types

    def _hints(self, cls: type) -> dict[str, Any]:
        return typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))

    # ------------------------------------------------------------------ encode

    def _encoder(self, tp: Any) -> Converter:
        if tp in self.array_dtypes:
            raise TypeError("array fields belong to a Struct message (see _is_struct)")  # schema bug
        if (inner := _optional_inner(tp)) is not None:
            inner_enc = self._encoder(inner)
            return lambda v: None if v is None else inner_enc(v)
        if typing.get_origin(tp) is list:
            return _list_of(self._encoder(typing.get_args(tp)[0]), check_list=False)
        if _is_struct(tp):
            return lambda v: self._check_struct(v, tp)
        if isinstance(tp, type) and issubclass(tp, self.base):
            return lambda v: self._to_wire(v, tp)
        return {int: _encode_int, float: _encode_float, bool: _encode_bool}.get(tp, lambda v: v)  # str, dict

    def _encode_plan(self, cls: type) -> list[tuple[str, Converter]]:
        hints = self._hints(cls)
        plan = self._encode_plans[cls] = [(f.name, self._encoder(hints[f.name])) for f in dataclasses.fields(cls)]
        return plan

    @staticmethod
    def _check_struct(msg: Any, cls: type) -> Any:
        if type(msg) is not cls:
            raise ProtocolError(f"expected {cls.__name__}, got {type(msg).__name__}")
        return msg  # checked when it was built (__post_init__); the receiver checks everything again

    def _to_wire(self, msg: Any, cls: type) -> dict:
        if not isinstance(msg, cls):
            raise ProtocolError(f"expected {cls.__name__}, got {type(msg).__name__}")
        msg.validate()
        out: dict[str, Any] = {"type": msg.TYPE}
        for name, enc in self._encode_plans.get(type(msg)) or self._encode_plan(type(msg)):
            try:
                out[name] = enc(getattr(msg, name))
            except ProtocolError as e:
                raise e.under(name) from None
            except (TypeError, ValueError, OverflowError) as e:
                raise ProtocolError(f"cannot encode: {e}", name) from None
        return out

    def _wire(self, msg: Any) -> dict:
        if not isinstance(msg, self.base) or type(msg) not in self._top_classes:
            raise ProtocolError(f"not a top-level message: {type(msg).__name__}")
        try:
            wire = self._fast_encoder(type(msg))(msg)
        except Exception:  # refused (numpy scalars, int64 ids, an invalid field): the reference path
            try:
                wire = self._to_wire(msg, self.base)
            except ProtocolError:
                raise
            except Exception as e:  # e.g. validate() on a reward that is not a number
                raise ProtocolError(f"cannot encode: {type(e).__name__}: {e}", "frame") from None
        wire["protocol"] = self.version
        return wire

    def encode(self, msg: Any, max_bytes: int) -> bytes:
        wire = self._wire(msg)
        try:
            data = _ENCODER.encode(wire)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as e:  # e.g. a numpy scalar in a dict
            raise ProtocolError(f"cannot encode: {e}", "frame") from None
        if len(data) > max_bytes:
            raise ProtocolError(f"{len(data)} bytes exceeds the limit of {max_bytes}", "frame")
        return data

    def encode_into(self, msg: Any, buffer: bytearray, max_bytes: int) -> None:
        """``encode`` written into ``buffer`` (resized to the frame; its allocation is kept, so a
        reused buffer costs no allocation and no page faults). On ProtocolError the contents are
        undefined."""
        wire = self._wire(msg)
        try:
            _ENCODER.encode_into(wire, buffer)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as e:
            raise ProtocolError(f"cannot encode: {e}", "frame") from None
        if len(buffer) > max_bytes:
            raise ProtocolError(f"{len(buffer)} bytes exceeds the limit of {max_bytes}", "frame")

    # ------------------------------------------------------------------ decode: fast path

    def _mirror_type(self, tp: Any) -> Any:
        if _is_struct(tp):
            return tp
        if (inner := _optional_inner(tp)) is not None:
            return self._mirror_type(inner) | None
        if typing.get_origin(tp) is list:
            return list[self._mirror_type(typing.get_args(tp)[0])]
        if isinstance(tp, type) and issubclass(tp, self.base):
            return self._mirror(tp, top=False)
        if tp is dict:
            return dict[str, Any]
        if tp in (int, float, bool, str):
            return tp
        raise TypeError(f"unsupported field type {tp}")  # schema bug

    def _mirror(self, cls: type, top: bool) -> type:
        """A msgspec struct with the wire layout of ``cls`` (top level: tagged, with ``protocol``)."""
        key = (cls, top)
        if key not in self._mirrors:
            hints = self._hints(cls)
            fields: list[tuple] = [("protocol", int)] if top else [("type", str)]
            for f in dataclasses.fields(cls):
                tp = self._mirror_type(hints[f.name])
                if f.default is not dataclasses.MISSING:
                    fields.append((f.name, tp, f.default))
                elif f.default_factory is not dataclasses.MISSING:
                    fields.append((f.name, tp, msgspec.field(default_factory=f.default_factory)))
                else:
                    fields.append((f.name, tp))
            tag = {"tag": cls.TYPE, "tag_field": "type"} if top else {}
            self._mirrors[key] = msgspec.defstruct(f"Wire{cls.__name__}{'Top' if top else ''}", fields,
                                                   kw_only=True, forbid_unknown_fields=True, **tag)
        return self._mirrors[key]

    # Fast-path converters are generated as straight-line source per class (the way dataclasses
    # generates __init__): no per-field closures, loops or try blocks. They only say yes or
    # _Refused; the reference path explains every refusal.

    def _value_expr(self, tp: Any, var: str, ns: dict, decode: bool, depth: int = 0) -> str:
        """Source converting the value named ``var`` of type ``tp`` (wire <-> message)."""
        if (inner := _optional_inner(tp)) is not None:
            return f"(None if {var} is None else {self._value_expr(inner, var, ns, decode, depth)})"
        if typing.get_origin(tp) is list:
            item = f"_x{depth}"
            item_expr = self._value_expr(typing.get_args(tp)[0], item, ns, decode, depth + 1)
            if decode:
                return var if item_expr == item else f"[{item_expr} for {item} in {var}]"
            return f"[{item_expr} for {item} in ({var} if type({var}) is list else {_bind(ns, _refuse)}())]"
        if _is_struct(tp):
            return var if decode else f"({var} if type({var}) is {_bind(ns, tp)} else {_bind(ns, _refuse)}())"
        if isinstance(tp, type) and issubclass(tp, self.base):
            fn = self._fast_builder(tp, top=False) if decode else self._fast_encoder(tp)
            return f"{_bind(ns, fn)}({var})"
        if not decode and tp in (int, float, bool, str, dict):  # exact types pass; others take the slow path
            return f"({var} if type({var}) is {_bind(ns, tp)} else {_bind(ns, _refuse)}())"
        return var

    def _compile(self, name: str, lines: list[str], ns: dict) -> Converter:
        source = f"def {name}(w):\n" + "".join(f"    {line}\n" for line in lines)
        exec(compile(source, f"<areal_like.codec {name}>", "exec"), ns)  # noqa: S102 - our own schema
        return ns[name]

    def _stand_in(self, final: Callable[[], Converter]) -> Converter:
        """What a converter's cache holds while it is compiled: it waits for the thread building it
        (which holds ``_build_lock``), then calls the finished converter ``final()`` returns."""
        def stand_in(w: Any) -> Any:
            with self._build_lock:
                pass
            return final()(w)

        return stand_in

    def _fast_builder(self, cls: type, top: bool) -> Converter:
        """mirror struct -> message (decode)."""
        key = (cls, top)
        if key not in self._builders:
            ns: dict[str, Any] = {"_Refused": _Refused, "_cls": cls}
            self._builders[key] = self._stand_in(lambda: built)  # while compiling (no recursive schema today)
            hints = self._hints(cls)
            lines = [] if top else [f"if w.type != {cls.TYPE!r}: raise _Refused"]
            fields = dataclasses.fields(cls)
            lines += [f"v{i} = w.{f.name}" for i, f in enumerate(fields)]
            values = [self._value_expr(hints[f.name], f"v{i}", ns, decode=True) for i, f in enumerate(fields)]
            slots = [getattr(cls, f.name, None) for f in fields]
            if all(isinstance(d, types.MemberDescriptorType) for d in slots) and not hasattr(cls, "__post_init__"):
                # what the frozen dataclass __init__ does (object.__setattr__ per slot) without the
                # keyword-argument parsing, which costs more than the assignments themselves
                lines.append(f"m = {_bind(ns, object.__new__)}(_cls)")
                lines += [f"{_bind(ns, d.__set__)}(m, {v})" for d, v in zip(slots, values)]
            else:
                lines.append(f"m = _cls({', '.join(f'{f.name}={v}' for f, v in zip(fields, values))})")
            if cls.validate is not self.base.validate:
                lines.append("m.validate()")
            lines.append("return m")
            built = self._builders[key] = self._compile(f"build_{cls.__name__}", lines, ns)
        return self._builders[key]

    def _fast_encoder(self, cls: type) -> Converter:
        """message -> wire dict (encode); _Refused for anything the reference path must handle."""
        if (ready := self._fast_encoders.get(cls)) is not None:
            return ready
        with self._build_lock:
            return self._build_fast_encoder(cls)

    def _build_fast_encoder(self, cls: type) -> Converter:
        if cls not in self._fast_encoders:
            ns: dict[str, Any] = {"_Refused": _Refused, "_cls": cls}
            self._fast_encoders[cls] = self._stand_in(lambda: encoded)
            hints = self._hints(cls)
            lines = ["if type(w) is not _cls: raise _Refused"]
            if cls.validate is not self.base.validate:
                lines.append("w.validate()")
            items = [f"'type': {cls.TYPE!r}"]
            for i, f in enumerate(dataclasses.fields(cls)):
                lines.append(f"v{i} = w.{f.name}")
                items.append(f"{f.name!r}: {self._value_expr(hints[f.name], f'v{i}', ns, decode=False)}")
            lines.append(f"return {{{', '.join(items)}}}")
            encoded = self._fast_encoders[cls] = self._compile(f"encode_{cls.__name__}", lines, ns)
        return self._fast_encoders[cls]

    def _decode_fast(self, data: Any) -> Any:
        decoder = self._fast_decoder
        if decoder is None:
            with self._build_lock:
                if self._fast_decoder is None:
                    mirrors = tuple(self._mirror(cls, top=True) for cls in self.top_level.values())
                    self._top_builders = {m: self._fast_builder(cls, top=True)
                                          for m, cls in zip(mirrors, self.top_level.values())}
                    self._fast_decoder = msgspec.msgpack.Decoder(typing.Union[mirrors], ext_hook=_ext_hook)  # last
                decoder = self._fast_decoder
        wire = decoder.decode(data)
        if wire.protocol != self.version:
            raise _Refused
        return self._top_builders[type(wire)](wire)

    # ------------------------------------------------------------------ decode: reference path

    def _parser(self, tp: Any) -> Converter:
        if tp in self.array_dtypes:
            return self._parse_array(self.array_dtypes[tp])
        if (inner := _optional_inner(tp)) is not None:
            inner_parse = self._parser(inner)
            return lambda v: None if v is None else inner_parse(v)
        if typing.get_origin(tp) is list:
            return _list_of(self._parser(typing.get_args(tp)[0]), check_list=True)
        if isinstance(tp, type) and issubclass(tp, self.base):
            return lambda v: self._from_wire(tp, v)
        if tp is int:
            return _parse_int
        if tp is float:
            return _parse_float
        if tp in (bool, str):
            return _parse_exact(tp)
        if tp is dict:
            return _parse_dict
        raise TypeError(f"unsupported field type {tp}")  # schema bug

    @staticmethod
    def _parse_array(dtype: np.dtype) -> Converter:
        tag, itemsize = dtype.str, dtype.itemsize

        def parse(value: Any) -> np.ndarray:
            if type(value) is not list or len(value) != 3:
                raise ProtocolError("expected array [dtype, length, bytes]")
            dt, n, data = value
            if dt != tag:
                raise ProtocolError(f"dtype {dt!r}, expected {tag!r}")
            if type(n) is not int or n < 0 or type(data) is not bytes or len(data) != n * itemsize:
                raise ProtocolError("array length does not match its bytes")
            return np.frombuffer(data, dtype=dtype)  # zero copy, read-only

        return parse

    def _decode_plan(self, cls: type):
        if _is_struct(cls):  # its wire layout, by name (its attributes hold the arrays in wire form)
            fields = [(name, self._parser(tp), name not in cls.OPTIONAL) for name, tp in cls.FIELDS.items()]
        else:
            hints = self._hints(cls)
            fields = [(f.name, self._parser(hints[f.name]),
                       f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                      for f in dataclasses.fields(cls)]
        plan = self._decode_plans[cls] = (frozenset(name for name, _, _ in fields) | {"type"}, fields)
        return plan

    def _from_wire(self, cls: type, value: Any, top_level: bool = False) -> Any:
        if type(value) is not dict:
            raise ProtocolError(f"expected map, got {type(value).__name__}")
        if value.get("type") != cls.TYPE:
            raise ProtocolError(f"expected type {cls.TYPE!r}, got {value.get('type')!r}", "type")
        allowed, fields = self._decode_plans.get(cls) or self._decode_plan(cls)
        extra = [k for k in value if k not in allowed and not (top_level and k == "protocol")]
        if extra:
            raise ProtocolError("unknown field", str(extra[0]))
        kwargs = {}
        for name, parse, required in fields:
            v = value.get(name, _MISSING)
            if v is _MISSING:
                if required:
                    raise ProtocolError("missing field", name)
                continue
            try:
                kwargs[name] = parse(v)
            except ProtocolError as e:
                raise e.under(name) from None
        msg = cls(**kwargs)
        msg.validate()
        return msg

    def decode_reference(self, data: bytes) -> Any:
        """The reference decoder: slower, names the first offending field. Raises ProtocolError."""
        try:
            wire = msgpack.unpackb(data, raw=False, strict_map_key=False, timestamp=3)  # as msgspec: datetime
        except Exception as e:  # msgpack raises many types (ExtraData, ValueError, TypeError, ...)
            raise ProtocolError(f"not a msgpack frame ({type(e).__name__})", "frame") from None
        if type(wire) is not dict:
            raise ProtocolError(f"expected a map, got {type(wire).__name__}", "frame")
        proto = wire.get("protocol")
        if type(proto) is not int or proto != self.version:
            raise ProtocolError(f"unsupported protocol version {proto!r} (this side speaks {self.version})",
                                "protocol")
        type_name = wire.get("type")
        cls = self.top_level.get(type_name) if type(type_name) is str else None
        if cls is None:
            raise ProtocolError(f"unknown message type {type_name!r}", "type")
        try:
            return self._from_wire(cls, wire, top_level=True)
        except ProtocolError as e:
            raise e if e.field else ProtocolError(e.reason, "frame") from None
        except Exception as e:  # belt and braces: nothing but ProtocolError escapes
            raise ProtocolError(f"malformed frame ({type(e).__name__}: {e})", "frame") from None

    def decode(self, data: Any, max_bytes: int) -> Any:
        if isinstance(data, memoryview):
            if data.nbytes > max_bytes:
                raise ProtocolError(f"{data.nbytes} bytes exceeds the limit of {max_bytes}", "frame")
            data = data.toreadonly() if data.c_contiguous else data.tobytes()
        elif isinstance(data, bytearray):
            data = bytes(data)  # decoded arrays must not alias a buffer the caller may reuse
        elif not isinstance(data, bytes):
            raise ProtocolError(f"frame must be bytes, got {type(data).__name__}", "frame")
        if len(data) > max_bytes:
            raise ProtocolError(f"{len(data)} bytes exceeds the limit of {max_bytes}", "frame")
        try:
            return self._decode_fast(data)
        except Exception:  # refused (or a bug): the reference path decides and names the field
            pass
        return self.decode_reference(data)
