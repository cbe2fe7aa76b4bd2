"""Environments and tools the multi-turn tests name by dotted path (``agent_envs:Chat``): module
level, so a tool worker process imports them as the rollout server's would."""

from __future__ import annotations

import asyncio
import time

import numpy as np


def add(a: int, b: int) -> int:
    return a + b


def boom(reason: str) -> str:
    raise ValueError(reason)


def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


TOOLS = [
    {"name": "add", "function": "agent_envs:add", "description": "a + b",
     "parameters": {"type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"], "additionalProperties": False}},
    {"name": "boom", "function": "agent_envs:boom", "description": "raises",
     "parameters": {"type": "object", "properties": {"reason": {"type": "string"}},
                    "required": ["reason"]}},
    {"name": "sleepy", "function": "agent_envs:sleepy", "description": "sleeps",
     "parameters": {"type": "object", "properties": {"seconds": {"type": "number"}},
                    "required": ["seconds"]}},
]


class Chat:
    """Answers each turn with how many characters it read; done (reward 1) after ``DONE_AFTER``
    steps. Each step's reward is 0.25 before that, so a test sees the sum."""

    tools = TOOLS
    DONE_AFTER = 3

    def reset(self, example):
        self.steps = 0
        return [{"role": "system", "content": "be brief"},
                {"role": "user", "content": example.prompt}]

    def step(self, text):
        self.steps += 1
        done = self.steps >= self.DONE_AFTER
        return ([{"role": "user", "content": f"read {len(text)}"}], 1.0 if done else 0.25, done,
                {"steps": self.steps})


class Endless(Chat):
    """Never done (limits end it); async, to check async environments."""

    async def step(self, text):
        self.steps += 1
        return [{"role": "user", "content": "go on"}], 0.0, False, {}


class NumpyInfo(Chat):
    """Its info holds numpy values, as many environments' do."""

    def step(self, text):
        messages, reward, done, info = super().step(text)
        return messages, np.float32(reward), np.bool_(done), dict(
            info, score=np.float32(0.5), hist=np.arange(3), ok=np.bool_(True),
            nested={"x": np.int64(2)})


class Stuck(Chat):
    """Its step never returns: only the episode timeout ends the episode."""

    async def step(self, text):
        await asyncio.Event().wait()


class Broken(Chat):
    """Its step has a bug: the episode fails (the rollout server logs where)."""

    def step(self, text):
        return {}["missing"]
