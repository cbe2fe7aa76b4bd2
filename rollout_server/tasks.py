"""Tasks that ship with the project: synthetic verifiable tasks and JSONL {prompt, answer} data.

A task maps a dataset position ``index`` (and ``epoch``) to an ``Example(prompt, answer)`` and
names its reward as a dotted path (``reward_path``) to a module-level function
``fn(response, example) -> float``, which a reward worker imports by that path
(``rollout_server/reward_pool.py``); ``reward()`` calls it in-process. Synthetic tasks are generated
deterministically from ``(seed, index)``, so every process (buffer, rollout servers, warm start)
agrees on what prompt ``index`` is without shipping data; nothing is downloaded.

Prompts are short plain strings for the char tokenizer (``"37+45="`` -> ``"82"``); a model
answers and then emits EOS. Synthetic rewards are exact match (1.0 / 0.0): the reward mean is
the task accuracy.
"""

from __future__ import annotations

import abc
import json
import random
from dataclasses import dataclass
from pathlib import Path

from areal_like.config import ConfigError, TaskConfig
from rollout_server.reward_worker import import_reward


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str
    answer: str


def exact_match(response: str, example: Example) -> float:
    """1.0 when the stripped response is the answer, else 0.0."""
    return 1.0 if response.strip() == example.answer else 0.0


def countdown_reward(response: str, example: Example) -> float:
    """1.0 for any expression over the offered numbers (each at most once) that reaches the target."""
    expr = response.strip()
    if not expr or len(expr) > 40 or any(c not in "0123456789+-*() " for c in expr):
        return 0.0
    head, _, target = example.prompt[3:].rstrip(":").rpartition(" to ")
    allowed = sorted(head.split())
    used = sorted("".join(c if c.isdigit() else " " for c in expr).split())
    pool = list(allowed)
    for n in used:
        if n not in pool:
            return 0.0
        pool.remove(n)
    try:
        value = eval(expr, {"__builtins__": {}}, {})  # charset restricted to digits, + - * ( ) above
    except Exception:
        return 0.0
    return 1.0 if value == int(target) else 0.0


class Task(abc.ABC):
    name = "task"
    reward_path = "rollout_server.tasks:exact_match"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    def __len__(self) -> int:
        return self.cfg.num_prompts

    def _rng(self, index: int) -> random.Random:
        if not 0 <= index < len(self):
            raise IndexError(f"prompt index {index} outside [0, {len(self)})")
        return random.Random(self.cfg.seed * 1_000_003 + index)

    @abc.abstractmethod
    def example(self, index: int, epoch: int = 0) -> Example:
        """The example at dataset position ``index`` (deterministic)."""

    def reward(self, response: str, example: Example) -> float:
        return import_reward(self.reward_path)(response, example)


class Addition(Task):
    """``a+b=`` with operands of up to ``digits`` digits."""

    name = "addition"

    def example(self, index: int, epoch: int = 0) -> Example:
        rng = self._rng(index)
        hi = 10 ** self.cfg.digits
        a, b = rng.randrange(hi), rng.randrange(hi)
        return Example(f"{a}+{b}=", str(a + b))


class Sort(Task):
    """Sort a string of ``digits + 2`` digits ascending."""

    name = "sort"

    def example(self, index: int, epoch: int = 0) -> Example:
        rng = self._rng(index)
        s = "".join(rng.choice("0123456789") for _ in range(self.cfg.digits + 2))
        return Example(f"sort:{s}=", "".join(sorted(s)))


class Reverse(Task):
    """Reverse a string of ``digits + 2`` lowercase letters."""

    name = "reverse"

    def example(self, index: int, epoch: int = 0) -> Example:
        rng = self._rng(index)
        s = "".join(rng.choice("abcdefghij") for _ in range(self.cfg.digits + 2))
        return Example(f"rev:{s}=", s[::-1])


class Countdown(Task):
    """Reach a target with + - * over the given numbers, each used at most once.

    The answer field holds one valid expression; any expression that evaluates to the target
    with allowed numbers scores 1.0.
    """

    name = "countdown"
    reward_path = "rollout_server.tasks:countdown_reward"

    def example(self, index: int, epoch: int = 0) -> Example:
        rng = self._rng(index)
        nums = [rng.randrange(1, 10) for _ in range(max(2, self.cfg.digits + 1))]
        a, b = nums[0], nums[1]
        op = rng.choice("+-*")
        target = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Example(f"cd {' '.join(map(str, nums))} to {target}:", f"{a}{op}{b}")


class JsonlTask(Task):
    """``{"prompt": ..., "answer": ...}`` per line; reward = numeric match of the final answer."""

    name = "jsonl"
    reward_path = "rollout_server.rewards:math_reward"

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        path = Path(cfg.dataset_path or "")
        if not path.is_file():
            raise ConfigError(f"task.dataset_path={cfg.dataset_path!r} does not exist")
        self.examples: list[Example] = []
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self.examples.append(Example(str(row["prompt"]), str(row["answer"])))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"{path}:{lineno}: expected a JSON object with 'prompt' and 'answer' ({e})")

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, index: int, epoch: int = 0) -> Example:
        return self.examples[index]


TASKS: dict[str, type[Task]] = {t.name: t for t in (Addition, Sort, Reverse, Countdown, JsonlTask)}


def make_task(cfg: TaskConfig) -> Task:
    return TASKS[cfg.name](cfg)
