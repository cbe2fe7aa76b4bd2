"""In a sandboxed worker: run one agent episode (``task.agent``) and return its reward.

``run_agent`` is what the agent pool's workers call (``rollout_server/agent_episode.py``); it
imports the agent at ``path`` (``"pkg.module:run"``) and calls ``run(client_base_url, api_key,
example)``, awaiting it when it is a coroutine function (on a fresh event loop per episode; what
the episode before left behind is collected first, while no loop runs).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
from typing import Any

from areal_like.tasks.callables import import_function


def run_agent(path: str, base_url: str, api_key: str, example: Any) -> Any:
    # what the last episode left (an unclosed client: a reference cycle) goes while no loop runs;
    # collected on this episode's loop, its close would run there and fail: "Event loop is closed"
    gc.collect()
    value = import_function(path)(base_url, api_key, example)
    if inspect.isawaitable(value):
        value = asyncio.run(_wait(value))
    return value


async def _wait(awaitable: Any) -> Any:
    return await awaitable


def agent_problem(path: str) -> str:
    """Why ``task.agent=path`` cannot be run ("" when it can): it must import and take
    ``(client_base_url, api_key, example)``. The launcher's preflight and the rollout server's
    start ask before anything runs."""
    try:
        fn = import_function(path)
        inspect.signature(fn).bind("http://h/v1", "key", None)
    except TypeError as e:
        return (f"task.agent={path!r} cannot be called as run(client_base_url, api_key, example): "
                f"{e}")
    except (Exception, SystemExit) as e:  # noqa: BLE001 - whatever its import raises
        return f"task.agent={path!r} cannot be loaded: {type(e).__name__}: {e}"
    return ""
