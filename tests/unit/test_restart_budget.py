"""The supervisor's restart budget: at most ``launch.restarts`` in a sliding window, each waiting
twice as long as the one before it in the window (launch/local.py, ``RestartBudget``)."""

from __future__ import annotations

import pytest

from areal_like.settings.config import LaunchConfig
from areal_like.settings.schema import ConfigError
from launch.local import RestartBudget


def test_crashes_in_a_burst_use_up_the_budget_with_doubling_backoff():
    b = RestartBudget(3, window_s=100.0, base_s=1.0, max_s=5.0)
    waits = []
    for t in (0.0, 1.0, 3.0):
        waits.append(b.backoff(t))
        assert b.allow(t)
    assert waits == [1.0, 2.0, 4.0]
    assert b.backoff(7.0) == 5.0  # capped
    assert not b.allow(7.0)  # a 4th crash within 100 s ends the job
    assert not RestartBudget(0).allow(0.0)  # zero restarts allows none


def test_crashes_spread_over_time_never_run_out():
    b = RestartBudget(3, window_s=100.0, base_s=1.0, max_s=60.0)
    for t in (0.0, 10.0, 20.0):  # a chaos run: three restarts
        assert b.allow(t)
    assert not b.allow(50.0)
    # hours later, one crash: the chaos run's restarts are out of the window,
    # the wait is back to base
    assert b.recent(5000.0) == 0 and b.backoff(5000.0) == 1.0 and b.allow(5000.0)
    assert b.allow(5001.0) and b.allow(5002.0) and not b.allow(5003.0)
    assert b.allow(5100.5)  # the crash at 5000 left the window; those at 5001 and 5002 still count


@pytest.mark.parametrize("kw,key", [({"restart_window_s": 0}, "launch.restart_window_s"),
                                    ({"restart_backoff_s": -1}, "launch.restart_backoff_s"),
                                    ({"restart_backoff_s": 10, "restart_backoff_max_s": 5},
                                     "launch.restart_backoff_max_s")])
def test_config_keys_are_validated(kw, key):
    with pytest.raises(ConfigError, match=key):
        LaunchConfig(**kw)
