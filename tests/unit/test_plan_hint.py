"""A rollout server takes a weight-sync plan up only from the buffer's ``HeartbeatAck``, never from
the plan's publication (rollout_server/server.py, buffer/control.py).

A real ``RolloutServer`` object (its heartbeat and announcement tasks, nothing else started)
subscribed over a real PUB socket to a real ``ControlPlane``. The server is expired while its
subscriber stays connected (a frozen process), the trainer publishes a plan naming it (it read the
roster before), and the same process registers again: the buffer recorded its failure for that
plan, so the publication, which reaches it, must not hand it the plan (with SGLang the engine would
block in a join nobody forms until the plan's deadline). A plan made for it afterwards is handed
over at once: the publication sends a heartbeat without waiting for the next period.

Mutation checked: ``announcements`` offering every published plan naming us (the code before
this test): the plan the buffer recorded as failed was taken up and the test failed.
"""

from __future__ import annotations

import asyncio
import logging
import time

from areal_like.net.pubsub import Publisher
from areal_like.settings.config import RunConfig
from areal_like.wire import protocol as P
from buffer.control import ControlPlane
from rollout_server.server import RolloutServer

HEARTBEAT_S = 60.0  # the period: every plan below must come well before it
WAIT_S = 10.0  # the longest wait for an event (not a timing assert)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _plan(version: int) -> P.WeightSyncPlan:
    return P.WeightSyncPlan(policy_version=version, group_name="g", master_addr="127.0.0.1",
                            master_port=1, world_size=3, backend="gloo", reform=True,
                            members=[P.SyncMember(server_id="me", rank_offset=1),
                                     P.SyncMember(server_id="b", rank_offset=2)],
                            buckets=[], deadline_s=30.0, plan_id=f"p{version}")


class _Control:
    """The server's control connection, answered by ``control``; counts the heartbeats."""

    def __init__(self, control: ControlPlane):
        self.control, self.beats = control, 0

    async def request(self, msg, timeout_s=None):
        if isinstance(msg, P.Heartbeat):
            self.beats += 1
            return self.control.heartbeat(msg)
        return self.control.register(msg)


def _hello(sid: str) -> P.Register:
    return P.Register(server_id=sid, engine_url="http://x", policy_version=0, incarnation=sid)


async def _until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S}s"
        await asyncio.sleep(0.01)


async def _scenario(publisher: Publisher, address: str) -> float:
    clock = _Clock()
    control = ControlPlane(address, 5.0, clock, publisher.publish, logging.getLogger("test"))
    server = RolloutServer.from_run(RunConfig(run_dir="/nonexistent"))
    server.server_id, server.pub_address = "me", address
    server.rcfg = server.rcfg.__class__(heartbeat_s=HEARTBEAT_S)
    server.wake, server.beat_now = asyncio.Event(), asyncio.Event()
    server.control = conn = _Control(control)
    control.register(_hello("me"))
    control.register(_hello("b"))
    tasks = [asyncio.create_task(server.heartbeats()), asyncio.create_task(server.announcements())]
    try:
        control.take_plan(_plan(1))
        # PUB drops what it sends before the subscription is in: publish until it comes through
        deadline = time.monotonic() + WAIT_S
        while server.plan is None:
            assert time.monotonic() < deadline, "plan v1 never came"
            publisher.publish(_plan(1))
            await asyncio.sleep(0.05)
        control.sync_done(P.SyncDone(server_id="me", policy_version=1, ok=True))
        server.plan = None

        clock.now = 6.0  # "me" silent past the heartbeat timeout (5 s); b beats
        control.heartbeat(P.Heartbeat(server_id="b", policy_version=1))
        assert control.expire() == ["me"]
        control.take_plan(_plan(2))  # the trainer read the roster before "me" left it
        control.register(_hello("me"))  # the same process back, its subscriber connected
        beats = conn.beats
        publisher.publish(_plan(2))  # once more: PUB is lossy, the test must not depend on it
        await _until(lambda: conn.beats > beats or server.plan is not None, "heartbeat for plan v2")
        assert server.plan is None, "took up a plan the buffer recorded it failed"

        t0 = time.monotonic()
        control.take_plan(_plan(3))
        await _until(lambda: server.plan is not None, "plan v3")
        assert server.plan.plan_id == "p3"
        return time.monotonic() - t0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_a_published_plan_is_a_hint_and_the_heartbeat_answer_hands_it_over(free_port):
    address = f"tcp://127.0.0.1:{free_port()}"
    publisher = Publisher(address)
    try:
        latency = asyncio.run(_scenario(publisher, address))
    finally:
        publisher.close()
    assert latency < HEARTBEAT_S / 2  # the hint's heartbeat, not the next period
