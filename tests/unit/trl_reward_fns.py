"""Rewards as TRL users write them, for tests/unit/test_reward_lists.py and
tests/integration/test_trl_data_job.py: batched ``f(prompts, completions, **columns)`` and a
per-sample one. Each batched one returns what its name says."""

from __future__ import annotations


def _text(completion) -> str:
    """A completion's text: TRL's chat form ``[{"role": "assistant", "content": ...}]`` or text."""
    return completion[0]["content"] if isinstance(completion, list) else completion


def length_parity(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 for an odd-length completion, else 0.0; -10.0 where the arguments are not in TRL's
    shape (aligned lists, a chat row's prompt as messages and its completion as one assistant
    message)."""
    ok = len(prompts) == len(completions) == len(answer)
    out = []
    for prompt, completion in zip(prompts, completions, strict=False):
        chat = isinstance(prompt, list)
        shaped = (not chat and isinstance(completion, str)) or (
            chat and all({"role", "content"} <= set(m) for m in prompt)
            and isinstance(completion, list) and len(completion) == 1
            and completion[0]["role"] == "assistant")
        out.append(float(len(_text(completion)) % 2) if ok and shaped else -10.0)
    return out


def says_answer(prompts, completions, answer, source, **kwargs) -> list[float]:
    """1.0 where the completion contains its row's answer (``answer`` and ``source`` are
    columns)."""
    return [1.0 if a in _text(c) else 0.0 for c, a in zip(completions, answer, strict=True)]


def one_short(prompts, completions, **kwargs) -> list[float]:
    """One reward too few."""
    return [1.0] * (len(completions) - 1)


def none_for_odd(prompts, completions, **kwargs) -> list:
    """None (TRL: "not mine to score") for an odd-length completion, else 1.0."""
    return [None if len(_text(c)) % 2 else 1.0 for c in completions]


def as_array(prompts, completions, **kwargs):
    """numpy floats: the length of each completion."""
    import numpy as np

    return np.array([len(_text(c)) for c in completions], dtype=np.float32)


def needs_solution(prompts, completions, solution, **kwargs) -> list[float]:
    """Takes a ``solution`` column."""
    return [0.0 for _ in completions]


def exact(response: str, example) -> float:
    """Per sample: 1.0 when the response is the answer."""
    return 1.0 if response.strip() == example.answer else 0.0
