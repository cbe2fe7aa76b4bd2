"""A single-turn verifiers environment: reverse a string of letters a-j (``areal-like run
experiment=vf_reverse``). ``task.env_args`` sets ``num_tasks``, ``length`` and ``seed``."""
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


class ReverseTaskset(vf.Taskset[ReverseTask, ReverseConfig]):
    def load(self):
        rng = random.Random(self.config.seed)
        for _ in range(self.config.num_tasks):
            s = "".join(rng.choice("abcdefghij") for _ in range(self.config.length))
            yield ReverseTask(ReverseData(prompt=s, answer=s[::-1]), self.config.task)


__all__ = ["ReverseTaskset"]
