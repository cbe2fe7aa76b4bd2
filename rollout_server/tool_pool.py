"""Tool calls in sandboxed worker processes, each bounded by a timeout.

``ToolPool.call(spec, arguments)`` runs ``spec.function(**arguments)`` in one of ``workers``
sandbox workers (``rollout_server/sandbox.py``) and returns a ``ToolOutcome``: ``ok`` (the result
as text), ``error`` (what went wrong) or ``timeout``. It never raises for what a tool does.

The workers are a ``sandbox.WorkerPool``: calls beyond ``workers`` queue on its threads. A call
past ``timeout_s`` gets its worker killed with its process group and a fresh one started in its
place, whose startup does not count against the next call's timeout.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass

from areal_like.tasks.tools import ToolSpec, result_text
from rollout_server.sandbox import (
    Forwarder,
    SandboxLimits,
    StartFailed,
    WorkerLost,
    WorkerPool,
    call_request,
    isolating,
)

INVOKE = "rollout_server.tool_pool:invoke"  # what every worker loads: it imports and calls the tool


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    outcome: str  # "ok" | "error" | "timeout"
    content: str  # the result text, or what went wrong
    seconds: float


def invoke(function: str, arguments: dict) -> str:
    """In a worker: import the tool at ``function`` and call it with ``arguments``; its result as
    text."""
    import inspect

    from areal_like.tasks.callables import import_function

    value = import_function(function)(**arguments)
    if inspect.iscoroutine(value):  # never awaited: its text would read "<coroutine object ...>"
        value.close()
        raise TypeError(f"{function} is an async def: a tool is a plain def")
    return result_text(value)


class ToolPool:
    def __init__(self, workers: int, timeout_s: float, memory_mb: int = 2048, processes: int = 0,
                 memory_setting: str = "task.tool_memory_mb", reply_mb: int = 16,
                 network: bool = False, endpoint: bool = False):
        """``network``: root's workers keep the host's network; ``endpoint`` (without it): they
        reach one endpoint only, named by ``forward_to`` (``relay``: agent_worker.py)."""
        self.timeout_s = timeout_s  # processes: threads a call may start (sandbox.SandboxLimits)
        self.memory_setting = memory_setting  # what an out-of-memory error tells the user to raise
        self.forwarder = Forwarder() if endpoint and not network and isolating() else None
        self.relay = self.forwarder.path if self.forwarder else ""  # "": the host's network
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, processes=processes,
                                    reply_bytes=reply_mb * 2**20, network=network,
                                    endpoint=self.relay)
        self.workers = WorkerPool(INVOKE, self.limits, workers, "tool")
        self.warming: list[Future] = [self.workers.threads.submit(self.workers.warm)
                                      for _ in range(workers)]

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every worker has started (imported its tool module's loader)."""
        for f in self.warming:
            f.result(timeout_s)

    async def call(self, spec: ToolSpec, arguments: dict) -> ToolOutcome:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.workers.threads, self._call, spec, arguments)

    def forward_to(self, host: str, port: int) -> None:
        """The endpoint the workers reach (``endpoint``)."""
        if self.forwarder is not None:
            self.forwarder.forward_to(host, port)

    def close(self) -> None:
        self.workers.close()
        if self.forwarder is not None:
            self.forwarder.close()

    def _call(self, spec: ToolSpec, arguments: dict) -> ToolOutcome:
        """In a pool thread: one call on one worker."""
        seconds: list[float] = []
        try:
            replies = self.workers.call_all([call_request((spec.function, arguments),
                                                          self.timeout_s)],
                                            self.timeout_s, seconds.append)
        except StartFailed as e:
            return ToolOutcome("error", f"{spec.name}: its worker could not start: {e}", 0.0)
        except Exception as e:  # arguments that do not pickle, a worker that cannot be spawned
            return ToolOutcome("error",
                               f"{spec.name} could not be called: {type(e).__name__}: {e}", 0.0)
        if not replies:
            return ToolOutcome("error", f"{spec.name}: its worker could not start: "
                                        "the pool was stopped", 0.0)
        reply, took = replies[0], seconds[-1]
        if isinstance(reply, WorkerLost) and reply.kind == "timeout":
            return ToolOutcome("timeout",
                               f"{spec.name} did not finish within {self.timeout_s:g}s", took)
        if isinstance(reply, WorkerLost) and reply.kind == "oversize":
            return ToolOutcome("error", f"{spec.name}: {reply.reason}", took)
        if isinstance(reply, WorkerLost):
            return ToolOutcome("error",
                               f"{spec.name} crashed its worker process ({reply.reason})", took)
        if "result" in reply:
            return ToolOutcome("ok", reply["result"], took)
        if reply["kind"] == "memory":
            return ToolOutcome("error",
                               f"{spec.name} ran out of memory ({reply['reason']}; the limit is "
                               f"{self.memory_setting}={self.limits.memory_mb})", took)
        return ToolOutcome("error", f"{spec.name} raised {reply['reason']}", took)
