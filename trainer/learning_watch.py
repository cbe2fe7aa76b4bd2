"""Whether the trainer is learning anything: a run can end "ok" without one useful step.

A step has no learning signal when every group's responses got equal rewards (each advantage is 0,
``zero_adv_skip_frac`` 1: no row is trained) or its gradient norm is 0. ``LearningWatch`` counts
such steps; ``trainer.learning_watch_steps`` of them in a row log one warning (per run of them),
and the trainer's ``done`` record carries ``verdict()``, which ``areal-like run`` prints in its
final JSON as ``learning`` (launch/records.py). The job's exit code does not change: the job ran
as configured, and a script that reads the exit code as "crashed, retry" would retry in vain.

Steps the policy does not train by design (a critic's warm-up: ``actor_frozen``) and steps skipped
for a non-finite loss (trainer/finite_guard.py) are not counted either way.
"""

from __future__ import annotations

import logging

log = logging.getLogger("trainer.learning")

# where a user reads what to try (areal_like/tasks/OWN_MODEL.md's last section)
ADVICE = 'areal_like/tasks/OWN_MODEL.md, "When the reward does not rise"'


class LearningWatch:
    """Runs of steps without a learning signal; ``steps`` in a row (0: off) mean not learning."""

    def __init__(self, steps: int, report: bool):
        """``report``: rank 0 logs; the other ranks count alike and say nothing."""
        self.steps, self.report = steps, report
        self.watched = self.without = self.run = self.longest = 0
        self.run_start = self.longest_start = 0
        self.equal_rewards = 0  # steps without signal because every group's rewards were equal
        self.last_reward = 0.0

    def observe(self, version: int, stats: dict[str, float], reward_mean: float) -> None:
        """Count the step that made ``version`` from its stats and mean reward."""
        if not self.steps or stats.get("actor_frozen") or stats.get("nonfinite_skipped"):
            return
        self.watched += 1
        equal = stats.get("zero_adv_skip_frac") == 1.0
        if not (equal or stats.get("grad_norm") == 0.0):
            self.run = 0
            return
        self.without += 1
        self.equal_rewards += equal
        self.last_reward = reward_mean
        self.run += 1
        if self.run == 1:
            self.run_start = version
        if self.run > self.longest:
            self.longest, self.longest_start = self.run, self.run_start
        if self.run == self.steps and self.report:
            log.warning("no learning signal for %d steps in a row (versions %d-%d): %s. Nothing "
                        "was trained. What to try: the start model's pass@k (areal-like eval), "
                        "task.temperature, trainer.lr, a shaped reward, an SFT stage (areal-like "
                        "sft); see %s", self.run, self.run_start, version, self.why(), ADVICE)

    def why(self) -> str:
        if self.equal_rewards:
            return (f"every group's responses had equal rewards (zero_adv_skip_frac 1; the last "
                    f"such step's mean reward {self.last_reward:.3f}), so every advantage was 0")
        return "the gradient norm was 0 (grad_norm 0)"

    def verdict(self) -> dict | None:
        """The ``learning`` field of the final JSON; None when the watch is off."""
        if not self.steps:
            return None
        # a run shorter than the watch's window that never had a signal learned nothing either
        silent = self.watched > 0 and self.without == self.watched
        out: dict = {"ok": self.longest < self.steps and not silent, "steps_watched": self.watched,
                     "steps_without_signal": self.without, "longest_run": self.longest}
        if not out["ok"]:
            out["reason"] = (f"no learning signal in {self.without} of {self.watched} steps "
                             f"({self.longest} in a row from version {self.longest_start}): "
                             f"{self.why()}")
            out["what_to_try"] = ADVICE
        return out
