"""A rollout server's sync port: what the trainer driving its engine's weight syncs
(trainer/engine_drive.py) asks of the server beside the engine. It listens where the engine does
(the engine URL's host, port ``rollout.sync_port``), served like every HTTP port of the project
(areal_like/net/http_guard.py); every route but ``/vouch`` and ``/begin`` behind the job's
engine key.

Routes ``/vouch``, ``/begin``, ``/door``, ``/adapter`` and ``/end``. Their bodies, proofs,
deadlines and 409/400 rules are the protocol of trainer/WEIGHT_SYNC.md ("Who drives the
engines"); who may call which route: areal_like/SECURITY.md ("Rollout server sync port").
"""

from __future__ import annotations

import dataclasses
import hmac
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
from aiohttp import web

from areal_like.engines.client import EngineError
from areal_like.net.answers import peer_text
from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE, begin_proof, vouch_proof
from areal_like.net.http_guard import METRICS_LIMITS, guarded_app, serve
from areal_like.weights.plan import ROOT_PREFIX, SyncDone, WeightSyncPlan
from areal_like.weights.server_sync import in_push_dir

# the metrics port's limits, but a body as large as a plan of a big adapter (its names and shapes)
LIMITS = dataclasses.replace(METRICS_LIMITS, max_body_bytes=4 << 20)
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PlanId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
# the nonces of the last this many begun syncs are refused again (a replay); a nonce is 16 bytes
# of randomness, so a trainer never repeats one, and a replay also needs this process (its proof
# names the server's incarnation)
NONCES_KEPT = 1 << 16


Nonce = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32,128}$")]


class VouchBody(msgspec.Struct, forbid_unknown_fields=True):
    nonce: Nonce


class DoorBody(msgspec.Struct, forbid_unknown_fields=True):
    plan_id: PlanId
    master_addr: Name
    master_port: Port
    group_name: Name


class BeginBody(msgspec.Struct, forbid_unknown_fields=True):
    plan_id: PlanId
    version: Annotated[int, msgspec.Meta(ge=0)]
    seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)]
    nonce: Nonce
    proof: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class EndBody(msgspec.Struct, forbid_unknown_fields=True):
    plan_id: PlanId
    version: Annotated[int, msgspec.Meta(ge=0)]
    ok: bool
    pause_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    reason: Annotated[str, msgspec.Meta(max_length=2000)] = ""


class SyncRefused(Exception):
    """A call the server cannot take now: its message says why (409)."""


class SyncPort:
    """The routes above, each a call into the server that made it (``SyncRefused``: 409)."""

    def __init__(self, key: str, server_id: str, engine_url: str, *, incarnation: str = "",
                 rendezvous: tuple[str, int],
                 door: Callable[[DoorBody], int],
                 begin: Callable[[BeginBody], Awaitable[bool]],
                 adapter: Callable[[WeightSyncPlan], Awaitable[SyncDone]],
                 end: Callable[[EndBody], None]):
        if not key:  # it proves the key (``/vouch``, ``/begin``): with none, no trainer may sync
            raise ValueError(f"the sync port needs the job's engine key: {ENGINE_KEY_ENV}, or "
                             f"<run_dir>/{KEY_FILE} (`areal-like run` makes it)")
        self.key, self.server_id, self.engine_url = key, server_id, engine_url
        self.incarnation = incarnation  # the server process's (``Register.incarnation``)
        self.door, self.begin, self.adapter, self.end = door, begin, adapter, end
        # trainer.weight_sync.master_addr and master_port (0: any): where a door may lead
        self.rendezvous = rendezvous
        self.nonces: OrderedDict[str, None] = OrderedDict()  # of the syncs begun, newest last
        self.server, self.url = None, ""

    async def start(self, host: str, port: int) -> str:
        """Serve on ``host:port`` (0: a free port); the URL."""
        app = guarded_app(limits=LIMITS, token=self.key, open_paths=("/vouch", "/begin"),
                          middlewares=(_refusals,))
        for path, handler in (("/vouch", self._vouch), ("/door", self._door),
                              ("/begin", self._begin), ("/adapter", self._adapter),
                              ("/end", self._end)):
            app.router.add_post(path, handler)
        self.server = await serve(app, host, port)
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.server.port}"
        return self.url

    def unauthorized(self) -> int:
        """Calls refused for a missing or wrong key (``areal_refused_total{port="sync"}``)."""
        return self.server.stats.unauthorized if self.server is not None else 0

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def _vouch(self, request: web.Request) -> web.Response:
        return web.json_response({"proof": self._vouched((await _body(request, VouchBody)).nonce)})

    def _vouched(self, nonce: str) -> str:
        return vouch_proof(self.key, nonce, self.server_id, self.url, self.engine_url)

    async def _door(self, request: web.Request) -> web.Response:
        body, (addr, port) = await _body(request, DoorBody), self.rendezvous
        if body.master_addr != addr or port not in (0, body.master_port):
            where = f"{addr}:{port or '<any port>'}"
            return _error(400, f"/door leads only to the job's weight-sync rendezvous {where} "
                          "(trainer.weight_sync.master_addr, master_port), not to "
                          f"{peer_text(body.master_addr)}:{body.master_port}")
        return web.json_response({"port": self.door(body)})

    async def _begin(self, request: web.Request) -> web.Response:
        b = await _body(request, BeginBody)
        want = begin_proof(self.key, b.nonce, self.server_id, self.incarnation, self.url,
                           self.engine_url, b.plan_id, b.version, b.seconds)
        if not hmac.compare_digest(b.proof, want):
            self.server.stats.unauthorized += 1
            return _error(401, "no proof of the job's engine key for this port")
        if b.nonce in self.nonces:
            return _error(409, "a replayed /begin: its nonce began a sync here already")
        self.nonces[b.nonce] = None
        while len(self.nonces) > NONCES_KEPT:
            self.nonces.popitem(last=False)
        return web.json_response({"drained": await self.begin(b), "proof": self._vouched(b.nonce)})

    async def _adapter(self, request: web.Request) -> web.Response:
        plan = await _body(request, WeightSyncPlan)
        if not all(in_push_dir(p) for p in plan.payloads):
            return _error(400, "/adapter loads only a push directory of the disk path "
                          f"(<tmp>/{ROOT_PREFIX}*/*, written by the trainer on this node)")
        done = await self.adapter(plan)
        return web.json_response({"ok": done.ok, "reason": done.reason, "pause_s": done.pause_s})

    async def _end(self, request: web.Request) -> web.Response:
        self.end(await _body(request, EndBody))
        return web.json_response({})


@web.middleware
async def _refusals(request: web.Request, handler) -> web.Response:
    try:
        return await handler(request)
    except SyncRefused as e:
        return _error(409, str(e))
    except EngineError as e:  # no door can listen here: the trainer's sync fails, saying so
        return _error(502, e.message)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def _body(request: web.Request, kind: type):
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except msgspec.DecodeError as e:  # ValidationError included: it names the field
        raise web.HTTPBadRequest(text=f"{request.path}: {e}") from None
