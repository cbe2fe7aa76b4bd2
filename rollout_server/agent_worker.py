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
import socket
import threading
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from areal_like.tasks.callables import import_function
from rollout_server import reward_worker

_RELAYS: dict[int, socket.socket] = {}  # port: this worker's listener relaying to its endpoint
_EPISODES = [0]  # how many this worker started


def run_agent(path: str, base_url: str, api_key: str, example: Any, relay: str = "") -> Any:
    """``relay``: the Unix socket of the endpoint (root's workers: a network namespace of their
    own, loopback only); this worker's loopback gets a relay to it on ``base_url``'s port."""
    # what the last episode left (an unclosed client: a reference cycle) goes while no loop runs;
    # collected on this episode's loop, its close would run there and fail: "Event loop is closed"
    gc.collect()
    if _EPISODES[0] == 1:
        # what survives the first episode (the agent's imports, the environments it caches) goes
        # out of every later collection: the full collection above scanned it, 0.2 CPU-s an
        # episode, most of an episode's own, under verifiers' 390k objects. The cost: a frozen
        # object that later becomes cyclic garbage is never freed; the leak is bounded by that
        # one snapshot, and the worker's memory limit still applies
        gc.freeze()
    _EPISODES[0] += 1
    if relay:
        base_url = _relayed(base_url, relay)
    value = import_function(path)(base_url, api_key, example)
    if inspect.isawaitable(value):
        value = asyncio.run(_wait(value))
    return value


def _relayed(base_url: str, relay: str) -> str:
    """``base_url`` on this worker's loopback, relayed to the Unix socket ``relay`` (the relay
    started on first use; it lives as long as the worker)."""
    url = urlsplit(base_url)
    if url.port not in _RELAYS:
        listener = socket.create_server(("127.0.0.1", url.port))
        threading.Thread(target=reward_worker.relay, args=(listener, partial(_unix, relay)),
                         name="endpoint-relay", daemon=True).start()
        _RELAYS[url.port] = listener
    return urlunsplit((url.scheme, f"127.0.0.1:{url.port}", url.path, url.query, url.fragment))


def _unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


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
