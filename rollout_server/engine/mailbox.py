"""Calls from the scheduler thread to asyncio event loops, one wake-up per loop per scheduler step
(ENGINE.md, Scheduling). A callback only queues its call (``Mailbox.post``); ``Mailbox.flush()``,
after each step and before the scheduler exits, wakes each loop that has mail once.

Invariant: every posted call runs on its loop unless the loop is closed first (then there is
nobody left to tell).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Mailbox:
    """The calls queued for event loops since the last flush."""

    def __init__(self) -> None:
        self._queued: list[tuple[asyncio.AbstractEventLoop, Callable, tuple]] = []
        self._lock = threading.Lock()

    def post(self, loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
        """Queue ``fn(*args)`` for ``loop`` (any thread); it runs after the next flush."""
        with self._lock:
            self._queued.append((loop, fn, args))

    def flush(self) -> None:
        with self._lock:
            queued, self._queued = self._queued, []
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Callable, tuple]]] = {}
        for loop, fn, args in queued:
            batches.setdefault(loop, []).append((fn, args))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_run, batch)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


def _run(batch: list[tuple[Callable, tuple]]) -> None:
    for fn, args in batch:
        try:
            fn(*args)
        except Exception:  # one broken call must not keep the rest of the batch from their waiters
            log.exception("a call from the engine scheduler failed")
