"""Agent episodes: ``task.agent = "pkg.module:run"``, a plain function that talks to the model
through the OpenAI API and returns a score (rollout_server/ROLLOUT.md, "Agent episodes").

One group: ``task.group_size`` episodes of the credit's example, run concurrently, each a session
on the agent endpoint (its own API key) and ``run(base_url, api_key, example)`` in the agent pool
(sandboxed workers, killed with all they started past ``task.episode_timeout_s``). Its reward (None:
the task's reward scores the last generated text; a failure: 0 with the reason) goes to every
trajectory of its session. An episode whose agent made no call leaves no trajectory; a group with
none fails like an engine error (the credit lapses and is re-issued). An episode whose first call
left no room leaves a ``no_room`` one (agent_endpoint.py): the buffer refuses its group as
``no_room`` and skips the prompt this epoch, as a multi-turn episode's.
"""
from __future__ import annotations

import math

from areal_like.tasks.tools import ToolSpec
from areal_like.wire.group_checks import NO_ROOM
from areal_like.wire.protocol import Credit, TrajectoryGroup
from areal_like.wire.trajectory import Trajectory
from rollout_server.agent_endpoint import AgentEndpoint
from rollout_server.episode import EpisodeContext, gather_or_cancel
from rollout_server.tool_pool import ToolOutcome, ToolPool

RUN = ToolSpec(name="agent", function="rollout_server.agent_worker:run_agent", description="",
               parameters={})
# threads an agent may start: asyncio's resolver and an HTTP client's pools take a few each
AGENT_THREADS = 64


def agent_pool(task_cfg) -> ToolPool:
    """The sandboxed workers that run one rollout server's agents."""
    return ToolPool(task_cfg.agent_workers, task_cfg.episode_timeout_s, task_cfg.agent_memory_mb,
                    processes=AGENT_THREADS, memory_setting="task.agent_memory_mb",
                    reply_mb=task_cfg.worker_reply_mb, endpoint=True)


def score(outcome: ToolOutcome) -> tuple[float, str, str]:
    """(reward, error or "", finish reason or "") of one agent run."""
    if outcome.outcome == "timeout":
        return 0.0, outcome.content, "episode_timeout"
    if outcome.outcome != "ok":
        return 0.0, outcome.content, "error"
    try:  # a bool counts as 0/1, as a reward function's does (reward_worker.as_reward)
        reward = float({"true": 1, "false": 0}.get(outcome.content, outcome.content))
    except ValueError:
        return 0.0, f"the agent returned {outcome.content[:80]!r}, not a number", "error"
    if not math.isfinite(reward):
        return 0.0, f"the agent returned {reward}, not a finite number", "error"
    return reward, "", ""


class AgentRunner:
    def __init__(self, ctx: EpisodeContext, endpoint: AgentEndpoint, pool: ToolPool):
        self.ctx, self.cfg, self.endpoint, self.pool = ctx, ctx.task_cfg, endpoint, pool
        pool.forward_to(endpoint.host, endpoint.port)  # root's agents reach it alone
        self.error = ""  # the latest agent error: why a group without a call failed

    async def run_group(self, credit: Credit) -> TrajectoryGroup:
        example = self.ctx.task.example(credit.prompt_index, credit.epoch)
        runs = await gather_or_cancel(self.run(example) for _ in range(self.cfg.group_size))
        trajectories = [t for run in runs for t in run]
        if not trajectories:
            why = f" (last error: {self.error})" if self.error else ""
            raise RuntimeError(f"none of the {self.cfg.group_size} agents of prompt "
                               f"{credit.prompt_index} called the model{why}")
        return self.ctx.group(credit, trajectories)

    async def run(self, example) -> list[Trajectory]:
        """One episode to its end (module docstring)."""
        api_key, session = self.endpoint.open_session(example)
        try:
            outcome = await self.pool.call(RUN, {"path": self.cfg.agent, "api_key": api_key,
                                                 "base_url": self.endpoint.base_url,
                                                 "example": example, "relay": self.pool.relay})
        finally:
            self.endpoint.close_session(api_key)
        if outcome.outcome == "ok" and outcome.content == "null":  # it returned None
            reward, error, finish = await self.score_conversation(session, example)
        else:
            reward, error, finish = score(outcome)
        if finish == "error" and session.out_of_room:  # it raised on context_length_exceeded:
            finish = "max_tokens"  # out of room, as a multi-turn episode ends, not a crash
        meta = {"agent_seconds": round(outcome.seconds, 3), "splits": session.splits}
        if error:
            meta["agent_error"] = self.error = error
        if finish:
            meta["finish_reason"] = finish
        self._count((finish or "ok") if session.segments else
                    NO_ROOM if session.no_room else "no_call")
        return self.endpoint.trajectories(session, reward, meta)

    async def score_conversation(self, session, example) -> tuple[float, str, str]:
        """An agent that returns None leaves its score to the task's reward (``task.reward_fn``,
        else the task's own), given the last text the model generated in the episode."""
        if session.last is None:
            return 0.0, "the agent returned None and made no call", "error"
        [(reward, error)] = await self.ctx.rewards.score_group(example.prompt, [session.last.text],
                                                               example)
        return reward, error or "", ""

    def _count(self, outcome: str) -> None:
        self.ctx.metrics.counter("rollout/agent_episodes", "agent episodes by outcome",
                                 ("outcome",)).labels(outcome=outcome).inc()
