"""The embedded engine's ``/generate`` for a caller in its own process
(``SGLangClient(local=engine)``), without the loopback HTTP exchange (ENGINE.md).

Each call runs ``EngineHttp.parse`` and ``EngineHttp.answer`` on the engine's event loop and hands
back (status, JSON body) as Python objects: it waits while paused, a weight update waits for it,
cancelling the caller aborts its requests as a hang-up does, and a bug is answered 500. It leaves
out the API key and the HTTP limits, which guard the port against other processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from rollout_server.engine.api import ApiError, value_error


class LocalGenerate:
    """The in-process ``/generate`` calls to one engine (``http``: its ``EngineHttp``)."""

    def __init__(self, http) -> None:
        self.http = http
        self._running: set[concurrent.futures.Future] = set()
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
            fut.cancel()
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the caller was cancelled (requests aborted)
                raise
            raise ConnectionAbortedError("the embedded engine stopped") from None

    def cancel_all(self) -> None:
        """The engine stops: end every call running (one may wait at the pause gate) and later."""
        self.closed = True
        for fut in list(self._running):
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
