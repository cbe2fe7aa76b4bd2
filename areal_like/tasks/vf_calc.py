"""A multi-turn verifiers environment with a tool: multiply a 3-digit by a 2-digit number with
the ``mul`` tool of an MCP tool server (``vf.Toolset``, started for each episode as
``python -m areal_like.tasks.vf_calc``) and answer the product (``areal-like run
experiment=vf_calc``). ``task.env_args`` sets ``num_tasks`` and ``seed``."""
from __future__ import annotations

import random

import verifiers.v1 as vf


class CalcToolset(vf.Toolset[vf.ToolsetConfig]):
    TOOL_PREFIX = None  # the tool is `mul`, not `calc_toolset_mul`: short calls for a small model

    @vf.tool
    async def mul(self, a: int, b: int) -> str:
        """The product of a and b."""
        return str(a * b)


class CalcData(vf.TaskData):
    answer: str


class CalcTask(vf.Task[CalcData, vf.State, vf.TaskConfig]):
    @classmethod
    def toolsets(cls, config: vf.TaskConfig) -> list[vf.Toolset]:
        return [CalcToolset(vf.ToolsetConfig())]

    @vf.reward
    async def exact(self, task: CalcData, trace: vf.Trace) -> float:
        return float(trace.last_reply == task.answer)


class CalcConfig(vf.TasksetConfig):
    num_tasks: int = 4096
    seed: int = 0


class CalcTaskset(vf.Taskset[CalcTask, CalcConfig]):
    def load(self):
        rng = random.Random(self.config.seed)
        for _ in range(self.config.num_tasks):
            a, b = rng.randrange(100, 1000), rng.randrange(10, 100)
            yield CalcTask(CalcData(prompt=f"{a}*{b}", answer=str(a * b)), self.config.task)


__all__ = ["CalcTaskset"]

if __name__ == "__main__":  # the tool server's process (verifiers starts it with python -m)
    CalcToolset.run()
