"""The teacher of on-policy distillation (``distill``; trainer/LOSSES.md section 11): the log-prob
it gives each sampled token, given the prompt and the tokens before it, at temperature 1, put on
the trajectory as ``teacher_logp``.

A teacher is an engine at a URL: an SGLang, vLLM or embedded engine given by the user, or the
job's ``teacher-<i>`` processes, which ``areal-like run`` starts for model directories on
``distill.teacher_engine`` and whose URLs it puts in ``distill.teachers`` (launch/topology.py;
started, health-checked, restarted and stopped with the job; never weight-synced: the trainer
drives only the engines on the buffer's roster). It is called with the job's engine key, as the
policy's engine is, through the client of ``distill.teacher_engine``. One call per group asks for
the input log-probs of the group's prompt + response rows from the prompt's end
(``input_logprobs``: SGLang's ``/generate`` generating nothing, vLLM's ``/v1/completions`` with
``prompt_logprobs``).

Invariants:
* ``group_logprobs`` never raises but ``TeacherError`` (``distill.on_teacher_failure=drop``): a
  call that raises, runs past ``distill.teacher_timeout_s`` or answers a wrong count is counted in
  ``rollout/teacher_failures`` (kinds ``error``, ``timeout``) and fails the whole group, which is
  then not sent (``drop``) or sent without teacher log-probs (``task_reward_only``); a dropped
  group is no failure of the server's engine (``down_s``: the server's bound on that);
* a context token (loss mask 0) gets 0, as its behaviour log-prob;
* the teacher reads the student's tokens: its tokenizer is the student's (``tokenizer_problem``,
  run by the launcher's preflight on a model directory).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from areal_like.daemon import StartRefused
from areal_like.engines import engine_client
from areal_like.net.metrics import Metrics
from areal_like.net.ratelog import RateLimitedLog
from areal_like.settings.config import ModelConfig
from areal_like.settings.distill_schema import DistillConfig
from areal_like.tasks.datasets import Example

log = logging.getLogger(__name__)
WARN_EVERY_S = 60.0
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60)


class TeacherError(RuntimeError):
    """A teacher gave no log-probs for a group, and ``distill.on_teacher_failure=drop``.
    ``down_s``: for how long that teacher's calls have failed."""

    def __init__(self, why: str, down_s: float):
        super().__init__(why)
        self.down_s = down_s


def tokenizer_problem(distill: DistillConfig, student: ModelConfig) -> str | None:
    """Why a teacher given as a model directory cannot score the student's tokens (its tokenizer
    differs), naming both; None when it can or the teacher is a URL (its engine says nothing of its
    tokenizer before the job runs)."""
    from areal_like.tasks.tokenizer import load_tokenizer

    for teacher in distill.teachers:
        if DistillConfig.is_url(teacher):
            continue
        try:
            theirs = load_tokenizer(ModelConfig(path=teacher)).get_vocab()
        except Exception as e:  # noqa: BLE001 - one line, whatever the files hold
            return (f"distill.teachers: {teacher!r} has no tokenizer that loads: "
                    f"{type(e).__name__}: {e}").splitlines()[0]
        mine = load_tokenizer(student).get_vocab()
        if theirs != mine:
            differ = len(set(theirs.items()) ^ set(mine.items()))
            key = (f"model.path={student.path!r}" if student.path
                   else f"model.tokenizer={student.tokenizer!r}")
            return (f"distill.teachers: the teacher {teacher!r} has another tokenizer than the "
                    f"student's {key} ({len(theirs)} and {len(mine)} tokens, {differ} entries "
                    "differ): a teacher must score the student's tokens")
    return None


def teachers(cfg: DistillConfig, metrics: Metrics | None = None,
             api_key: str | None = None) -> list[Teacher]:
    """A Teacher per ``distill.teachers`` entry, each an engine URL."""
    return [Teacher(cfg, url, metrics, api_key) for url in cfg.teachers]


def teacher_for(teachers: list[Teacher], example: Example) -> Teacher | None:
    """The teacher that scores ``example`` (by its ``distill.task_key`` column), or None."""
    if not teachers:
        return None
    cfg = teachers[0].cfg
    i = cfg.teacher_of(str(example.metadata.get(cfg.task_key, "")))
    return None if i is None else teachers[i]


class Teacher:
    """One of ``distill.teachers``, an engine URL (module docstring). ``api_key``: the job's
    engine key, which the job's teacher processes require."""

    def __init__(self, cfg: DistillConfig, url: str, metrics: Metrics | None = None,
                 api_key: str | None = None):
        if not cfg.is_url(url):
            raise StartRefused(f"distill.teachers: {url!r} is not an engine URL: a model directory "
                             "is served by the job's teacher process (`areal-like run`)")
        self.cfg, self.metrics = cfg, metrics or Metrics()
        self.warnings = RateLimitedLog(log, WARN_EVERY_S)
        self.client = engine_client(cfg.teacher_engine, url, api_key=api_key)
        self.failing_since: float | None = None  # the first of the failures since a success
        self.failures = self.metrics.counter("rollout/teacher_failures", "groups a teacher gave "
                                             "no log-probs for", ("teacher", "kind"))
        self.url = url
        log.info("teacher at %s (%s engine)", url, cfg.teacher_engine)

    async def group_logprobs(self, prompt_ids: list[int], outputs: list[list[int]],
                             masks: list[list[int]]) -> list[list[float] | None]:
        """The teacher's log-prob of each output token (0 on a context token), per sample; a
        None per sample when it failed and ``on_teacher_failure=task_reward_only``."""
        rows = [(i, out) for i, out in enumerate(outputs) if out]
        if not rows:  # nothing sampled: nothing to ask
            return [[] for _ in outputs]
        t0 = time.monotonic()
        try:
            values = await asyncio.wait_for(self.client.input_logprobs(
                [prompt_ids + out for _, out in rows], [len(prompt_ids)] * len(rows),
                timeout_s=self.cfg.teacher_timeout_s), self.cfg.teacher_timeout_s)
        except asyncio.TimeoutError:
            return self._failed("timeout", f"no answer within distill.teacher_timeout_s="
                                f"{self.cfg.teacher_timeout_s}s", len(outputs))
        except Exception as e:  # noqa: BLE001 - the teacher's failure is the group's
            return self._failed("error", f"{type(e).__name__}: {e}".splitlines()[0], len(outputs))
        finally:
            self.metrics.histogram("rollout/teacher_seconds", "wall time of the teacher on one "
                                   "group", buckets=SECONDS_BUCKETS).observe(time.monotonic() - t0)
        if not all(math.isfinite(lp) for v in values for lp in v):
            return self._failed("error", "a log-prob that is not finite", len(outputs))
        self.failing_since = None
        out: list[list[float] | None] = [[] for _ in outputs]
        for (i, _), v in zip(rows, values):
            out[i] = [lp if m else 0.0 for lp, m in zip(v, masks[i])]
        return out

    def down_s(self) -> float:
        """For how long every call has failed (0 after a success)."""
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since

    def _failed(self, kind: str, why: str, n: int) -> list[None]:
        self.failures.labels(teacher=self.url, kind=kind).inc()
        self.failing_since = self.failing_since or time.monotonic()
        self.warnings.warning(kind, "teacher %s failed on a group (%s): %s; "
                              "on_teacher_failure=%s", self.url, kind, why,
                              self.cfg.on_teacher_failure)
        if self.cfg.on_teacher_failure == "drop":
            raise TeacherError(f"teacher {self.url}: {why}", self.down_s())
        return [None] * n
