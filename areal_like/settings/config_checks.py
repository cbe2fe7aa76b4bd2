"""``ConfigError`` and the two checks every config dataclass runs in its ``__post_init__``, apart
from ``schema.py`` so that its sections in other modules use them without an import circle.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of "
                          f"{', '.join(map(repr, allowed))}")


def check(key: str, ok: bool, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: must be {rule}")


PORT = "a port, 0 to 65535 (0: a free one)"
RULES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1,
         PORT: lambda v: 0 <= v <= 65535}
DEVICE = re.compile(r"cpu|cuda(:\d+)?")  # what trainer.device and rollout.engine.device take


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


def each(section: str, obj: Any, rule: str, *keys: str) -> None:
    """``check`` of ``section.key`` against ``rule`` (one of ``RULES``) for every key."""
    for key in keys:
        value = getattr(obj, key)
        check(f"{section}.{key}", RULES[rule](value), rule, value)


def finite_numbers(obj: Any, prefix: str = "") -> None:
    """Every number of ``obj`` and of the sections in it is finite, and every ``*_s`` key (a
    duration or timeout) is not negative either: nothing reads inf as "no limit", and inf or nan
    passed a bare bound (``> 0``) to fail in a daemon (``int(inf)``, a poll in milliseconds, a
    ``timedelta``, a message field) or to make an update non-finite, not at load."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            finite_numbers(value, f"{prefix}{f.name}.")
        elif f.name.endswith("_s") and isinstance(value, (int, float)):
            check(f"{prefix}{f.name}", 0 <= value < math.inf, "a finite number of seconds >= 0",
                  value)
        elif isinstance(value, float):
            check(f"{prefix}{f.name}", math.isfinite(value), "a finite number", value)
