"""Tool calls in worker processes, each bounded by a timeout.

``ToolPool.call(spec, arguments)`` runs ``spec.function(**arguments)`` in a process of a
``concurrent.futures.ProcessPoolExecutor`` (``task.tool_workers`` processes, spawned: the rollout
server runs threads and an event loop, which fork would copy half-way) and returns a
``ToolOutcome``: ``ok`` (the result as text), ``error`` (the tool raised, or returned something
that is not JSON-able; the message says what) or ``timeout``. It never raises for what a tool
does. ``run_in_pool`` is the one function that executes a call, so a stronger sandbox can take
its place.

A call past ``task.tool_timeout_s`` cannot be cancelled inside a worker, so the pool is replaced:
its workers are killed and the calls that were running in it alongside are run once more in the
new pool (they did nothing wrong). Workers are limited, not sandboxed: like reward workers they
run as the same user.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from areal_like.tools import ToolSpec, result_text


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    outcome: str  # "ok" | "error" | "timeout"
    content: str  # the result text, or what went wrong
    seconds: float


def _ready() -> None:
    """In a worker: nothing; submitted to start the workers before the first call is timed."""


def _invoke(function: str, arguments: dict) -> str:
    """In a worker: import and call the tool; its result as text."""
    from areal_like.callables import import_function

    return result_text(import_function(function)(**arguments))


async def run_in_pool(pool: ProcessPoolExecutor, spec: ToolSpec, arguments: dict, timeout_s: float) -> str:
    """The tool's result text; raises TimeoutError past ``timeout_s``, BrokenProcessPool when the
    pool died, and what the tool raised otherwise."""
    future = asyncio.wrap_future(pool.submit(_invoke, spec.function, arguments))
    return await asyncio.wait_for(future, timeout_s)


class ToolPool:
    def __init__(self, workers: int, timeout_s: float):
        self.workers, self.timeout_s = workers, timeout_s
        self.ctx = multiprocessing.get_context("spawn")
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        """A pool whose workers are starting (spawning takes a second or more: no call's timeout
        should pay for it)."""
        pool = ProcessPoolExecutor(self.workers, mp_context=self.ctx)
        self.warming = [pool.submit(_ready) for _ in range(self.workers)]
        return pool

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the workers of the current pool have started."""
        for f in self.warming:
            f.result(timeout_s)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """Kill ``broken``'s workers (a call in one of them is past its timeout) and start afresh."""
        if broken is not self.pool:
            return  # another call replaced it already
        self.pool = self._new_pool()
        # ProcessPoolExecutor has no public way to stop a running call (Python 3.14 adds kill_workers)
        for proc in list((broken._processes or {}).values()):
            proc.kill()
        broken.shutdown(wait=False, cancel_futures=True)

    async def call(self, spec: ToolSpec, arguments: dict) -> ToolOutcome:
        await asyncio.gather(*(asyncio.wrap_future(f) for f in self.warming), return_exceptions=True)
        t0 = time.monotonic()
        for attempt in range(2):
            pool = self.pool
            try:
                text = await run_in_pool(pool, spec, arguments, self.timeout_s)
                return ToolOutcome("ok", text, time.monotonic() - t0)
            except (TimeoutError, asyncio.TimeoutError):
                self._replace(pool)
                return ToolOutcome("timeout", f"{spec.name} did not finish within {self.timeout_s:g}s",
                                   time.monotonic() - t0)
            except BrokenProcessPool:
                self._replace(pool)  # killed with a neighbour that timed out, or its worker died
                if attempt == 0:
                    continue
                return ToolOutcome("error", f"{spec.name} crashed its worker process", time.monotonic() - t0)
            except Exception as e:  # the tool raised: the model reads what
                return ToolOutcome("error", f"{spec.name} raised {type(e).__name__}: {e}", time.monotonic() - t0)
        raise AssertionError("unreachable")

    def close(self) -> None:
        for proc in list((self.pool._processes or {}).values()):
            proc.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)
