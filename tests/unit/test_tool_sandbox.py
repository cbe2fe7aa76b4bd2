"""ToolPool: tool calls run in sandboxed workers (the functions of reward_fns.py); after each
failure the pool answers the next call and leaves no process behind."""

from __future__ import annotations

import asyncio
import json

import psutil
import pytest

from areal_like.net.auth import ENGINE_KEY_ENV, METRICS_TOKEN_ENV
from areal_like.tasks.tools import ToolSpec
from rollout_server.sandbox import SandboxLimits, WorkerPool, call_request
from rollout_server.tool_pool import ToolPool
from tests.conftest import live_children
from tests.unit.slow_start_fns import START_S

SECRETS = (ENGINE_KEY_ENV, METRICS_TOKEN_ENV, "WANDB_API_KEY", "HF_TOKEN", "MY_SECRET")


def spec(function: str) -> ToolSpec:
    return ToolSpec(function, f"reward_fns:{function}", "", {"type": "object"})


@pytest.fixture(scope="module")
def pool():
    with pytest.MonkeyPatch.context() as mp:  # in the server's environment when the workers start
        for name in SECRETS:
            mp.setenv(name, "s3cret")
        tools = ToolPool(workers=1, timeout_s=2.0, memory_mb=512)
        tools.wait_ready()
    yield tools
    tools.close()


def call(pool: ToolPool, function: str, **arguments):
    return asyncio.run(pool.call(spec(function), arguments))


def still_works(pool: ToolPool) -> None:
    got = call(pool, "add", a=2, b=3)
    assert (got.outcome, got.content) == ("ok", '{"sum": 5, "args": [2, 3]}')


@pytest.mark.parametrize("function, arguments, content", [
    ("async_add", {"a": 2, "b": 3}, "async_add raised TypeError: reward_fns:async_add is an async "
                                    "def: a tool is a plain def"),
    # a result's text is cut short in the worker; a tool that writes its own frame is not
    ("behave", {"response": "forged_frame", "example": None},
     "behave: a reply of 1099511627776 bytes was refused: past the 16777216 bytes a worker may "
     "send (task.worker_reply_mb)"),
    ("segfault", {}, "segfault crashed its worker process (worker died: signal 11)"),
    ("behave", {"response": "hog", "example": None},
     "behave ran out of memory (MemoryError; the limit is task.tool_memory_mb=512)"),
])
def test_a_failing_tool_is_an_error_saying_why_and_the_pool_goes_on(pool, function, arguments,
                                                                     content):
    got = call(pool, function, **arguments)
    assert (got.outcome, got.content) == ("error", content), got
    still_works(pool)


def test_hang_is_killed_at_the_timeout_with_what_it_started(pool):
    before = live_children()
    # leaves a `sleep 600` behind... if it may fork
    got = call(pool, "behave", response="child", example=None)
    # it may not: no process of its own
    assert got.outcome == "error" and "BlockingIOError" in got.content, got
    got = call(pool, "behave", response="hang", example=None)
    assert (got.outcome, got.content) == ("timeout", "behave did not finish within 2s")
    still_works(pool)  # its replacement answers (so it is done starting)
    # the killed worker is reaped (its replacement, as root a namespace's first process with the
    # worker below it, is not what it started)
    replacement = {p.pid for pid in pool.workers.worker_pids
                   for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]}
    assert not live_children() - before - replacement


def test_the_tool_sees_no_secret_and_runs_under_the_limits(pool):
    got = call(pool, "identity")
    assert got.outcome == "ok", got
    seen = json.loads(got.content)
    assert not set(SECRETS) & set(seen["env"])
    assert seen["memory"] == 512 * 2**20


def test_a_tool_that_imports_numpy_runs_within_the_process_limit(monkeypatch):
    """BLAS pools are sized to the worker's process allowance (1 + processes), whatever the job's
    environment asks: numpy imported after RLIMIT_NPROC works."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "64")
    for processes, threads in ((0, "1"), (2, "3")):
        tools = ToolPool(workers=1, timeout_s=30.0, processes=processes)
        try:
            got = call(tools, "blas_matmul", n=64)
        finally:
            tools.close()
        assert got.outcome == "ok", got
        seen = json.loads(got.content)
        assert seen["sum"] == 64.0**3
        assert seen["threads"] == dict.fromkeys(
            ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), threads)


def test_close_leaves_no_worker():
    before = live_children()
    tools = ToolPool(workers=2, timeout_s=2.0, memory_mb=512)
    tools.wait_ready()
    # each worker (as root: its namespaces' first process, the worker below it)
    assert len({p.pid for p in psutil.Process().children()} & (live_children() - before)) == 2
    tools.close()
    assert live_children() == before


def test_a_calls_seconds_leave_out_its_workers_startup():
    # a fresh slot's worker imports its function for START_S first; the call itself is a sum
    pool = WorkerPool("slow_start_fns:add", SandboxLimits(timeout_s=30.0), 1, "slow")
    try:
        seconds: list[float] = []
        replies = pool.call_all([call_request((2, 3), 30.0)], 30.0, seconds.append)
        assert replies == [{"result": 5}] and len(seconds) == 1
        assert seconds[0] < START_S, f"{seconds[0]:.2f}s: the worker's startup was counted"
    finally:
        pool.close()
