"""Rate-limited logging: a warning a peer can trigger at will is logged at most once per period
and key, with the count of those suppressed since (100,000 bad frames cost a handful of lines that
still say how often they happen). Thread-safe.
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
        """Log ``msg % args`` at ``level`` unless ``key`` logged less than ``every_s`` ago; True if
        logged."""
        now = self.clock()
        with self._lock:
            last, suppressed = self._last.get(key, (None, 0))
            if last is not None and now - last < self.every_s:
                self._last[key] = (last, suppressed + 1)
                return False
            self._last[key] = (now, 0)
        if suppressed:
            msg += (f" ({suppressed} more since the last such line; logged at most every "
                    f"{self.every_s:.0f}s)")
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args) -> bool:
        return self.log(logging.WARNING, key, msg, *args)
