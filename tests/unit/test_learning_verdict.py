"""``LearningWatch`` (trainer/learning_watch.py): which steps carry no learning signal, when the
trainer warns, and the ``learning`` field it hands the final JSON. The whole job's view:
tests/integration/test_learning_watch.py."""

from __future__ import annotations

import logging

from trainer.learning_watch import LearningWatch

SIGNAL = {"zero_adv_skip_frac": 0.25, "grad_norm": 0.7}
EQUAL = {"zero_adv_skip_frac": 1.0, "grad_norm": 0.0}
NO_GRAD = {"zero_adv_skip_frac": 0.5, "grad_norm": 0.0}


def _watch(steps: int, stats: list[dict]) -> LearningWatch:
    watch = LearningWatch(steps, report=True)
    for version, s in enumerate(stats, start=1):
        watch.observe(version, s, reward_mean=0.0)
    return watch


def test_equal_rewards_in_a_row_are_not_learning_and_warn_once(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.learning"):
        watch = _watch(3, [SIGNAL, EQUAL, EQUAL, EQUAL, EQUAL, SIGNAL])
    verdict = watch.verdict()
    assert verdict["ok"] is False and verdict["steps_watched"] == 6
    assert verdict["steps_without_signal"] == verdict["longest_run"] == 4
    assert "4 in a row from version 2" in verdict["reason"] and "equal rewards" in verdict["reason"]
    assert "When the reward does not rise" in verdict["what_to_try"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "for 3 steps in a row (versions 2-4)" in warnings[0], warnings


def test_runs_shorter_than_the_bound_are_learning():
    verdict = _watch(3, [EQUAL, EQUAL, SIGNAL, NO_GRAD, NO_GRAD, SIGNAL]).verdict()
    assert verdict == {"ok": True, "steps_watched": 6, "steps_without_signal": 4,
                       "longest_run": 2}


def test_a_zero_gradient_alone_is_named_as_such():
    verdict = _watch(2, [NO_GRAD, NO_GRAD]).verdict()
    assert verdict["ok"] is False and "gradient norm was 0" in verdict["reason"], verdict


def test_frozen_and_skipped_steps_count_neither_way_and_zero_is_off():
    frozen, skipped = {**EQUAL, "actor_frozen": 1.0}, {**EQUAL, "nonfinite_skipped": 1.0}
    verdict = _watch(2, [EQUAL, frozen, skipped, SIGNAL]).verdict()
    assert verdict == {"ok": True, "steps_watched": 2, "steps_without_signal": 1,
                       "longest_run": 1}
    assert _watch(0, [EQUAL] * 5).verdict() is None


def test_a_run_shorter_than_the_bound_without_any_signal_learned_nothing():
    verdict = _watch(10, [EQUAL] * 5).verdict()
    assert verdict["ok"] is False and verdict["steps_without_signal"] == 5, verdict
    assert "5 of 5 steps" in verdict["reason"]
