"""trainer/finite_guard.py: skipped steps counted, exported, logged once a minute, bounded."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from areal_like.net.metrics import Metrics, parse_exposition
from areal_like.settings.config import ConfigError, load_config
from trainer.finite_guard import NonFiniteStepError, SkipTracker, all_finite, first_nonfinite


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_skips_are_counted_exported_rate_limited_and_bounded(caplog):
    metrics, clock = Metrics(), Clock()
    tracker = SkipTracker(3, metrics)
    tracker.lines.clock = clock
    bad = {"nonfinite_skipped": 1.0, "loss": math.nan, "grad_norm": math.nan}
    good = {"nonfinite_skipped": 0.0}
    with caplog.at_level(logging.WARNING, logger="trainer.finite_guard"):
        tracker.observe(1, bad)
        tracker.observe(2, bad)  # within the minute: counted, not logged
        tracker.observe(3, good)  # a finite step resets the run, not the total
        clock.t = 61.0
        tracker.observe(4, bad)
        tracker.observe(5, bad)
        with pytest.raises(NonFiniteStepError, match=r"3 trainer steps in a row .*skips=3"):
            tracker.observe(6, bad)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "version 1" in lines[0] and "version 4" in lines[1], lines
    assert "1 more since the last such line" in lines[1]
    page = parse_exposition(metrics.render().decode())
    assert page["areal_trainer_nonfinite_steps_total"] == 5
    assert page["areal_trainer_nonfinite_consecutive"] == 3
    assert (tracker.total, tracker.consecutive) == (5, 3)


def test_other_ranks_count_and_stop_alike_without_logging(caplog):
    tracker = SkipTracker(2, None)
    with caplog.at_level(logging.WARNING, logger="trainer.finite_guard"):
        tracker.observe(1, {"nonfinite_skipped": 1.0})
        with pytest.raises(NonFiniteStepError):
            tracker.observe(2, {"nonfinite_skipped": 1.0})
    assert not caplog.records


def test_one_process_checks_and_the_setting_is_validated():
    assert all_finite(1.0, 0.0, -3e38)
    assert not all_finite(1.0, math.nan) and not all_finite(-math.inf)
    model = torch.nn.Linear(2, 2)
    assert first_nonfinite(model) is None
    with torch.no_grad():
        model.bias[1] = math.inf
    assert first_nonfinite(model) == "bias"
    assert load_config([]).trainer.max_nonfinite_skips == 10
    with pytest.raises(ConfigError, match="trainer.max_nonfinite_skips"):
        load_config(["trainer.max_nonfinite_skips=0"])
