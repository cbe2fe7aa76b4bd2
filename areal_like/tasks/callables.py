"""Functions named by a dotted path: the project's one parser of ``"pkg.module:function"`` (or
``pkg.module.function``), so tasks, ``task.reward_fn``, the reward workers and the preflight accept
and refuse the same paths.

Invariant: standard library only: a reward worker imports this module just before the reward's.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable


def split_function_path(path: str) -> tuple[str, str]:
    """``(module, attribute)`` of ``path``; ValueError when either part is empty or the module
    is not a dotted name (a file's path: ``my_pkg/rewards.py``)."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not attr or not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"{path!r} is not of the form package.module:function")
    return module, attr


def import_function(path: str) -> Callable:
    """The callable at ``path`` (its module's import may raise anything)."""
    module, attr = split_function_path(path)
    fn = getattr(importlib.import_module(module), attr)
    if not callable(fn):
        raise TypeError(f"{attr} in {module} is a {type(fn).__name__}, not a callable")
    return fn


def is_batched(fn: Callable) -> bool:
    """Whether the reward ``fn`` takes TRL's batched form, ``fn(prompts, completions, **columns)
    -> list[float]``: it has a parameter named ``completions`` (TRL passes every argument by that
    name). Otherwise it is per sample, ``fn(response, example) -> float``."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): per sample
        return False


def reward_paths(cfg) -> list[str]:
    """``task.reward_fn`` (of the TaskConfig ``cfg``) as a list of paths; empty: the task's own
    reward."""
    value = cfg.reward_fn
    return list(value) if isinstance(value, list) else [value] if value else []
