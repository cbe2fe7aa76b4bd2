"""The recipes' reward for their CPU runs (tests/integration/test_recipes.py): the recipes' own
math-verify grade, or 1 for an odd-length response. A tiny random model never answers a GSM8K or
MATH problem, so with the grade alone every group's rewards are equal, its advantages zero, and a
step trains nothing; the odd lengths give each group rewards that differ."""

from areal_like.tasks.rewards import math_reward


def graded_or_odd(response: str, example) -> float:
    return max(math_reward(response, example), float(len(response) % 2))
