"""Calls from the scheduler thread to asyncio event loops, one wake-up per loop per scheduler step
(ENGINE.md, Scheduling). A callback only queues its call (``Mailbox.post``); ``Mailboxes.flush()``,
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
    """The queued calls for one loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queued: list[tuple[Callable, tuple]] = []
        self._lock = threading.Lock()

    def post(self, fn: Callable, *args) -> None:
        """Queue ``fn(*args)`` for the loop (any thread); it runs after the scheduler's next
        flush."""
        with self._lock:
            self._queued.append((fn, args))

    def flush(self) -> None:
        with self._lock:
            batch, self._queued = self._queued, []
        if batch and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(_run, batch)
            except RuntimeError:  # closed since the check: nobody is waiting any more
                pass


def _run(batch: list[tuple[Callable, tuple]]) -> None:
    for fn, args in batch:
        try:
            fn(*args)
        except Exception:  # one broken call must not keep the rest of the batch from their waiters
            log.exception("a call from the engine scheduler failed")


class Mailboxes:
    """The scheduler's mailboxes, one per event loop that asked for one."""

    def __init__(self) -> None:
        self._boxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}
        self._lock = threading.Lock()

    def for_loop(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        with self._lock:
            # a loop that ended has no mail to get
            for old in [k for k in self._boxes if k.is_closed()]:
                del self._boxes[old]
            return self._boxes.setdefault(loop, Mailbox(loop))

    def flush(self) -> None:
        with self._lock:
            boxes = list(self._boxes.values())
        for box in boxes:
            box.flush()
