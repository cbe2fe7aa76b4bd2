"""``ConfigError`` and the two checks every config dataclass runs in its ``__post_init__``, apart
from ``schema.py`` so that its sections in other modules use them without an import circle.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def check(key: str, ok: bool, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: must be {rule}")
