"""A multi-turn verifiers environment with a tool: multiply a 2-digit by a 1-digit number with
the ``mul`` tool of an MCP tool server (``vf.Toolset``, started as ``python -m
areal_like.tasks.vf_calc``; the taskset's, so an agent worker starts it once) and answer the
product (``areal-like run experiment=vf_calc``). ``task.env_args`` sets ``num_tasks`` and ``seed``.

``CalcTaskset.demo`` gives the warm start its conversations: a quarter (``tool_demos``) call the
tool and copy its result, the rest answer at once with a wrong number of about the right size. A
warm-started model does both, mostly the latter, so RL has a choice to learn: calling the tool is
what earns the reward."""
from __future__ import annotations

import json
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
    @vf.reward
    async def exact(self, task: CalcData, trace: vf.Trace) -> float:
        return float(trace.last_reply == task.answer)


class CalcConfig(vf.TasksetConfig):
    num_tasks: int = 4096
    seed: int = 0
    tool_demos: float = 0.25  # the share of demo conversations that call the tool


def call_text(a: int, b: int) -> str:
    """The tool call as the model writes it (hermes markup, compact JSON: fewer tokens)."""
    call = json.dumps({"name": "mul", "arguments": {"a": a, "b": b}}, separators=(",", ":"))
    return f"<tool_call>{call}</tool_call>"


class CalcTaskset(vf.Taskset[CalcTask, CalcConfig]):
    @classmethod
    def toolsets(cls, config: CalcConfig) -> list[vf.Toolset]:
        """The tool server, shared by every episode (verifiers starts a task's own servers once
        an episode, and this one's process costs seconds to start on a small machine)."""
        return [CalcToolset(vf.ToolsetConfig())]

    def load(self):
        rng = random.Random(self.config.seed)
        for _ in range(self.config.num_tasks):
            a, b = rng.randrange(10, 100), rng.randrange(2, 10)
            yield CalcTask(CalcData(prompt=f"{a}*{b}", answer=str(a * b)), self.config.task)

    def demo(self, messages: list[dict], task: dict, rng: random.Random) -> list[dict]:
        """A warm-start conversation after the prompt ``messages`` (module docstring)."""
        answer = int(task["answer"])
        if rng.random() >= self.config.tool_demos:  # answered at once: wrong by 1 to 30
            guess = answer + rng.choice([-1, 1]) * rng.randint(1, 30)
            return [*messages, {"role": "assistant", "content": str(abs(guess) or answer + 1)}]
        a, b = (int(x) for x in task["prompt"].split("*"))
        return [*messages, {"role": "assistant", "content": call_text(a, b)},
                {"role": "tool", "content": str(a * b)},
                {"role": "assistant", "content": str(answer)}]


__all__ = ["CalcTaskset"]


def exit_with_parent() -> None:
    """Ask the kernel to kill this process when the one that started it dies (``PR_SET_PDEATHSIG``,
    as ``areal_like/tied.py`` does for the job's daemons): verifiers starts a tool server in a
    session of its own, so a killed agent worker would otherwise leave it running."""
    import ctypes
    import os
    import signal
    import sys

    parent = os.getppid()
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG, <linux/prctl.h>
    if os.getppid() != parent:  # gone before the ask
        sys.exit(0)


if __name__ == "__main__":  # the tool server's process (verifiers starts it with python -m)
    exit_with_parent()
    CalcToolset.run()
