"""Regression tests for bugs found in review (rollout server and trainer), one per bug.

Each test names the invariant it protects; the fake engines here keep the state SGLang keeps
(e.g. the weight-update session), so a test fails the way the real system would wedge.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from areal_like.engines.sglang import SGLangClient
from areal_like.net.distributed import free_port
from areal_like.weights.plan import BucketSpec, SyncMember, WeightSyncPlan
from areal_like.weights.push import apply_weight_sync

OK = {"success": True, "message": "ok"}


class SessionEngine:
    """Control endpoints of an engine with SGLang's weight-update session semantics: ``begin``
    opens the session (refused while one is open) before it answers; ``end`` closes it."""

    def __init__(self, begin_delays: list[float]):
        self.session_open = False
        self.begin_delays = begin_delays
        self.calls: list[str] = []
        self.port = free_port()
        self.app = web.Application()
        self.app.router.add_post("/{path:.*}", self.handle)
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        await request.text()
        self.calls.append(path)
        if path == "/begin_weight_update":
            if self.session_open:
                return web.json_response(
                    {"success": False, "message": "a session is already open"}, status=400)
            self.session_open = True
            await asyncio.sleep(self.begin_delays.pop(0) if self.begin_delays else 0.0)
        elif path == "/end_weight_update":
            if not self.session_open:
                return web.json_response(
                    {"success": False, "message": "no session is open"}, status=400)
            self.session_open = False
        elif path == "/update_weights_from_distributed" and not self.session_open:
            return web.json_response({"success": False, "message": "no session"}, status=400)
        return web.json_response(OK)

    async def start(self) -> str:
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return f"http://127.0.0.1:{self.port}"


def _plan(version: int, deadline_s: float) -> WeightSyncPlan:
    return WeightSyncPlan(policy_version=version, group_name="g", master_addr="127.0.0.1",
                          master_port=1, world_size=2, backend="gloo", reform=False,
                          members=[SyncMember(server_id="s0", rank_offset=1)],
                          buckets=[BucketSpec(names=["w"], dtypes=["float32"], shapes=[[2]])],
                          deadline_s=deadline_s)


def test_a_begin_that_times_out_after_the_engine_opened_the_session_does_not_wedge_later_syncs():
    """Bug: ``session_open`` was set only after ``/begin_weight_update`` answered. A begin that the
    engine executed but whose answer came after the deadline left the session open for good, and
    every later sync was refused ("already open"): the engine never received weights again."""
    async def main():
        # the first begin answers after the plan's deadline
        engine = SessionEngine(begin_delays=[2.0])
        client = SGLangClient(await engine.start(), timeout_s=10.0)
        try:
            first = await apply_weight_sync(client, _plan(1, deadline_s=0.5), "s0")
            assert not first.ok
            assert engine.calls[-1] == "/continue_generation"  # never left paused
            await asyncio.sleep(2.0)  # the slow begin handler has finished
            second = await apply_weight_sync(client, _plan(2, deadline_s=10.0), "s0")
            assert second.ok, second.reason
            assert not engine.session_open
        finally:
            await client.close()
            await engine.runner.cleanup()
    asyncio.run(main())
