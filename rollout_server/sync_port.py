"""A rollout server's sync port: what the trainer driving its engine's weight syncs
(trainer/engine_drive.py) asks of the server beside the engine. It listens where the engine does
(the engine URL's host, port ``rollout.sync_port``), behind the job's engine key, served like
every HTTP port of the project (areal_like/net/http_guard.py).

``POST /door {"master_addr", "master_port", "group_name"}`` -> ``{"port"}``: a door on this node's
loopback to that group's store gate (areal_like/net/store_gate.py), in place of the engine's last
one; the trainer tells the engine to join through it.
``POST /begin {"version", "seconds"}`` -> ``{"drained"}``: the sync of ``version`` begins; no lease
is asked for and no evaluation begins for ``seconds`` or until its ``/end``. With
``rollout.drain_on_update`` the answer comes once the episodes in flight ended (half of
``seconds`` at most). 409 while the server evaluates: the sync of this member fails before anything
reached its engine.
``POST /adapter`` (a ``WeightSyncPlan``, JSON) -> ``{"ok", "reason", "pause_s"}``: with LoRA on a
launched engine, the server loads the plan's adapter itself (its generate calls name the adapter:
``areal_like/weights/engine_sync.py`` ``apply_adapter_sync``).
``POST /end {"version", "ok", "pause_s", "reason"}`` -> ``{}``: the sync ended; after a failed one
the server checks that its engine still generates and stops when it does not (its supervisor
restarts it with a fresh engine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
from aiohttp import web

from areal_like.net.http_guard import METRICS_LIMITS, guarded_app, serve
from areal_like.net.sglang_client import SGLangError
from areal_like.wire.protocol import SyncDone, WeightSyncPlan

# the metrics port's limits, but a body as large as a plan of a big adapter (its names and shapes)
LIMITS = dataclasses.replace(METRICS_LIMITS, max_body_bytes=4 << 20)
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class DoorBody(msgspec.Struct, forbid_unknown_fields=True):
    master_addr: Name
    master_port: Port
    group_name: Name


class BeginBody(msgspec.Struct, forbid_unknown_fields=True):
    version: Annotated[int, msgspec.Meta(ge=0)]
    seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)]


class EndBody(msgspec.Struct, forbid_unknown_fields=True):
    version: Annotated[int, msgspec.Meta(ge=0)]
    ok: bool
    pause_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    reason: Annotated[str, msgspec.Meta(max_length=2000)] = ""


class SyncRefused(Exception):
    """``begin`` cannot be: its message says why (409)."""


class SyncPort:
    """The routes above, each a call into the server that made it."""

    def __init__(self, key: str, *, door: Callable[[str, int, str], int],
                 begin: Callable[[int, float], Awaitable[bool]],
                 adapter: Callable[[WeightSyncPlan], Awaitable[SyncDone]],
                 end: Callable[[int, bool, float, str], None]):
        self.key, self.door, self.begin, self.adapter, self.end = key, door, begin, adapter, end
        self.server = None

    async def start(self, host: str, port: int) -> str:
        """Serve on ``host:port`` (0: a free port); the URL."""
        app = guarded_app(limits=LIMITS, token=self.key)
        for path, handler in (("/door", self._door), ("/begin", self._begin),
                              ("/adapter", self._adapter), ("/end", self._end)):
            app.router.add_post(path, handler)
        self.server = await serve(app, host, port)
        return f"http://{host}:{self.server.port}"

    def unauthorized(self) -> int:
        """Calls refused for a missing or wrong key (``areal_refused_total{port="sync"}``)."""
        return self.server.stats.unauthorized if self.server is not None else 0

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def _door(self, request: web.Request) -> web.Response:
        body = await _body(request, DoorBody)
        try:
            port = self.door(body.master_addr, body.master_port, body.group_name)
        except SGLangError as e:  # it cannot listen here: the trainer's sync of it fails, saying so
            return _error(502, e.message)
        return web.json_response({"port": port})

    async def _begin(self, request: web.Request) -> web.Response:
        body = await _body(request, BeginBody)
        try:
            return web.json_response({"drained": await self.begin(body.version, body.seconds)})
        except SyncRefused as e:
            return _error(409, str(e))

    async def _adapter(self, request: web.Request) -> web.Response:
        done = await self.adapter(await _body(request, WeightSyncPlan))
        return web.json_response({"ok": done.ok, "reason": done.reason, "pause_s": done.pause_s})

    async def _end(self, request: web.Request) -> web.Response:
        body = await _body(request, EndBody)
        self.end(body.version, body.ok, body.pause_s, body.reason)
        return web.json_response({})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def _body(request: web.Request, kind: type):
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except msgspec.DecodeError as e:  # ValidationError included: it names the field
        raise web.HTTPBadRequest(text=f"{request.path}: {e}") from None
