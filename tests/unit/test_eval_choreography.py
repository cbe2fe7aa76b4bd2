"""The rollout server's side of an evaluation (rollout_server/server.py, evaluation section).

A real ``RolloutServer`` object (nothing started) with a scripted buffer and evaluator: the plan
that was already on its way when the server said "evaluating" is applied first and the evaluation
runs at the version it brought; the heartbeats say evaluating before and not evaluating after; a
plan that still arrives during the evaluation is declined at once with the reason; the schedule
decides when.
"""

from __future__ import annotations

import asyncio

from areal_like.net.metrics import Metrics
from areal_like.settings.config import EvalConfig, RunConfig
from areal_like.wire import protocol as P
from rollout_server.buffer_link import BufferLink
from rollout_server.evaluate import EvalSchedule
from rollout_server.server import RolloutServer


def _plan(version: int, server_id: str = "me") -> P.WeightSyncPlan:
    return P.WeightSyncPlan(policy_version=version, group_name="g",
                            master_addr="127.0.0.1", master_port=1,
                            world_size=2, backend="gloo", reform=False,
                            members=[P.SyncMember(server_id=server_id, rank_offset=1)],
                            buckets=[], deadline_s=30.0,
                            plan_id=f"p{version}")


class _Buffer:
    """Answers Heartbeat (the first evaluating one carries a pending plan) and records every
    request."""

    def __init__(self, pending: P.WeightSyncPlan | None):
        self.pending, self.sent = pending, []

    async def request(self, msg, timeout_s=None):
        self.sent.append(msg)
        if isinstance(msg, P.Heartbeat):
            plan, self.pending = (self.pending, None) if msg.evaluating else (None, self.pending)
            return P.HeartbeatAck(policy_version=7, known=True, pending_plan=plan)
        return P.Ack(ref="", status="ok")


class _Evaluator:
    def __init__(self, server: RolloutServer):
        self.server, self.versions, self.plans_during = server, [], []
        self.schedule = EvalSchedule(EvalConfig(every=5), steps=20)

    async def run(self, client, version: int, max_input: int = 0) -> dict:
        self.versions.append(version)
        self.server.offer_plan(_plan(version + 1))  # published after we left: must be declined
        await asyncio.sleep(0.05)
        return {"policy_version": version}


def _server() -> RolloutServer:
    server = RolloutServer.from_run(RunConfig(run_dir="/nonexistent"))
    server.server_id, server.policy_version, server.client = "me", 5, None
    server.rcfg = server.rcfg.__class__(heartbeat_s=0.05)
    server.evaluator = _Evaluator(server)
    return server


def _attach(server: RolloutServer, buffer: _Buffer) -> _Buffer:
    """``buffer`` as the server's control connection, also under its BufferLink (which reports
    syncs)."""
    server.control = buffer
    server.link = BufferLink(buffer, buffer, server.server_id, Metrics(),
                             free_slots=lambda: 0, blocked=lambda: False,
                             start=lambda credit: None)
    return buffer


async def _main_loop(server: RolloutServer, done: asyncio.Event) -> None:
    """What RolloutServer.main does with plans: apply one (here: take its version), or decline
    it."""
    while not done.is_set():
        if plan := server.next_plan():
            if server.eval_version is not None:
                await server.decline_plan(plan)
            else:
                server.policy_version = plan.policy_version
        await asyncio.sleep(0.01)


def test_a_plan_on_its_way_lands_first_then_the_evaluation_holds_one_version_and_declines_the_rest(
):
    server = _server()
    buffer = _attach(server, _Buffer(pending=_plan(6)))

    async def scenario():
        server.wake, done = asyncio.Event(), asyncio.Event()
        loop = asyncio.create_task(_main_loop(server, done))
        await server.evaluate()
        await asyncio.sleep(0.05)  # the main loop answers the plan offered during the evaluation
        done.set()
        await loop

    asyncio.run(scenario())
    # the plan published before the buffer knew landed first
    assert server.evaluator.versions == [6]
    beats = [m.evaluating for m in buffer.sent if isinstance(m, P.Heartbeat)]
    assert (beats[0] is True and beats[-1] is False and not server.evaluating
            and server.eval_version is None)
    declined = [m for m in buffer.sent if isinstance(m, P.SyncDone)]
    assert len(declined) == 1 and declined[0].policy_version == 7 and not declined[0].ok
    assert declined[0].reason == "evaluating version 6" and server.policy_version == 6


def test_the_schedule_starts_an_evaluation_only_when_due_and_idle():
    server = _server()
    _attach(server, _Buffer(pending=None))

    async def scenario():
        server.wake = asyncio.Event()
        server.policy_version = 4
        server.maybe_evaluate()
        assert server.eval_task is None  # 4 is not a multiple of 5
        server.policy_version, server.syncing = 5, True
        server.maybe_evaluate()
        assert server.eval_task is None  # never while a sync is applied
        server.syncing = False
        server.maybe_evaluate()
        task = server.eval_task
        assert task is not None
        server.maybe_evaluate()
        assert server.eval_task is task  # one at a time
        await task
        await asyncio.sleep(0)
        assert server.eval_task is None and server.failure is None

    asyncio.run(scenario())
    assert server.evaluator.versions == [5]


def test_the_final_evaluation_starts_at_once_no_plan_can_follow_the_final_version():
    server = _server()
    server.rcfg = server.rcfg.__class__(heartbeat_s=30.0)  # a wait for a plan on its way would show
    server.policy_version = 20  # trainer.steps: the last push has landed
    buffer = _attach(server, _Buffer(pending=None))

    async def scenario():
        server.wake, done = asyncio.Event(), asyncio.Event()
        loop = asyncio.create_task(_main_loop(server, done))
        await asyncio.wait_for(server.evaluate(), timeout=10)  # far less than heartbeat_s
        done.set()
        await loop

    asyncio.run(scenario())
    assert server.evaluator.versions == [20]
    beats = [m.evaluating for m in buffer.sent if isinstance(m, P.Heartbeat)]
    # left the syncs, evaluated, came back: no second "evaluating" beat
    assert beats == [True, False]


def test_a_plan_offered_again_is_applied_once_and_the_plans_remembered_stay_bounded():
    """Every heartbeat re-offers the buffer's current plan until our SyncDone lands; a plan key
    was kept for every version before, a week-long job's rollout server growing without bound."""
    server = _server()
    server.wake = asyncio.Event()
    applied = []
    for version in range(6, 1006):
        for _ in range(2):  # offered by two heartbeats: taken once
            server.offer_plan(_plan(version))
            if plan := server.next_plan():
                applied.append(plan.policy_version)
    assert applied == list(range(6, 1006))
    server.offer_plan(_plan(1005))  # the current plan again, after 1000 others: still known
    assert server.next_plan() is None
    assert len(server.plans_handled) <= 64
