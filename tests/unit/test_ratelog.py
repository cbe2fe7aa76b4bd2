"""RateLimitedLog: one line per key and period, with the count of what was suppressed."""

from __future__ import annotations

import logging

from areal_like.net.ratelog import RateLimitedLog


def test_one_line_per_key_and_period_with_the_suppressed_count(caplog):
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("ratelog-test"), every_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="ratelog-test"):
        logged = [rl.warning("decode", "bad frame %d", i) for i in range(100_000)]
        assert rl.warning("other", "another kind")  # keys are paced separately
        now[0] = 60.0
        assert rl.warning("decode", "bad frame %d", 100_000)
    assert sum(logged) == 1 and logged[0]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad frame 0", "another kind",
                     "bad frame 100000 (99999 more since the last such line; "
                     "logged at most every 60s)"]
