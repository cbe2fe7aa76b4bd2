"""``wait_event``: a loop waiting on an event ends when cancelled (before Python 3.12
``asyncio.wait_for`` lost a cancellation arriving just after the event was set)."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from rollout_server.buffer_link import wait_event


async def _wait_for(event: asyncio.Event, timeout_s: float) -> None:  # what the loops used
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)


async def _ends_on_cancel(wait, patience_s: float = 5.0) -> bool:
    """Cancel a loop just after its event was set; whether it ended within ``patience_s``."""
    event = asyncio.Event()

    async def loop():
        while True:
            await wait(event, 10.0)
            event.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    event.set()
    await asyncio.sleep(0)  # event.wait() finishes first
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=patience_s)
    if not done:  # let it go: a second cancellation ends it
        task.cancel()
        await asyncio.wait({task}, timeout=5.0)
    return bool(done)


def test_a_cancellation_as_the_event_is_set_ends_the_loop():
    assert all(asyncio.run(_ends_on_cancel(wait_event)) for _ in range(10))


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps it since Python 3.12")
def test_wait_for_loses_it_before_python_3_12():
    """The flaw wait_event avoids; a short patience cannot make this pass."""
    assert not any(asyncio.run(_ends_on_cancel(_wait_for, 0.5)) for _ in range(3))


def test_wait_event_says_whether_the_event_was_set():
    async def both():
        event = asyncio.Event()
        timed_out = await wait_event(event, 0.01)
        event.set()
        return timed_out, await wait_event(event, 5.0)

    assert asyncio.run(both()) == (False, True)
