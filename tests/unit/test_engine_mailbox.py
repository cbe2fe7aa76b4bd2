"""The scheduler's calls to event loops: one wake-up per loop per flush, every call run in order."""

from __future__ import annotations

import asyncio
import threading

from rollout_server.engine.mailbox import Mailbox


def test_calls_posted_from_another_thread_wake_their_loop_once_and_run_in_order():
    loop = asyncio.new_event_loop()
    wakeups = []
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda fn, *a: (wakeups.append(fn.__qualname__), real(fn, *a))[1]
    box, got, done = Mailbox(), [], asyncio.Event()

    def scheduler():
        for i in range(64):  # a step's 64 samples finishing together
            box.post(loop, got.append, i)
        box.post(loop, done.set)
        box.flush()
        box.flush()  # nothing new: no second wake-up

    async def wait():
        t = threading.Thread(target=scheduler)
        t.start()
        await asyncio.wait_for(done.wait(), 30)
        await asyncio.to_thread(t.join, 30)  # the second, empty flush has run
        await asyncio.sleep(0)  # and anything it scheduled would have run by now

    loop.run_until_complete(wait())
    assert got == list(range(64))
    assert wakeups.count("_run") == 1  # one batch (to_thread's own wake-up is the other)
    loop.close()


def test_a_failing_call_does_not_keep_the_others_from_running_and_a_closed_loop_is_skipped(caplog):
    loop, other = asyncio.new_event_loop(), asyncio.new_event_loop()
    box, got = Mailbox(), []
    box.post(loop, lambda: 1 / 0)
    box.post(loop, got.append, "after")
    box.flush()
    loop.run_until_complete(asyncio.sleep(0))
    assert got == ["after"]
    assert "ZeroDivisionError" in caplog.text
    box.post(loop, got.append, "too late")
    box.post(other, got.append, "other loop")
    loop.close()
    box.flush()  # no error for the closed loop (nobody is left to tell); the other gets its call
    other.run_until_complete(asyncio.sleep(0))
    other.close()
    assert got == ["after", "other loop"]
