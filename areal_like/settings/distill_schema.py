"""The ``distill`` section: on-policy distillation from teacher models (trainer/LOSSES.md
section 11; rollout_server/ROLLOUT.md, "Teachers"). Off while ``teachers`` is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from areal_like.settings.config_checks import DEVICE, Bound, Section, at_least, check, one_of

D = "distill."
POLICIES = ("drop", "task_reward_only")


# a URL of another scheme (ftp://...) is a mistake, not a directory of that name
TEACHERS = Bound("a list of engine URLs (http://host:port) or model directories",
                 lambda v: all(t.strip() and ("://" not in t or DistillConfig.is_url(t))
                               for t in v))


@dataclass(kw_only=True)
class DistillConfig(Section):
    key = D.rstrip(".")

    # the teachers: each an engine URL (http://host:port, an SGLang, vLLM or embedded engine
    # serving it, never weight-synced; distill.teacher_engine says which) or a local model
    # directory, which `areal-like run` serves with an engine process of the job; their
    # tokenizer must be the student's (preflight); the student samples at task.temperature=1.0,
    # as the teachers' log-probs are
    teachers: Annotated[list[str], TEACHERS] = field(default_factory=list)
    # [several teachers] the tasks each teacher scores, one list per teacher: the values of a
    # row's task_key column (a dataset's; a synthetic task's rows have none); an empty list
    # scores the rows no other teacher names. [] = the one teacher scores every row
    teacher_tasks: list[list[str]] = field(default_factory=list)
    task_key: str = "task"  # the dataset column naming a row's task
    # the per-token advantage is task_reward_weight * A_task + kl_weight * (log pi_teacher -
    # log pi_behav) on each sampled token (trainer/LOSSES.md section 11)
    kl_weight: Annotated[float, at_least(0.0)] = 1.0
    task_reward_weight: Annotated[float, at_least(0.0)] = 0.0  # 0: pure distillation
    # the KL term's baseline: none, or group (less its mean over the group's tokens with a
    # teacher's log-prob at the same position: less variance; trainer/LOSSES.md section 11)
    kl_baseline: Annotated[str, one_of("none", "group")] = "none"
    # a group whose teacher failed or timed out: drop (not sent; generated again when its lease
    # expires, buffer.lease_timeout_s) or task_reward_only (trained on its task advantage alone)
    on_teacher_failure: Annotated[str, one_of(*POLICIES)] = "drop"
    teacher_timeout_s: Annotated[float, at_least(0.001)] = 60.0  # one group's teacher call
    # the teachers' engine (one kind for all): for a URL it picks the client (vllm: vLLM's
    # protocol; embedded or sglang: SGLang's); a model directory is served by a teacher process
    # of the job on this engine, with the job's rollout.engine.sglang or rollout.engine.vllm flags
    teacher_engine: Annotated[str, one_of("embedded", "sglang", "vllm")] = "embedded"
    # where the job's teacher processes run (cpu: they see no GPU); the embedded engine's device
    # (SGLang and vLLM take theirs from their own flags)
    device: Annotated[str, DEVICE] = "cpu"

    def __post_init__(self):
        super().__post_init__()
        tasks = self.teacher_tasks
        check(D + "teacher_tasks", len(tasks) == len(self.teachers) or (
            not tasks and len(self.teachers) <= 1),
              f"one list of tasks per teacher ({len(self.teachers)} teachers)", tasks)
        named = [t for ts in tasks for t in ts]
        check(D + "teacher_tasks", len(set(named)) == len(named), "a task taught by one teacher "
              "only", tasks)
        check(D + "teacher_tasks", sum(not ts for ts in tasks) <= 1, "at most one empty list "
              "(the teacher of every other task)", tasks)
        check(D + "kl_weight", not self.enabled or self.kl_weight > 0,
              "> 0 with distill.teachers set (else the teachers are asked for nothing)",
              self.kl_weight)

    @property
    def enabled(self) -> bool:
        return bool(self.teachers)

    def teacher_of(self, task: str) -> int | None:
        """The index of the teacher that scores a row of ``task`` ("": a row without one), or
        None: no teacher does (its samples are trained on the task's reward alone)."""
        if not self.teacher_tasks:
            return 0 if self.teachers else None
        named = next((i for i, ts in enumerate(self.teacher_tasks) if task in ts), None)
        return named if named is not None else next(
            (i for i, ts in enumerate(self.teacher_tasks) if not ts), None)

    @staticmethod
    def is_url(teacher: str) -> bool:
        return teacher.startswith(("http://", "https://"))
