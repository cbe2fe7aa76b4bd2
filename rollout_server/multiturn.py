"""Multi-turn episodes: the model talks, calls tools, reads the environment's answers, talks again.

``EpisodeRunner.run_group`` replaces ``episode.run_episode`` when ``task.env`` names an
environment: each of the group's samples is one conversation with its own environment instance,
all run concurrently (one that fails cancels the others). How a turn is built, its limits and
metrics: rollout_server/ROLLOUT.md, "Multi-turn episodes".

Invariants:
* ``output_ids``, ``behav_logp``, ``versions`` and ``loss_mask`` are aligned; generated tokens keep
  the logprob and version the engine reported; a context token has logprob 0, mask 0 and the
  version of the last generated token before it, so the trajectory's oldest version is that of a
  generated token;
* the context ids are ``ChatRenderer.continuation_ids``: the ids equal the chat template's
  rendering of the conversation;
* a turn whose generation a timeout cuts is dropped whole; one cut later (the episode timeout
  during its tool calls or environment step) keeps its tokens and its assistant message, without
  that step's reward; the reward is the sum of the environment's step rewards.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from areal_like.tasks.environment import (
    ChatRenderer,
    StepResult,
    as_step_result,
    check_messages,
    env_template,
    load_environment,
    maybe_await,
)
from areal_like.tasks.tools import ToolRegistry, parse_tool_calls, tool_message
from areal_like.wire.group_checks import NO_ROOM
from areal_like.wire.protocol import Credit, TrajectoryGroup
from areal_like.wire.trajectory import Trajectory
from rollout_server.episode import (
    EpisodeContext,
    Sample,
    Transcript,
    gather_or_cancel,
    generate_sample,
    output_room,
)

TURN_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
TOOL_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30)


@dataclass(kw_only=True)
class Conversation(Transcript):
    """One sample's episode as it grows (module docstring)."""

    messages: list[dict]
    turns: int = 0
    reward: float = 0.0
    resumed: int = 0
    # {"name", "outcome", "seconds"} in call order
    tool_calls: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def add_generated(self, s: Sample) -> None:
        super().add_generated(s)
        self.resumed += s.resumed
        self.turns += 1


class EpisodeRunner:
    """Runs conversations for one rollout server (shared: tool pool, renderer settings, metrics)."""

    def __init__(self, ctx: EpisodeContext, tools=None):
        # tools: a ToolPool (or None: no tool runs)
        self.ctx, self.cfg, self.tools = ctx, ctx.task_cfg, tools
        self.template = env_template(ctx.tokenizer, ctx.task_cfg)

    async def run_group(self, credit: Credit) -> TrajectoryGroup:
        example = self.ctx.task.example(credit.prompt_index, credit.epoch)
        convs = await gather_or_cancel(self.run(example) for _ in range(self.cfg.group_size))
        return self.ctx.group(credit, [self.trajectory(c) for c in convs])

    async def run(self, example) -> Conversation:
        """One conversation to its end (module docstring: the limits)."""
        env = load_environment(self.cfg.env)
        registry = ToolRegistry(getattr(env, "tools", None))
        renderer = ChatRenderer(self.ctx.tokenizer, self.template,
                                registry.openai() if registry else None)
        messages = check_messages(await maybe_await(env.reset(example)),
                                  f"{self.cfg.env} reset")
        conv = Conversation(prompt_ids=renderer.prompt_ids(messages), messages=messages)
        try:
            await asyncio.wait_for(self._turns(conv, env, registry, renderer),
                                   self.cfg.episode_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            conv.finish_reason = "episode_timeout"
        self.observe(conv)
        return conv

    async def _turns(self, conv: Conversation, env, registry: ToolRegistry,
                     renderer: ChatRenderer) -> None:
        ctx, cfg = self.ctx, self.cfg
        while True:
            budget = output_room(conv.total_tokens, cfg, cfg.max_episode_tokens,
                                 max_input=ctx.max_input)
            if budget <= 0:  # an opening prompt without room is never sent (group_checks.py)
                conv.finish_reason = "max_tokens" if conv.output_ids else NO_ROOM
                return
            try:
                sample = await asyncio.wait_for(generate_sample(
                    ctx.client, conv.prompt_ids + conv.output_ids, ctx.sampling_params(), budget,
                    ctx.current_version_fn, ctx.metrics), cfg.turn_timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                conv.finish_reason = "turn_timeout"
                return
            conv.add_generated(sample)
            text = ctx.tokenizer.decode(sample.output_ids, skip_special_tokens=True)
            before = conv.messages  # the message goes with its ids, before any await (a cut)
            conv.messages = before + [{"role": "assistant", "content": text}]
            calls = parse_tool_calls(text) if registry else []
            if calls:
                result = StepResult([await self.call_tool(conv, registry, c) for c in calls])
            else:
                result = as_step_result(await maybe_await(env.step(text)), self.cfg.env)
                conv.reward += result.reward
                conv.info.update(result.info)
            conv.messages = conv.messages + result.messages
            if result.done:
                conv.finish_reason = "stop"
                return
            if conv.turns >= cfg.max_turns:
                conv.finish_reason = "max_turns"
                return
            cont = renderer.continuation_ids(before, text, sample.output_ids, result.messages)
            if output_room(conv.total_tokens + len(cont), cfg, cfg.max_episode_tokens,
                           max_input=ctx.max_input) <= 0:  # no room left to generate
                conv.finish_reason = "max_tokens"
                return
            conv.add_context(cont, ctx.current_version_fn())

    async def call_tool(self, conv: Conversation, registry: ToolRegistry, call) -> dict:
        """Run one call; every failure becomes an error message the model reads."""
        problem = registry.check(call)
        if problem:
            outcome, content, seconds = "invalid", problem, 0.0
        elif self.tools is None:
            outcome, content, seconds = "error", "tools are not available on this server", 0.0
        else:
            r = await self.tools.call(registry.specs[call.name], call.arguments)
            outcome, content, seconds = r.outcome, r.content, r.seconds
        name = call.name if call.name in registry.specs else "unknown"
        conv.tool_calls.append({"name": name, "outcome": outcome, "seconds": round(seconds, 4)})
        m = self.ctx.metrics
        m.counter("rollout/tool_calls",
                  "tool calls by tool and outcome (ok, error, timeout, invalid)",
                  ("tool", "outcome")).labels(tool=name, outcome=outcome).inc()
        if outcome != "invalid":
            m.histogram("rollout/tool_seconds", "wall time of one tool call", ("tool",),
                        buckets=TOOL_SECONDS_BUCKETS).labels(tool=name).observe(seconds)
        return tool_message(name, content, error=outcome != "ok")

    def observe(self, conv: Conversation) -> None:
        m = self.ctx.metrics
        m.histogram("rollout/episode_turns", "assistant turns per multi-turn episode",
                    buckets=TURN_BUCKETS).observe(conv.turns)
        m.histogram("rollout/episode_tokens", "prompt + output tokens per multi-turn episode",
                    buckets=TOKEN_BUCKETS).observe(conv.total_tokens)
        m.counter("rollout/episodes_finished", "multi-turn episodes by finish reason",
                  ("reason",)).labels(reason=conv.finish_reason).inc()
        generated, total = sum(conv.loss_mask), len(conv.loss_mask)
        m.counter("rollout/output_tokens_generated",
                  "output tokens the policy generated (loss_mask 1)").inc(generated)
        m.counter("rollout/output_tokens_context",
                  "output tokens of environment, tools and markup (loss_mask 0)"
                  ).inc(total - generated)
        if total:
            m.gauge("rollout/masked_token_share",
                    "share of the last episode's output tokens that are context"
                    ).set((total - generated) / total)

    def trajectory(self, conv: Conversation) -> Trajectory:
        said = [m["content"] for m in conv.messages if m["role"] == "assistant"]
        meta = {"turns": conv.turns, "resumed": conv.resumed, "tool_calls": conv.tool_calls,
                "messages": conv.messages, "text": said[-1] if said else ""}
        if conv.info:
            meta["info"] = conv.info
        return conv.trajectory(conv.reward, meta)
