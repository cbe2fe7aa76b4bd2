"""Rewards a user could write, for tests/integration/test_learning_watch.py: ``zero`` gives every
response the same reward (every group's advantages are 0: nothing is trained), ``reversed_exact``
is the reversal task's own grade under a user's module name (not one of the project's rewards)."""

from areal_like.tasks.task import exact_match


def zero(response: str, example) -> float:
    return 0.0


def reversed_exact(response: str, example) -> float:
    return exact_match(response, example)
