"""The embedded engine's ``/generate`` for a caller in its own process: the rollout server that
embeds it (``SGLangClient(local=engine)``), without the loopback HTTP exchange.

Each call runs the endpoint's own code on the engine's event loop
(``asyncio.run_coroutine_threadsafe``): ``EngineHttp.parse`` and ``EngineHttp.answer`` (pause/update
gate, scheduling, answer), and hands back what it would have answered over HTTP as (status, JSON
body), the body going in and the answer coming out as Python objects, with no JSON either way. What
HTTP gave and this keeps: a call waits while the engine is paused, a weight update waits for it,
cancelling the caller aborts its requests as a client hanging up does, and a bug is logged and
answered 500. What it leaves out: the API key and the HTTP limits
(``areal_like/net/http_guard.py``), which guard the port against other processes. Why: on a small
model the exchange (aiohttp on both ends, JSON both ways, and the GIL they take from the scheduler
thread) cost more than the engine's own work (benchmarks/README.md, "Session 17 (2026-11-23): the
engine answers its own rollout server in-process"). The control and weight endpoints stay HTTP: five
calls per weight version, and taking them in-process measured within the noise (same section).
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from rollout_server.engine.api import ApiError, value_error


class LocalGenerate:
    """The in-process ``/generate`` calls to one engine (``http``: its ``EngineHttp``) still running."""

    def __init__(self, http) -> None:
        self.http = http
        self._running: set[concurrent.futures.Future] = set()
        self._ended: set[concurrent.futures.Future] = set()  # cancelled by cancel_all, not by their callers
        self.closed = False

    async def call(self, loop: asyncio.AbstractEventLoop, body) -> tuple[int, object]:
        """``POST /generate`` answered on the engine's ``loop``; ConnectionAbortedError when
        ``cancel_all`` ended it (the engine stopped) rather than the caller's own cancellation."""
        if self.closed:
            raise ConnectionAbortedError("the embedded engine stopped")
        try:
            fut = asyncio.run_coroutine_threadsafe(self._answer(body), loop)
        except RuntimeError:  # the loop closed since the caller looked
            raise ConnectionRefusedError("the embedded engine stopped") from None
        self._running.add(fut)
        fut.add_done_callback(self._running.discard)
        if self.closed:  # cancel_all ran in between: it did not see this one
            self._end(fut)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if fut not in self._ended:  # the caller was cancelled (its requests are aborted)
                raise
            raise ConnectionAbortedError("the embedded engine stopped") from None
        finally:
            self._ended.discard(fut)

    def cancel_all(self) -> None:
        """End every call still running (one may be waiting at the pause gate), and every later one: the
        engine stops."""
        self.closed = True
        for fut in list(self._running):
            self._end(fut)

    def _end(self, fut: concurrent.futures.Future) -> None:
        self._ended.add(fut)
        fut.cancel()

    async def _answer(self, body) -> tuple[int, object]:
        http = self.http
        try:
            inp = http.parse(body)
            if inp.stream:
                raise value_error("stream is not supported in-process")
            return await http.answer(inp)
        except ApiError as e:
            return e.status, e.body
        except Exception as e:  # as the error middleware answers a bug over HTTP: logged, 500
            http.e.log.exception("in-process POST /generate failed")
            return 500, {"error": {"message": f"{type(e).__name__}: {e}"}}
