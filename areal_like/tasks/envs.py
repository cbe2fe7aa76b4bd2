"""Shipped multi-turn environments (``task.env``), small enough for the tiny CPU model: their
games, scores and warm-start demos: areal_like/tasks/TASKS.md.
"""

from __future__ import annotations

import ast
import operator
import random
import re

GUESS_MAX = 32
GUESS_TURN_COST = 0.15
GUESS_CUT_CREDIT = 0.2
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.FloorDiv: operator.floordiv}
MAX_EXPR_CHARS = 64

CALC_TOOL = {"name": "calc", "function": "areal_like.tasks.envs:calc",
             "description": "evaluate an integer expression",
             "parameters": {"type": "object",
                            "properties": {"e": {"type": "string", "maxLength": MAX_EXPR_CHARS}},
                            "required": ["e"], "additionalProperties": False}}


def _value(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_value(node.left), _value(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand)
    raise ValueError(f"only integers and + - * // are allowed, not {type(node).__name__}")


def calc(e: str) -> str:
    """The value of an integer expression of + - * // (parsed with ``ast``, never ``eval``)."""
    if len(e) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    return str(_value(ast.parse(e.strip(), mode="eval").body))


def tool_call_text(name: str, **arguments: str) -> str:
    """A call as the model writes it (compact JSON: fewer tokens for a char tokenizer)."""
    args = ",".join(f'"{k}":"{v}"' for k, v in arguments.items())
    return f'<tool_call>{{"name":"{name}","arguments":{{{args}}}}}</tool_call>'


class Calculator:
    tools = [CALC_TOOL]

    def reset(self, example) -> list[dict]:
        self.answer = example.answer
        return [{"role": "user", "content": example.prompt}]

    def step(self, text: str):
        correct = text.strip() == self.answer
        return [], 1.0 if correct else 0.0, True, {"correct": correct}

    @staticmethod
    def demo(example, rng: random.Random) -> list[dict]:
        user = {"role": "user", "content": example.prompt}
        if rng.random() < 0.5:  # answer in one's head: a guess of the right length, usually wrong
            guess = str(int(example.answer) + rng.choice([-1, 1]) * rng.randrange(0, 200))
            return [user, {"role": "assistant", "content": guess}]
        return [user, {"role": "assistant", "content": tool_call_text("calc", e=example.prompt)},
                {"role": "tool", "name": "calc", "content": example.answer},
                {"role": "assistant", "content": example.answer}]


def reply(guess: int, target: int, lo: int, hi: int) -> str:
    """The guessing game's answer to a wrong guess: the direction and the range still open."""
    return f"{'higher' if guess < target else 'lower'}:{lo}-{hi}"


class GuessNumber:
    def reset(self, example) -> list[dict]:
        self.target, self.turns, self.lo, self.hi = int(example.answer), 0, 1, GUESS_MAX
        return [{"role": "user", "content": example.prompt}]

    def step(self, text: str):
        self.turns += 1
        m = re.fullmatch(r"\s*(\d{1,3})\s*", text)
        if m is None:
            return [], 0.0, True, {"found": False, "guesses": self.turns}
        guess = int(m.group(1))
        if guess == self.target:
            return ([], max(0.0, 1.0 - GUESS_TURN_COST * (self.turns - 1)), True,
                    {"found": True, "guesses": self.turns})
        before = self.hi - self.lo
        if guess < self.target:
            self.lo = max(self.lo, guess + 1)
        else:
            self.hi = min(self.hi, guess - 1)
        cut = GUESS_CUT_CREDIT * (before - (self.hi - self.lo)) / GUESS_MAX
        return ([{"role": "user", "content": reply(guess, self.target, self.lo, self.hi)}],
                cut, False, {})

    @staticmethod
    def demo(example, rng: random.Random) -> list[dict]:
        target, lo, hi = int(example.answer), 1, GUESS_MAX
        messages = [{"role": "user", "content": example.prompt}]
        while True:
            guess = rng.randint(lo, hi)
            messages.append({"role": "assistant", "content": str(guess)})
            if guess == target:
                return messages
            if guess < target:
                lo = guess + 1
            else:
                hi = guess - 1
            messages.append({"role": "user", "content": reply(guess, target, lo, hi)})


class LongTail:
    """``benchmarks/bench_agentic.py``: heavy-tailed (Pareto) turn counts drawn from the prompt,
    every turn answered ``go on``; the reward only gives the estimator something to compare."""

    TAIL_ALPHA = 1.2
    TAIL_MAX_TURNS = 16

    def reset(self, example) -> list[dict]:
        drawn = int(random.Random(example.prompt).paretovariate(self.TAIL_ALPHA))
        self.turns, self.left = 0, min(self.TAIL_MAX_TURNS, drawn)
        return [{"role": "user", "content": example.prompt}]

    def step(self, text: str):
        self.turns += 1
        if self.turns >= self.left:
            return [], float(len(text) % 2 == 0), True, {"turns": self.turns}
        return [{"role": "user", "content": "go on"}], 0.0, False, {}
