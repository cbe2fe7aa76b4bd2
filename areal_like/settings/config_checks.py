"""``ConfigError``, the bounds a config field declares beside itself, and the one validator that
applies them, apart from ``schema.py`` so that its sections in other modules use them without an
import circle.

A bound rides on the field's type: ``group_size: Annotated[int, at_least(1)] = 8``. Every section
derives from ``Section``, whose ``__post_init__`` checks each of its fields against its bounds
(``field_bounds``: the declared ones, and for every float a finite value, for every ``*_s`` key a
finite number of seconds >= 0) before the section's own checks that relate two fields run. One
error format: ``key=value is invalid: must be <bound>``. ``configs/REFERENCE.md`` prints the same
bounds (``areal_like/settings/reference.py``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import sys
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


def check(key: str, ok: Any, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: must be {rule}")


@dataclasses.dataclass(frozen=True)
class Bound:
    """What a field's value must be: ``rule`` in words (the error and the reference say it),
    ``test`` of a value that is not None."""

    rule: str
    test: Callable[[Any], Any]


def at_least(n: float, note: str = "") -> Bound:
    return Bound(f">= {n}{note}", lambda v: v >= n)


def above(n: float, note: str = "") -> Bound:
    return Bound(f"> {n}{note}", lambda v: v > n)


def within(low: float, high: float, ends: str = "[]") -> Bound:
    """``ends``: "[)" is low <= v < high, "(]" low < v <= high, and so on."""
    lo = operator.le if ends[0] == "[" else operator.lt
    hi = operator.le if ends[1] == "]" else operator.lt
    return Bound(f"in {ends[0]}{low}, {high}{ends[1]}", lambda v: lo(low, v) and hi(v, high))


def one_of(*allowed: Any) -> Bound:
    return Bound("one of " + ", ".join(map(repr, allowed)), lambda v: v in allowed)


PORT = Bound("a port, 0 to 65535 (0: a free one)", lambda v: 0 <= v <= 65535)
DEVICE = Bound("cpu, cuda or cuda:N", re.compile(r"cpu|cuda(:\d+)?").fullmatch)
DIRECTORY = Bound("a directory", lambda v: v.strip() != "")
# the wire's rule for a name a peer sends (areal_like/wire/protocol.py ServerId), checked at load
WIRE_NAME = Bound("at most 128 characters, none a control character",
                  re.compile(r"[^\x00-\x1f\x7f]{0,128}").fullmatch)
# nothing reads inf as "no limit": inf or nan passed a bare bound (``> 0``) to fail in a daemon
# (``int(inf)``, a poll in milliseconds, a ``timedelta``, a message field) or to make an update
# non-finite, not at load
FINITE = Bound("a finite number", math.isfinite)
SECONDS = Bound("a finite number of seconds >= 0", lambda v: 0 <= v < math.inf)


@cache
def field_bounds(cls: type) -> dict[str, tuple[Bound, ...]]:
    """Each field of the dataclass ``cls`` -> its bounds: the declared ones, then ``SECONDS`` for a
    ``*_s`` number or ``FINITE`` for any other float; the declared ones of a field that may be null
    say so."""
    # the module's names as globals: a bound's lambda may read them when it runs
    out, hints = {}, typing.get_type_hints(cls, vars(sys.modules[cls.__module__]),
                                           include_extras=True)
    for name, hint in ((f.name, hints[f.name]) for f in dataclasses.fields(cls)):
        declared = hint.__metadata__ if typing.get_origin(hint) is typing.Annotated else ()
        base = typing.get_args(hint)[0] if declared else hint
        kinds = typing.get_args(base) if isinstance(base, types.UnionType) else (base,)
        implied = (SECONDS,) if name.endswith("_s") and {int, float} & set(kinds) else (
            (FINITE,) if float in kinds else ())
        out[name] = (*(Bound(f"null or {b.rule}", b.test) if type(None) in kinds else b
                       for b in declared), *implied)
    return out


class Section:
    """A section of the schema, ``key`` its dotted path (empty: the root). On construction every
    field is checked against its bounds (``field_bounds``), one error naming the key, the value
    and the bound; a section that relates two fields checks that after ``super()``'s."""

    key = ""

    def __post_init__(self) -> None:
        prefix = f"{self.key}." if self.key else ""
        for name, bounds in field_bounds(type(self)).items():
            value = getattr(self, name)
            for bound in bounds if value is not None else ():
                check(prefix + name, bound.test(value), bound.rule, value)


def split_address(address: str, key: str = "") -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port). Raises ConfigError (naming ``key``) on anything else,
    also on a host that is empty or starts with "-" (no host name does; torchrun read it as a
    flag and printed its usage)."""
    shown = f"{key}={address!r}" if key else repr(address)
    if not address.startswith("tcp://") or ":" not in address[len("tcp://"):]:
        raise ConfigError(f"{shown} is not a tcp://host:port address")
    host, port = address[len("tcp://"):].rsplit(":", 1)
    if not host or host.startswith("-"):
        raise ConfigError(f"{shown}: host {host!r} is not a host name or address")
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{shown}: port {port!r} is not a port number (0 to 65535)")
    return host, int(port)
