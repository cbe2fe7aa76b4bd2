"""Reward functions: the math-answer reward, custom functions by dotted path, and safe scoring.

A reward function is ``fn(response: str, example: Example) -> float``. ``score`` runs it with
a timeout in a daemon thread: a function that raises or hangs scores the sample 0.0 with the
reason recorded, and the rollout server goes on. (A hung pure-Python function cannot be killed
from another thread; its thread is abandoned and counted. Rewards that can hang for real should
shell out with their own timeout.)
"""

from __future__ import annotations

import importlib
import math
import re
import threading
from collections.abc import Callable
from fractions import Fraction

from areal_like.config import ConfigError, TaskConfig

RewardFn = Callable[[str, object], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _to_number(s: str) -> Fraction | None:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    s = re.sub(r"\\frac\{([^{}]+)\}\{([^{}]+)\}", r"\1/\2", s)
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> str | None:
    """``\\boxed{}`` content if present, else the last number in the text."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def math_reward(response: str, example) -> float:
    """1.0 when the response's final answer equals the reference numerically (or as text)."""
    got = extract_answer(response)
    if got is None:
        return 0.0
    ref = extract_answer(example.answer) or example.answer.strip()
    a, b = _to_number(got), _to_number(ref)
    if a is not None and b is not None:
        return 1.0 if a == b else 0.0
    return 1.0 if got.strip() == ref.strip() else 0.0


def load_reward_fn(cfg: TaskConfig, task) -> RewardFn:
    """``task.reward_fn`` as ``"pkg.module:function"`` (or ``pkg.module.function``), else the task's own."""
    if not cfg.reward_fn:
        return task.reward
    module, sep, attr = cfg.reward_fn.partition(":")
    if not sep:
        module, _, attr = cfg.reward_fn.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"task.reward_fn={cfg.reward_fn!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ConfigError(f"task.reward_fn={cfg.reward_fn!r} is not callable")
    return fn


def score(fn: RewardFn, response: str, example, timeout_s: float) -> tuple[float, str | None]:
    """``(reward, None)``, or ``(0.0, reason)`` when ``fn`` raises, hangs past ``timeout_s``,
    or returns something that is not a finite number. Never raises."""
    result: list = []

    def target():
        try:
            result.append(("ok", fn(response, example)))
        except BaseException as e:  # noqa: BLE001 - a user's reward must never kill the server
            result.append(("error", f"{type(e).__name__}: {e}"))

    t = threading.Thread(target=target, name="reward", daemon=True)
    t.start()
    t.join(timeout_s)
    if not result:
        return 0.0, f"timeout after {timeout_s}s"
    kind, value = result[0]
    if kind == "error":
        return 0.0, value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0, f"reward is not a number: {value!r}"
    if not math.isfinite(value):
        return 0.0, f"reward is not finite: {value}"
    return value, None
