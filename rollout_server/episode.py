"""Episodes: one credit (prompt index) -> one scored ``TrajectoryGroup``.

``generate_sample`` is interruptible generation (rollout_server/ROLLOUT.md, worked example): a
segment the engine aborted for a pause is resubmitted as ``prompt + tokens so far`` with
``max_new_tokens`` reduced by their count, until a segment ends with ``stop`` or ``length``.

Invariants of a sample:
* ``output_ids``, ``behav_logp`` and ``versions`` are aligned and hold every token exactly once,
  in order;
* ``versions[t]`` is the version that produced token t: the segment's ``weight_version`` (or its
  ``weight_versions`` spans); a version string that is not an integer (SGLang's ``"default"``,
  only ever the engine's first label) falls back to the version the server served when the
  segment was sent (not when it came back: under ``pause_mode=retract`` a segment spans syncs);
* ``len(output_ids) <= max_new_tokens``; a sample that exhausts its budget finishes as ``length``;
* an abort that carries an HTTP status is an error (``EngineError``), not a pause.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from areal_like.engines.client import EngineClient, EngineError, GenerateOutput
from areal_like.net.metrics import Metrics
from areal_like.tasks.task import encode_prompt
from areal_like.wire.group_checks import NO_ROOM
from areal_like.wire.protocol import Credit, TrajectoryGroup
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from rollout_server.reward_model import RewardModel, combine, process_rewards
from rollout_server.reward_pool import RewardPool
from rollout_server.teacher import Teacher, teacher_for

MAX_EMPTY_RESUMES = 1000  # aborts in a row without a new token: the engine is stuck, not pausing
# what callers without a registry (evaluation) count into: made once, never served
UNCOUNTED = Metrics()


@dataclass(slots=True)
class Sample:
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str = ""
    resumed: int = 0  # how many times an aborted segment was resubmitted
    # the last segment's routed experts: its input was the prompt and every token before it, so
    # they cover [prompt + output - 1] positions (None: not asked for)
    routes: bytes | None = None


@dataclass(kw_only=True)
class Transcript:
    """A conversation's ids as one trajectory grows them (multiturn.py, agent_endpoint.py):
    aligned per-token arrays after the prompt. A generated token keeps its logprob and version
    (loss_mask 1); a context token has logprob 0, loss_mask 0 and the version of the generated
    token before it (``version`` before the first), so the oldest version is a generated one's.

    Routes (routing replay): each turn's request is the whole conversation so far and its routes
    cover every position it ran, but a position keeps the route of the turn that ran it first:
    the context and the previous turn's last token from that turn's prefill, generated tokens
    from their decode (what ``logprobs`` were sampled under; for a turn resumed after a pause,
    from its last segment, which re-ran the turn's earlier tokens, as a single-turn sample's).
    Context the engine never ran (an episode cut before its next turn) is left out of the
    trajectory; a turn without routes leaves the trajectory without any."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    finish_reason: str = ""
    routes: np.ndarray | None = None  # int32 [positions run so far, layers x top_k]
    routes_lost: bool = False  # a turn came back without its routes: the trajectory has none

    def add_context(self, ids: list[int], version: int) -> None:
        self.output_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.versions += [self.versions[-1] if self.versions else version] * len(ids)
        self.loss_mask += [0] * len(ids)

    def add_generated(self, s: Sample) -> None:
        if s.routes is None:  # not asked for, or a turn ended by an abort past its budget
            self.routes, self.routes_lost = None, True
        elif not self.routes_lost:  # it ran the conversation so far + s's tokens but one
            ran = len(self.prompt_ids) + len(self.output_ids) + len(s.output_ids) - 1
            turn = np.frombuffer(s.routes, "<i4")
            width = turn.size // max(ran, 1) if self.routes is None else self.routes.shape[1]
            if turn.size != ran * width or width == 0:  # not a row per position it ran: none kept
                self.routes, self.routes_lost = None, True
            else:
                turn = turn.reshape(ran, width)
                self.routes = turn if self.routes is None else np.concatenate(
                    [self.routes, turn[len(self.routes):]])
        self.output_ids += s.output_ids
        self.logprobs += s.logprobs
        self.versions += s.versions
        self.loss_mask += [1] * len(s.output_ids)

    def trajectory(self, reward: float, metadata: dict, finish_reason: str = "") -> Trajectory:
        n = len(self.output_ids)
        if self.routes is not None:  # positions run + the last token, which no request ran
            n = len(self.routes) + 1 - len(self.prompt_ids)
        return Trajectory.of(prompt_ids=as_i32(self.prompt_ids),
                             output_ids=as_i32(self.output_ids[:n]),
                             behav_logp=as_f32(self.logprobs[:n]),
                             versions=as_i32(self.versions[:n]),
                             loss_mask=as_i32(self.loss_mask[:n]), reward=float(reward),
                             finish_reason=finish_reason or self.finish_reason, metadata=metadata,
                             routed_experts=self.routes)


def as_version(label: str | None, fallback: int) -> int:
    """An engine's version label as our integer; ``fallback`` for none or one that is not an
    integer (SGLang's default ``"default"``)."""
    try:
        return int(label) if label is not None else fallback
    except ValueError:
        return fallback


def segment_versions(out: GenerateOutput, fallback: int) -> list[int]:
    """Per-token versions of one segment (see module docstring)."""
    versions = [as_version(out.weight_version, fallback)] * len(out.output_ids)
    for version, start, end in out.weight_spans:
        for t in range(max(0, start), min(end, len(versions))):
            versions[t] = as_version(version, fallback)
    return versions


async def generate_sample(client: EngineClient, prompt_ids: list[int], sampling: dict,
                          max_new_tokens: int, current_version_fn: Callable[[], int],
                          metrics: Metrics = UNCOUNTED) -> Sample:
    """Generate one sample to completion, resubmitting across pauses (module docstring)."""
    return (await generate_group(client, prompt_ids, 1, sampling, max_new_tokens,
                                 current_version_fn, metrics))[0]


async def generate_group(client: EngineClient, prompt_ids: list[int], n: int, sampling: dict,
                         max_new_tokens: int, current_version_fn: Callable[[], int],
                         metrics: Metrics = UNCOUNTED) -> list[Sample]:
    """n samples for one prompt, each resubmitted across pauses on its own (module docstring). The
    samples not finished yet go to the engine as ONE batched ``/generate`` (a list of prompts, one
    per sample): one HTTP round trip per group and pause instead of one per sample."""
    in_flight = metrics.gauge("rollout/requests_in_flight", "generate requests open")
    samples, empty = [Sample() for _ in range(n)], [0] * n
    pending = list(range(n))
    while pending:
        inputs = [prompt_ids + samples[i].output_ids for i in pending]
        params = [dict(sampling, max_new_tokens=max_new_tokens - len(samples[i].output_ids))
                  for i in pending]
        in_flight.inc(len(pending))
        sent_under = current_version_fn()
        try:
            outs = await client.generate_batch(inputs, params) if len(pending) > 1 else \
                [await client.generate(inputs[0], params[0])]
        finally:
            in_flight.dec(len(pending))
        pending = [i for i, out in zip(pending, outs, strict=True)
                   if not _absorb(samples[i], out, i, empty, max_new_tokens, sent_under,
                                  metrics)]
    return samples


def _absorb(sample: Sample, out: GenerateOutput, i: int, empty: list[int], max_new_tokens: int,
            version: int, metrics: Metrics) -> bool:
    """Append one segment to ``sample``; True when the sample is finished, False to resubmit it."""
    sample.output_ids += out.output_ids
    sample.logprobs += out.logprobs
    sample.versions += segment_versions(out, version)
    sample.routes = out.routed_experts
    metrics.counter("rollout/tokens_generated", "output tokens received").inc(len(out.output_ids))
    if out.finish_reason != "abort":
        sample.finish_reason = out.finish_reason
        return True
    if out.abort_status is not None and out.abort_status >= 400:
        raise EngineError("/generate", out.abort_status,
                          f"request aborted by the engine: {out.finish_message}")
    if len(sample.output_ids) >= max_new_tokens:
        sample.finish_reason = "length"
        return True
    empty[i] = 0 if out.output_ids else empty[i] + 1
    if empty[i] > MAX_EMPTY_RESUMES:
        raise EngineError("/generate", None, f"aborted {empty[i]} times in a row without progress")
    sample.resumed += 1
    metrics.counter("rollout/aborted_resumed_requests", "aborted requests resubmitted").inc()
    return False


def output_room(prompt_tokens: int, task_cfg, context: int, max_new_tokens: int = 0,
                max_input: int = 0) -> int:
    """The output tokens a prompt of ``prompt_tokens`` asks for: ``max_new_tokens`` (else
    ``task.max_new_tokens``), or what ``context`` leaves where that is less (SGLang refuses a
    request over its context; <= 0: no room); ``context`` 0: no limit. No room either for a
    prompt of ``max_input`` tokens or more, which the engine refuses (SGLang's
    ``max_req_input_len``: ROLLOUT.md; 0: none)."""
    if 0 < max_input <= prompt_tokens:
        return 0
    budget = max_new_tokens or task_cfg.max_new_tokens
    return min(budget, context - prompt_tokens) if context > 0 else budget


async def gather_or_cancel(coros) -> list:
    """The results of ``coros``, run concurrently. When one raises, the others are cancelled
    (their engine requests aborted, as a hang-up's) and waited for before its exception goes on:
    ``asyncio.gather`` alone leaves them running, unseen, to their own timeouts."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass(kw_only=True)
class EpisodeContext:
    """What every episode of one rollout server shares."""

    client: EngineClient
    task: object  # areal_like.tasks.task.Task
    tokenizer: object  # HF tokenizer
    rewards: RewardPool
    task_cfg: object  # areal_like.settings.config.TaskConfig
    server_id: str
    current_version_fn: Callable[[], int]
    metrics: Metrics = field(default_factory=Metrics)
    incarnation: str = ""  # this process's, in every group (RolloutServer.incarnation)
    context: int = 0  # prompt + output tokens the engine serves (RolloutFacts.context; 0: any)
    max_input: int = 0  # the engine refuses an input this long (output_room; 0: none)
    reward_model: RewardModel | None = None  # task.reward_model, loaded by the server
    teachers: list[Teacher] = field(default_factory=list)  # distill.teachers (teacher_for)

    def sampling_params(self) -> dict:
        cfg = self.task_cfg
        params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
        if self.tokenizer.eos_token_id is not None:
            params["stop_token_ids"] = [int(self.tokenizer.eos_token_id)]
        return params

    def group(self, credit: Credit, trajectories: list[Trajectory]) -> TrajectoryGroup:
        """The group of ``credit``'s lease, named after this server and the lease; its rewards
        observed (single-turn, multi-turn and agent episodes alike)."""
        total = sum(t.reward for t in trajectories)
        self.metrics.gauge("rollout/reward_mean",
                           "mean reward of the last group").set(total / len(trajectories))
        # every sample's reward: _sum / _count over an interval is its mean reward (`areal-like
        # top`); a histogram, not two counters, since a reward may be negative
        rewards = self.metrics.histogram("rollout/reward", "reward of every scored sample",
                                         buckets=(0.0, 0.25, 0.5, 0.75, 1.0))
        for t in trajectories:
            rewards.observe(t.reward)
        return TrajectoryGroup(group_id=f"{self.server_id}-{credit.lease_id}",
                               server_id=self.server_id, incarnation=self.incarnation,
                               lease_id=credit.lease_id,
                               prompt_index=credit.prompt_index, epoch=credit.epoch,
                               trajectories=trajectories)


def observe_terms(metrics: Metrics, terms: dict[str, list[float | None]]) -> None:
    """Each reward function's mean over the group (``RewardPool.score_terms``; a None, TRL's "not
    mine to score", is left out), labelled with its name."""
    gauge = metrics.gauge("rollout/reward_fn_mean", "mean reward of each task.reward_fn function "
                          "over the last group", ("fn",)) if terms else None
    for name, values in terms.items():
        if got := [v for v in values if v is not None]:
            gauge.labels(fn=name).set(sum(got) / len(got))


async def run_episode(ctx: EpisodeContext, credit: Credit) -> TrajectoryGroup:
    """Generate, detokenise and score one group for ``credit``."""
    example = ctx.task.example(credit.prompt_index, credit.epoch)
    prompt_ids = encode_prompt(ctx.tokenizer, example, ctx.task_cfg)
    t0 = time.monotonic()
    n = ctx.task_cfg.group_size
    budget = output_room(len(prompt_ids), ctx.task_cfg, ctx.context, max_input=ctx.max_input)
    # a prompt that leaves no room is not sent: the buffer refuses its group (no_room) and skips
    # the prompt this epoch
    samples = (await generate_group(ctx.client, prompt_ids, n, ctx.sampling_params(), budget,
                                    ctx.current_version_fn, ctx.metrics) if budget > 0
               else [Sample(finish_reason=NO_ROOM) for _ in range(n)])
    ctx.metrics.histogram("rollout/generation_seconds", "wall time to generate one group",
                          buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)).observe(
                              time.monotonic() - t0)
    def decode(ids):
        return ctx.tokenizer.decode(ids, skip_special_tokens=True)

    texts = [decode(s.output_ids) for s in samples]
    rule, terms = await ctx.rewards.score_terms(example.prompt, texts, example)
    scores = rule
    observe_terms(ctx.metrics, terms)
    model = [(0.0, None, ())] * n
    if ctx.reward_model is not None:  # the rule's reward stays in the metadata
        model = await ctx.reward_model.score_group(example.prompt, texts)
        scores = combine(rule, model, ctx.task_cfg.reward_model)
    teacher = [None] * n
    if (scorer := teacher_for(ctx.teachers, example)) and budget > 0:  # TeacherError: no group
        teacher = await scorer.group_logprobs(prompt_ids, [s.output_ids for s in samples],
                                              [[1] * len(s.output_ids) for s in samples])
    trajectories = []
    for s, text, (reward, error), (rule_reward, _), (_, _, steps), teacher_logp in zip(
            samples, texts, scores, rule, model, teacher):
        meta = {"text": text, "resumed": s.resumed}
        if terms:  # each task.reward_fn function's reward of this sample, by its name
            meta["rewards"] = {name: values[len(trajectories)] for name, values in terms.items()}
        if ctx.reward_model is not None:
            meta["rule_reward"] = rule_reward
        if steps and error is None:  # a process reward model's steps, on their tokens
            meta["process_rewards"] = process_rewards(decode, s.output_ids, steps,
                                                      ctx.task_cfg.reward_model.weight)
        if error is not None:
            meta["reward_error"] = error
        trajectories.append(Trajectory.of(
            prompt_ids=as_i32(prompt_ids), output_ids=as_i32(s.output_ids),
            behav_logp=as_f32(s.logprobs), versions=as_i32(s.versions), reward=reward,
            finish_reason=s.finish_reason, metadata=meta,
            routed_experts=None if s.routes is None else np.frombuffer(s.routes, "<i4"),
            teacher_logp=None if teacher_logp is None else as_f32(teacher_logp)))
    return ctx.group(credit, trajectories)
