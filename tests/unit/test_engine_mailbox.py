"""The scheduler's calls to event loops: one wake-up per loop per flush, every call run in order."""

from __future__ import annotations

import asyncio
import threading

from rollout_server.engine.mailbox import Mailboxes


def test_calls_posted_from_another_thread_wake_their_loop_once_and_run_in_order():
    loop = asyncio.new_event_loop()
    wakeups = []
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda fn, *a: (wakeups.append(fn.__qualname__), real(fn, *a))[1]
    boxes, got, done = Mailboxes(), [], asyncio.Event()
    box = boxes.for_loop(loop)
    assert boxes.for_loop(loop) is box

    def scheduler():
        for i in range(64):  # a step's 64 samples finishing together
            box.post(got.append, i)
        box.post(done.set)
        boxes.flush()
        boxes.flush()  # nothing new: no second wake-up

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


def test_a_failing_call_does_not_keep_the_others_from_running_and_a_closed_loop_is_dropped(caplog):
    loop = asyncio.new_event_loop()
    boxes, got = Mailboxes(), []
    box = boxes.for_loop(loop)
    box.post(lambda: 1 / 0)
    box.post(got.append, "after")
    boxes.flush()
    loop.run_until_complete(asyncio.sleep(0))
    assert got == ["after"]
    assert "ZeroDivisionError" in caplog.text
    box.post(got.append, "too late")
    loop.close()
    boxes.flush()  # no error: nobody is left to tell
    other = asyncio.new_event_loop()
    # the closed loop's box is gone
    assert boxes.for_loop(other) is not box and box not in boxes._boxes.values()
    other.close()
    assert got == ["after"]
