"""A rollout server's sync port: what a trainer driving a weight sync (trainer/engine_drive.py)
asks of the server beside the engine. It listens where the engine does (the engine URL's host,
port ``rollout.sync_port``), behind the job's engine key, served like every HTTP port of the
project (areal_like/net/http_guard.py); a server without an engine key opens none (its Register
names no sync URL; a trainer then reaches only an engine on its own node, through a door of its
own).

``POST /door {"master_addr", "master_port", "group_name"}`` -> ``{"port"}``: a door on this node's
loopback to that group's store gate (areal_like/net/store_gate.py), in place of the engine's last
one; the trainer tells the engine to join through it.
``POST /drain {"seconds"}`` -> ``{"drained"}``: with ``rollout.drain_on_update``, no episode
starts for ``seconds`` (or until ``/release``) and the answer comes once the episodes in flight
ended, ``seconds`` at most; without it, at once (``drained`` false).
``POST /release`` -> ``{}``: episodes start again.
``POST /probe {"version"}`` -> ``{}``: after a failed sync of ``version``, the server checks that
its engine still generates, and stops when it does not (its supervisor restarts it with a fresh
engine).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
from aiohttp import web

from areal_like.net.http_guard import METRICS_LIMITS, guarded_app, serve
from areal_like.net.sglang_client import SGLangError

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class DoorBody(msgspec.Struct, forbid_unknown_fields=True):
    master_addr: Name
    master_port: Port
    group_name: Name


class DrainBody(msgspec.Struct, forbid_unknown_fields=True):
    seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)]


class ProbeBody(msgspec.Struct, forbid_unknown_fields=True):
    version: Annotated[int, msgspec.Meta(ge=0)]


class SyncPort:
    """The routes above, each a call into the server that made it."""

    def __init__(self, key: str, *, door: Callable[[str, int, str], int],
                 drain: Callable[[float], Awaitable[bool]], release: Callable[[], None],
                 probe: Callable[[int], None]):
        self.key, self.door, self.drain, self.release, self.probe = key, door, drain, release, probe
        self.server = None

    async def start(self, host: str, port: int) -> str:
        """Serve on ``host:port`` (0: a free port); the URL."""
        app = guarded_app(limits=METRICS_LIMITS, token=self.key)
        for path, handler in (("/door", self._door), ("/drain", self._drain),
                              ("/release", self._release), ("/probe", self._probe)):
            app.router.add_post(path, handler)
        self.server = await serve(app, host, port)
        return f"http://{host}:{self.server.port}"

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def _door(self, request: web.Request) -> web.Response:
        body = await _body(request, DoorBody)
        try:
            port = self.door(body.master_addr, body.master_port, body.group_name)
        except SGLangError as e:  # it cannot listen here: the trainer's sync of it fails, saying so
            return web.json_response({"error": {"message": e.message}}, status=502)
        return web.json_response({"port": port})

    async def _drain(self, request: web.Request) -> web.Response:
        return web.json_response({"drained": await self.drain(
            (await _body(request, DrainBody)).seconds)})

    async def _release(self, request: web.Request) -> web.Response:
        self.release()
        return web.json_response({})

    async def _probe(self, request: web.Request) -> web.Response:
        self.probe((await _body(request, ProbeBody)).version)
        return web.json_response({})


async def _body(request: web.Request, kind: type):
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except msgspec.DecodeError as e:  # ValidationError included: it names the field
        raise web.HTTPBadRequest(text=f"{request.path}: {e}") from None
