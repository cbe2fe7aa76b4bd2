"""Rate-limited logging: a warning that a peer can trigger at will is logged at most once per period.

``RateLimitedLog(logger, every_s)`` keeps, per key (a kind of event), when it last logged and how
many events went unlogged since; ``.warning(key, msg, *args)`` logs the first event of a period
with ``(N more since the last)`` appended when some were suppressed. So 100,000 bad frames or
requests cost a handful of log lines, and the log still says that (and how often) they happen.
Thread-safe; ``clock`` is injectable for tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.every_s, self.clock = logger, every_s, clock
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, msg: str, *args) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` logged less than ``every_s`` ago; True if logged."""
        now = self.clock()
        with self._lock:
            last, suppressed = self._last.get(key, (None, 0))
            if last is not None and now - last < self.every_s:
                self._last[key] = (last, suppressed + 1)
                return False
            self._last[key] = (now, 0)
        if suppressed:
            msg += f" ({suppressed} more since the last such line; logged at most every {self.every_s:.0f}s)"
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args) -> bool:
        return self.log(logging.WARNING, key, msg, *args)
