"""One call of user code in a fresh sandbox worker, for the attack campaign and the sandbox tests.

``run_sandboxed(fn_path, args, limits) -> SandboxResult`` calls ``fn(*args)`` for
``"pkg.module:function"`` in a fresh ``rollout_server.sandbox.Worker`` (the worker the reward pool
and the tool pool keep alive), gone when it returns. No production code calls it: the pools drive
their workers through ``WorkerPool``.

Failure kinds (``SandboxResult.kind``): ``timeout`` | ``memory`` | ``died`` | ``error`` (the call
raised, or its result is not JSON) | ``start`` (the function could not be loaded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rollout_server.sandbox import SandboxLimits, StartFailed, Worker, WorkerLost, call_request


@dataclass(frozen=True)
class SandboxResult:
    """``ok``: ``value`` is what the function returned (through JSON); else ``kind`` and
    ``reason``."""

    ok: bool
    value: Any = None
    kind: str | None = None
    reason: str | None = None


def run_sandboxed(fn_path: str, args: tuple | list,
                  limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """``fn(*args)`` in a fresh worker, gone when this returns; blocks the calling thread; never
    raises for what the function does."""
    try:
        request = call_request(args, limits.timeout_s)
    except Exception as e:
        return SandboxResult(False, kind="error",
                             reason=f"cannot send the arguments: {type(e).__name__}: {e}")
    try:
        worker = Worker(fn_path, limits)
    except OSError as e:
        return SandboxResult(False, kind="start",
                             reason=f"cannot start a worker: {type(e).__name__}: {e}")
    try:
        worker.send(request)
        reply = worker.reply(limits.timeout_s)
    except StartFailed as failed:
        return SandboxResult(False, kind="start", reason=str(failed))
    except WorkerLost as lost:
        return SandboxResult(False, kind=lost.kind, reason=lost.reason)
    finally:
        worker.kill()
    if "result" in reply:
        return SandboxResult(True, value=reply["result"])
    return SandboxResult(False, kind=reply["kind"], reason=reply["reason"])
