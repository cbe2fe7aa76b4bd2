"""Tool calls in sandboxed worker processes, each bounded by a timeout.

``ToolPool.call(spec, arguments)`` runs ``spec.function(**arguments)`` in one of ``workers``
sandbox workers (``rollout_server/sandbox.py``) and returns a ``ToolOutcome``: ``ok`` (the result
as text), ``error`` (what went wrong) or ``timeout``. It never raises for what a tool does.

Each worker belongs to one thread of the pool's own executor, so calls beyond ``workers`` queue
there. A call past ``timeout_s`` gets its worker killed with its process group and a fresh one
started in its place, whose startup does not count against the next call's timeout.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from areal_like.tasks.tools import ToolSpec, result_text
from rollout_server import sandbox
from rollout_server.sandbox import SandboxLimits, StartFailed, Worker, WorkerLost, call_request

INVOKE = "rollout_server.tool_pool:invoke"  # what every worker loads: it imports and calls the tool


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    outcome: str  # "ok" | "error" | "timeout"
    content: str  # the result text, or what went wrong
    seconds: float


def invoke(function: str, arguments: dict) -> str:
    """In a worker: import the tool at ``function`` and call it with ``arguments``; its result as text."""
    from areal_like.tasks.callables import import_function

    return result_text(import_function(function)(**arguments))


class ToolPool:
    def __init__(self, workers: int, timeout_s: float, memory_mb: int = 2048, processes: int = 0,
                 memory_setting: str = "task.tool_memory_mb"):
        self.timeout_s = timeout_s  # processes: threads a call may start (sandbox.SandboxLimits)
        self.memory_setting = memory_setting  # what an out-of-memory error tells the user to raise
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, processes=processes)
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="tool")
        self._local = threading.local()  # each executor thread's Worker
        self._all: set[Worker] = set()  # every live worker (close kills them)
        self._lock = threading.Lock()
        self._closed = False
        started = threading.Barrier(workers)  # one warm-up per thread: each thread starts its own worker
        self.warming: list[Future] = [self.executor.submit(self._warm, started) for _ in range(workers)]

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every worker has started (imported its tool module's loader)."""
        for f in self.warming:
            f.result(timeout_s)

    async def call(self, spec: ToolSpec, arguments: dict) -> ToolOutcome:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._call, spec, arguments)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.kill()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _warm(self, started: threading.Barrier) -> None:
        try:
            started.wait(sandbox.STARTUP_TIMEOUT_S)
        except threading.BrokenBarrierError:
            pass  # a slow thread: the worker still starts; wait_ready waits for each
        try:
            self._worker().wait_ready()
        except StartFailed:
            self._drop()  # the first call starts another and reports why if it fails again

    def _worker(self) -> Worker:
        worker = getattr(self._local, "worker", None)
        if worker is None:
            worker = Worker(INVOKE, self.limits)
            with self._lock:
                if self._closed:
                    worker.kill()
                    raise StartFailed("the tool pool is closed")
                self._all.add(worker)
            self._local.worker = worker
        return worker

    def _drop(self) -> None:
        """Kill this thread's worker; the next call here starts a fresh one."""
        worker = getattr(self._local, "worker", None)
        self._local.worker = None
        if worker is not None:
            with self._lock:
                self._all.discard(worker)
            worker.kill()

    def _call(self, spec: ToolSpec, arguments: dict) -> ToolOutcome:
        """In an executor thread: one call on this thread's worker."""
        try:
            request = call_request((spec.function, arguments), self.timeout_s)
            worker = self._worker()
            worker.wait_ready()
        except StartFailed as e:
            self._drop()
            return ToolOutcome("error", f"{spec.name}: its worker could not start: {e.reason}", 0.0)
        except Exception as e:  # arguments that do not pickle, a worker that cannot be spawned
            return ToolOutcome("error", f"{spec.name} could not be called: {type(e).__name__}: {e}", 0.0)
        t0 = time.monotonic()
        try:
            reply = worker.call(request, self.timeout_s)
        except WorkerLost as lost:
            self._drop()
            if lost.kind == "timeout":
                return ToolOutcome("timeout", f"{spec.name} did not finish within {self.timeout_s:g}s",
                                   time.monotonic() - t0)
            return ToolOutcome("error", f"{spec.name} crashed its worker process ({lost.reason})",
                               time.monotonic() - t0)
        seconds = time.monotonic() - t0
        if "result" in reply:
            return ToolOutcome("ok", reply["result"], seconds)
        if reply["kind"] == "memory":
            return ToolOutcome("error", f"{spec.name} ran out of memory ({reply['reason']}; the limit is "
                                        f"{self.memory_setting}={self.limits.memory_mb})", seconds)
        return ToolOutcome("error", f"{spec.name} raised {reply['reason']}", seconds)
