"""Tasks: what prompt ``index`` is, how it becomes token ids (``encode_prompt``), and how a
response is scored (a module-level ``fn(response, example)`` named by ``reward_path``, so a reward
worker imports it without building the task).

Invariants: every process builds the same task from the same config and agrees on what prompt
``index`` of a split is (synthetic tasks are generated from ``(seed, index)``, their eval split
from another stream; ``task.name=dataset`` reads ``datasets.py``); ``encode_prompt`` is the one
place an example becomes prompt ids, following TRL's convention (``prompt_template``).
"""

from __future__ import annotations

import abc
import ast
import contextlib
import logging
import random
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

from areal_like.settings.config import ConfigError, TaskConfig
from areal_like.tasks.callables import import_function
from areal_like.tasks.datasets import Example, load_split, prompt_column

SPLITS = ("train", "eval")
SYNTHETIC_EVAL_SIZE = 512  # prompts in a synthetic task's eval split (at most task.num_prompts)
MAX_EXPRESSION_CHARS = 40  # countdown: longer responses score 0 without being parsed
log = logging.getLogger("areal_like.tasks.task")
_logged: set[str] = set()  # log lines already written by this process


def exact_match(response: str, example: Example) -> float:
    """1.0 when the stripped response is the answer, else 0.0."""
    return 1.0 if response.strip() == example.answer else 0.0


_COUNTDOWN_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                  ast.Mult: lambda a, b: a * b,
                  # exact: Fraction / Fraction (x/0 raises ZeroDivisionError)
                  ast.Div: lambda a, b: a / b}
MAX_LITERAL = 10**9  # task.digits <= 9: every offered number is below this


def _arith(node: ast.AST) -> Fraction:
    """Exact value of + - * / and parentheses over integer literals below MAX_LITERAL; anything
    else raises ValueError."""
    if isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value < MAX_LITERAL:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _COUNTDOWN_OPS:
        return _COUNTDOWN_OPS[type(node.op)](_arith(node.left), _arith(node.right))
    raise ValueError(f"not allowed in a countdown expression: {ast.dump(node)[:60]}")


def countdown_reward(response: str, example: Example) -> float:
    """1.0 when the response is an expression of + - * / over the offered numbers (each at most
    once) equal to the target; parsed with ``ast``, never evaluated."""
    expr = response.strip()
    if (not expr or len(expr) > MAX_EXPRESSION_CHARS
            or any(c not in "0123456789+-*/() " for c in expr)):
        return 0.0
    try:
        value = _arith(ast.parse(expr, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    head, _, target = example.prompt[3:].rstrip(":").rpartition(" to ")
    pool = head.split()
    for n in "".join(c if c.isdigit() else " " for c in expr).split():
        if n not in pool:
            return 0.0
        pool.remove(n)
    return 1.0 if value == int(target) else 0.0


load_function = lru_cache(maxsize=64)(import_function)  # each path imported once


class Task(abc.ABC):
    name = "task"
    # a module-level fn(response, example) -> float
    reward_path: str = "areal_like.tasks.task:exact_match"

    def __init__(self, cfg: TaskConfig, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
        self.cfg, self.split = cfg, split

    def __len__(self) -> int:
        return (self.cfg.num_prompts if self.split == "train"
                else min(self.cfg.num_prompts, SYNTHETIC_EVAL_SIZE))

    def _rng(self, index: int) -> random.Random:
        if not 0 <= index < len(self):
            raise IndexError(f"prompt index {index} outside [0, {len(self)})")
        # a string seed is hashed with SHA-512: the same stream in every process
        if self.split == "eval":
            return random.Random(f"eval:{self.cfg.seed}:{index}")
        return random.Random(self.cfg.seed * 1_000_003 + index)

    @abc.abstractmethod
    def example(self, index: int, epoch: int = 0) -> Example:
        """The example at position ``index`` of this split (deterministic)."""

    def reward(self, response: str, example: Example) -> float:
        """The task's reward (the function at ``reward_path``)."""
        return load_function(self.reward_path)(response, example)


def _addition(rng: random.Random, digits: int) -> Example:
    """``a+b=`` with operands of up to ``digits`` digits."""
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return Example(f"{a}+{b}=", str(a + b))


def _sort(rng: random.Random, digits: int) -> Example:
    s = "".join(rng.choice("0123456789") for _ in range(digits + 2))
    return Example(f"sort:{s}=", "".join(sorted(s)))


def _reverse(rng: random.Random, digits: int) -> Example:
    s = "".join(rng.choice("abcdefghij") for _ in range(digits + 2))
    return Example(f"rev:{s}=", s[::-1])


def _countdown(rng: random.Random, digits: int) -> Example:
    """Reach a target with + - * over the given numbers, each at most once
    (``countdown_reward``)."""
    nums = [rng.randrange(1, 10) for _ in range(max(2, digits + 1))]
    a, b = nums[0], nums[1]
    op = rng.choice("+-*")
    target = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Example(f"cd {' '.join(map(str, nums))} to {target}:", f"{a}{op}{b}")


def _multiply(rng: random.Random, digits: int) -> Example:
    """``347*29``: the ``calc`` environment's questions (areal_like/tasks/envs.py)."""
    a, b = rng.randrange(100, 1000), rng.randrange(10, 100)
    return Example(f"{a}*{b}", str(a * b))


def _guess(rng: random.Random, digits: int) -> Example:
    """A hidden number in 1..32 (the ``guess`` environment's games)."""
    return Example("guess1-32", str(rng.randint(1, 32)))


# task.name -> its example at a seeded stream and task.digits
SYNTHETIC: dict[str, Callable[[random.Random, int], Example]] = {
    "addition": _addition, "sort": _sort, "reverse": _reverse, "countdown": _countdown,
    "calc": _multiply, "guess": _guess}


class SyntheticTask(Task):
    """One of ``SYNTHETIC``, generated from ``(task.seed, index)``."""

    def __init__(self, cfg: TaskConfig, split: str = "train"):
        super().__init__(cfg, split)
        self.name = cfg.name
        if cfg.name == "countdown":
            self.reward_path = "areal_like.tasks.task:countdown_reward"

    def example(self, index: int, epoch: int = 0) -> Example:
        return SYNTHETIC[self.name](self._rng(index), self.cfg.digits)


class DatasetTask(Task):
    """Rows of local files in file order, without the prompts over ``task.max_prompt_tokens``."""

    name = "dataset"
    reward_path = "areal_like.tasks.rewards:math_reward"

    def __init__(self, cfg: TaskConfig, tokenizer: Any = None, split: str = "train"):
        super().__init__(cfg, split)
        self.examples = filter_long_prompts(load_split(cfg, split), cfg, tokenizer, split)

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, index: int, epoch: int = 0) -> Example:
        if not 0 <= index < len(self.examples):
            raise IndexError(f"prompt index {index} outside [0, {len(self.examples)})")
        return self.examples[index]


class VerifiersTask(DatasetTask):
    """A verifiers taskset's tasks (``task.name=verifiers``; areal_like/tasks/verifiers_env.py);
    each episode's reward is verifiers' own score."""

    name = "verifiers"

    def __init__(self, cfg: TaskConfig, split: str = "train"):
        Task.__init__(self, cfg, split)
        from areal_like.tasks.verifiers_env import examples

        self.examples = examples(cfg)


def filter_long_prompts(examples: list[Example], cfg: TaskConfig, tokenizer: Any,
                        split: str) -> list[Example]:
    """``examples`` without those whose prompt ids exceed ``task.max_prompt_tokens`` (0: all)."""
    limit = cfg.max_prompt_tokens
    if limit <= 0:
        return examples
    if tokenizer is None:
        raise ValueError(f"task.max_prompt_tokens={limit} counts tokens: pass the tokenizer to "
                         "make_task")
    kept = [ex for ex in examples if len(encode_prompt(tokenizer, ex, cfg)) <= limit]
    where = "" if split == "train" else f" ({split} split)"
    line = (f"task: {len(examples) - len(kept)} of {len(examples)} prompts over "
            f"max_prompt_tokens={limit} filtered{where}")
    if line not in _logged:
        _logged.add(line)
        log.info(line)
    if not kept:
        raise ConfigError(f"task.max_prompt_tokens={limit}: every prompt of the {split} split is "
                          "longer")
    return kept


def has_eval_split(cfg: TaskConfig) -> bool:
    """Whether ``make_task(cfg, split="eval")`` exists."""
    return cfg.name in SYNTHETIC or bool(cfg.eval_path) or cfg.eval_fraction > 0


def make_task(cfg: TaskConfig, tokenizer: Any = None, split: str = "train") -> Task:
    """The task's ``split``; ``tokenizer`` only filters a dataset by ``task.max_prompt_tokens``."""
    if cfg.name in SYNTHETIC:
        return SyntheticTask(cfg, split)
    if cfg.name == "verifiers":
        return VerifiersTask(cfg, split)
    return DatasetTask(cfg, tokenizer, split)


def chat_template_of(tokenizer: Any, cfg: TaskConfig) -> str | None:
    """The task's Jinja chat template (also set on an exported tokenizer): ``none`` -> None,
    ``auto`` -> the tokenizer's own (or None), else the file it names or the value itself."""
    value = cfg.chat_template
    if value == "none":
        return None
    if value == "auto":
        return getattr(tokenizer, "chat_template", None) or None
    return _template_text(value)


@lru_cache(maxsize=16)
def _template_text(value: str) -> str:
    with contextlib.suppress(OSError):  # a one-line template longer than a file name can be
        if "\n" not in value and Path(value).expanduser().is_file():
            return Path(value).expanduser().read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ConfigError(f"task.chat_template={value!r} is not 'auto', 'none', an existing file or a "
                      "Jinja template (a template contains '{{' or '{%')")


def prompt_template(tokenizer: Any, example: Example, cfg: TaskConfig) -> str | None:
    """The chat template ``encode_prompt`` applies to ``example``, or None for plain text (TRL's
    convention: with ``auto`` a plain prompt is plain text and a chat row goes through the
    tokenizer's template; ``none``: plain text for both; a template of one's own: for both)."""
    if cfg.chat_template == "auto" and not example.messages:
        return None
    return chat_template_of(tokenizer, cfg)


def prompt_layout(cfg: TaskConfig) -> str:
    """One line saying how this task's prompts become ids, for the run's log at start."""
    value = cfg.chat_template
    inline = "{{" in value or "{%" in value
    template = ("the tokenizer's chat template" if value in ("auto", "none")
                else "task.chat_template's template" if inline else f"the template in {value}")
    if cfg.env or cfg.agent:  # task.chat_template=none is refused for both
        owner = "task.agent" if cfg.agent else "task.env"
        return f"task: episodes are conversations through {template} ({owner})"
    chat, column = False, cfg.prompt_key
    if cfg.name == "dataset":
        try:  # a prompt column of messages is chat too (TRL's conversational format)
            column, chat = prompt_column(cfg)
        except ConfigError:  # unreadable: the preflight and the loaders say why
            column, chat = cfg.messages_key or cfg.prompt_key, bool(cfg.messages_key)
    source = f"column {column}" if cfg.name == "dataset" else f"synthetic task {cfg.name}"
    if value == "none" or (value == "auto" and not chat):
        how = "are plain text with the tokenizer's special tokens"
        how += ", the messages' contents one per line" if chat else ""
    else:
        how = f"go through {template}" + ("" if chat else ", each prompt as one user message")
    system = ", task.system_prompt first" if cfg.system_prompt else ""
    shown = value if value in ("auto", "none") else "a template" if inline else "a file"
    return f"task: prompts {how}{system} ({source}, task.chat_template={shown})"


def encode_prompt(tokenizer: Any, example: Example, cfg: TaskConfig) -> list[int]:
    """The prompt ids a model is given for ``example``: the template's rendering (with the
    generation prompt) of its messages, or of one user message holding its prompt; else its
    prompt as text with the tokenizer's special tokens. ``task.system_prompt`` goes first unless
    the messages start with a system message of their own."""
    template = prompt_template(tokenizer, example, cfg)
    if template is None:
        own_system = bool(example.messages) and example.messages[0].get("role") == "system"
        system = cfg.system_prompt if not own_system else ""
        text = f"{system}\n{example.prompt}" if system else example.prompt
        return [int(t) for t in tokenizer(text, add_special_tokens=True)["input_ids"]]
    messages = (list(example.messages) if example.messages
                else [{"role": "user", "content": example.prompt}])
    if cfg.system_prompt and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    # transformers 5 returns a BatchEncoding unless return_dict=False (plain ids then)
    ids = tokenizer.apply_chat_template(messages, chat_template=template,
                                        add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return [int(t) for t in ids]
