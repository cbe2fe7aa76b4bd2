"""Bounded waits on the weight-update group (trainer rank 0): nothing on it outlives the sync deadline.

Owns: ``wait_work`` (the wait for one broadcast) and ``Watchdog`` (aborts the group from a timer
thread when a call on it has not returned by the deadline).

Why both: gloo and NCCL have no natural timeout shorter than the group's. A gloo op is waited on
in slices of ``BROADCAST_SLICE_S`` (``work.wait(timeout)``; a timed-out wait leaves the op pending,
checked on torch 2.13), an NCCL op is polled with ``is_completed()`` (a timed-out NCCL wait can make
the NCCL watchdog act on the communicator); between slices the caller's ``check`` asks the buffer
whether a member already reported failure (it then never posts its receive, so waiting on is
pointless). An NCCL launch can itself block: the communicator is created by the first op and
waits for every peer. ``Watchdog`` bounds that: armed around a launch, it aborts the group at the
deadline from its own thread (what NCCL's own watchdog does on a timeout), which makes the blocked
call return with an error; the caller then tears the group down.

Invariants: ``wait_work`` returns only when the op completed, and raises ``TimeoutError`` once the
deadline passed, or what ``check`` or the op raised; ``Watchdog.armed`` raises ``TimeoutError`` on
exit when it fired, even if the guarded call returned normally.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

log = logging.getLogger("trainer.weight_sync")

BUFFER_REQUEST_TIMEOUT_S = 10.0  # the buffer answers control requests in milliseconds when alive
BROADCAST_SLICE_S = 1.0  # a stalled broadcast checks every slice whether a member already reported failure
NCCL_POLL_S = 0.0005  # NCCL completion poll; small next to any bucket's transfer time


def wait_work(work, deadline: float, backend: str, check: Callable[[], None]) -> None:
    """Wait for ``work`` (an async broadcast) until ``deadline`` (``time.monotonic()``)."""
    if backend == "nccl":
        _poll_until_done(work, deadline, check)
    else:
        _wait_in_slices(work, deadline, check)


def _wait_in_slices(work, deadline: float, check: Callable[[], None]) -> None:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("weight-sync deadline passed during the broadcast")
        try:
            work.wait(timedelta(seconds=min(BROADCAST_SLICE_S, remaining)))
            return
        except RuntimeError as e:
            if "timed out" not in str(e).lower():
                raise  # a peer died: gloo reports the closed connection at once
        check()


def _poll_until_done(work, deadline: float, check: Callable[[], None]) -> None:
    next_check = time.monotonic() + BROADCAST_SLICE_S
    while not work.is_completed():
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError("weight-sync deadline passed during the broadcast")
        if now > next_check:
            check()
            next_check = now + BROADCAST_SLICE_S
        time.sleep(NCCL_POLL_S)
    work.wait()


class Watchdog:
    """Calls ``abort()`` from a timer thread if a guarded block outlives its deadline."""

    def __init__(self, abort: Callable[[], None]):
        self._abort = abort

    @contextmanager
    def armed(self, deadline: float) -> Iterator[None]:
        fired = threading.Event()

        def fire() -> None:
            fired.set()
            log.warning("weight sync: a call on the group outlived the deadline; aborting the group")
            try:
                self._abort()
            except Exception as e:  # already aborted or destroyed: the blocked call fails either way
                log.debug("watchdog abort failed: %s", e)

        timer = threading.Timer(max(0.0, deadline - time.monotonic()), fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
        if fired.is_set():
            raise TimeoutError("weight-sync deadline passed inside a call on the group (aborted by the watchdog)")


def bounded(deadline: float | None) -> float:
    """A buffer request's timeout: the usual one, but never past the sync deadline (at least 0.5 s)."""
    if deadline is None:
        return BUFFER_REQUEST_TIMEOUT_S
    return max(0.5, min(BUFFER_REQUEST_TIMEOUT_S, deadline - time.monotonic()))
