"""A single-turn verifiers environment: reverse a string of letters a-j (``areal-like run
experiment=vf_reverse``). ``task.env_args`` sets ``num_tasks``, ``length``, ``seed`` and
``reverse_demos``.

``ReverseTaskset.demo`` gives the warm start its answers: a share (``reverse_demos``) reversed,
the rest the string copied unchanged. A warm-started model does both, so RL has a choice to learn:
reversing is what earns the reward."""
from __future__ import annotations

import random

import verifiers.v1 as vf


class ReverseData(vf.TaskData):
    answer: str


class ReverseTask(vf.Task[ReverseData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def exact(self, task: ReverseData, trace: vf.Trace) -> float:
        return float(trace.last_reply == task.answer)


class ReverseConfig(vf.TasksetConfig):
    num_tasks: int = 4096
    length: int = 6
    seed: int = 0
    reverse_demos: float = 0.5  # the share of demo answers that reverse the string


class ReverseTaskset(vf.Taskset[ReverseTask, ReverseConfig]):
    def load(self):
        rng = random.Random(self.config.seed)
        for _ in range(self.config.num_tasks):
            s = "".join(rng.choice("abcdefghij") for _ in range(self.config.length))
            yield ReverseTask(ReverseData(prompt=s, answer=s[::-1]), self.config.task)

    def demo(self, messages: list[dict], task: dict, rng: random.Random) -> list[dict]:
        """A warm-start answer after the prompt ``messages`` (module docstring)."""
        reply = task["answer"] if rng.random() < self.config.reverse_demos else task["prompt"]
        return [*messages, {"role": "assistant", "content": reply}]


__all__ = ["ReverseTaskset"]
