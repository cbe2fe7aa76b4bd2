"""The rollout server's side of an evaluation: a real sync port, a scripted buffer and engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile

import msgspec
import pytest

from areal_like.engines.client import EngineError
from areal_like.net.metrics import Metrics
from areal_like.settings.config import EvalConfig, RunConfig
from areal_like.weights.plan import ROOT_PREFIX, SyncDone, WeightSyncPlan
from areal_like.weights.push import ServerPort
from areal_like.wire import protocol as P
from rollout_server.buffer_link import BufferLink
from rollout_server.evaluate import EvalSchedule
from rollout_server.server import RolloutServer

WAIT_S = 10.0  # the longest wait for an event (not a timing assert)


class _Buffer:
    """Answers every request and records it."""

    def __init__(self):
        self.sent = []

    async def request(self, msg, timeout_s=None):
        self.sent.append(msg)
        if isinstance(msg, P.Heartbeat):
            return P.HeartbeatAck(policy_version=7, known=True)
        return P.Ack(ref="", status="ok")


class _Engine:
    """The engine's version label, as the server reads it."""

    def __init__(self, version: int):
        self.version = version

    async def weight_version(self) -> str:
        return str(self.version)


class _Evaluator:
    """Records the version of each evaluation and what a sync begun during it was answered."""

    def __init__(self, port: ServerPort | None = None):
        self.port, self.versions, self.refusals = port, [], []
        self.schedule = EvalSchedule(EvalConfig(every=5), steps=20)

    async def run(self, client, version: int, max_input: int = 0) -> dict:
        self.versions.append(version)
        if self.port is not None:  # the trainer's next push reaches us now
            with pytest.raises(EngineError) as refused:
                await self.port.begin(_plan(version + 1), *ME)
            self.refusals.append((refused.value.status, refused.value.message))
        return {"policy_version": version}


# <a push root>/v1 (trainer/weight_local.py's layout), never read here; made per module, not at
# import (an xdist worker importing this module without running it would leave the root behind)
UNREAD = ""


@pytest.fixture(autouse=True, scope="module")
def _push_root():
    global UNREAD
    root = tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}1_")
    UNREAD = os.path.join(root, "v1")
    yield
    os.rmdir(root)


# the server's id, its engine's URL and its process's incarnation (``begin``)
ME = ("me", "http://127.0.0.1:1", "me-1")


def _plan(version: int) -> WeightSyncPlan:
    return WeightSyncPlan(policy_version=version, group_name="", master_addr="", master_port=0,
                          world_size=1, backend="gloo", reform=False, members=[], buckets=[],
                          deadline_s=30.0, path="disk", payloads=[UNREAD],
                          plan_id=f"plan-{version}")


def _server(tmp_path, version: int, heartbeat_s: float = 0.05) -> RolloutServer:
    server = RolloutServer.from_run(RunConfig(run_dir=str(tmp_path)))
    server.facts = dataclasses.replace(server.facts, engine_key="the-jobs-key")
    server.server_id, server.policy_version, server.incarnation = "me", version, ME[2]
    server.rcfg = server.rcfg.__class__(heartbeat_s=heartbeat_s)
    server.engine_url, server.client = "http://127.0.0.1:1", _Engine(version)
    server.evaluator = _Evaluator()
    server.control = buffer = _Buffer()
    server.link = BufferLink(buffer, buffer, server.server_id, Metrics(),
                             free_slots=lambda: 0, blocked=server.in_sync,
                             start=lambda credit: None)
    return server


@contextlib.asynccontextmanager
async def _trainer(server: RolloutServer):
    """The sync port opened as main opens it, called as the trainer does; closed at the end."""
    server.wake = asyncio.Event()
    await server.open_sync_port()
    port = ServerPort(server.sync_url, api_key=server.facts.engine_key)
    try:
        yield port
    finally:
        await port.close()
        await server.sync_port.close()


async def _until(cond, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not cond():
        assert loop.time() < deadline, f"no {what} within {WAIT_S}s"
        await asyncio.sleep(0.01)


def test_a_sync_under_way_ends_first_then_the_evaluation_holds_its_version_and_refuses_syncs(
        tmp_path):
    server = _server(tmp_path, version=5)

    async def scenario():
        async with _trainer(server) as port:
            server.evaluator.port = port
            await port.begin(_plan(6), *ME)  # v6 is being loaded into our engine
            evaluation = asyncio.create_task(server.evaluate())
            await _until(lambda: any(m.evaluating for m in server.control.sent), "evaluating beat")
            # out of the roster now; the evaluation waits for the sync's end (else it had run at 5)
            assert server.evaluator.versions == [] and not evaluation.done()
            server.client.version = 6  # the engine loaded it
            await port.end(_plan(6), SyncDone(server_id="me", policy_version=6, ok=True,
                                              pause_s=0.1))
            await asyncio.wait_for(evaluation, WAIT_S)
            await port.begin(_plan(7), *ME)  # after the evaluation: syncs are taken again

    asyncio.run(scenario())
    # the version the sync under way brought is the one evaluated
    assert server.evaluator.versions == [6] and server.policy_version == 6
    assert server.evaluator.refusals == [(409, "evaluating version 6")]
    beats = [m.evaluating for m in server.control.sent if isinstance(m, P.Heartbeat)]
    assert (beats[0] is True and beats[-1] is False and not server.evaluating
            and server.eval_version is None)


def test_the_schedule_starts_an_evaluation_only_when_due_and_idle(tmp_path):
    server = _server(tmp_path, version=4)

    async def scenario():
        async with _trainer(server) as port:
            server.maybe_evaluate()
            assert server.eval_task is None  # 4 is not a multiple of 5
            server.policy_version = server.client.version = 5
            await port.begin(_plan(5), *ME)
            server.maybe_evaluate()
            assert server.eval_task is None  # never while a sync runs
            await port.end(_plan(5), SyncDone(server_id="me", policy_version=5, ok=True))
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


def test_the_final_evaluation_starts_at_once(tmp_path):
    server = _server(tmp_path, version=20, heartbeat_s=30.0)  # trainer.steps: the last push landed

    async def scenario():
        server.wake = asyncio.Event()
        await asyncio.wait_for(server.evaluate(), timeout=WAIT_S)  # far less than heartbeat_s

    asyncio.run(scenario())
    assert server.evaluator.versions == [20]
    beats = [m.evaluating for m in server.control.sent if isinstance(m, P.Heartbeat)]
    # left the syncs, evaluated, came back: no second "evaluating" beat
    assert beats == [True, False]


def test_the_sync_port_acts_only_for_the_sync_under_way(tmp_path):
    server = _server(tmp_path, version=5)
    group = {"master_addr": "127.0.0.1", "master_port": 1, "group_name": "g"}
    plan6, plan7 = (msgspec.structs.replace(_plan(v), **group) for v in (6, 7))
    ok = {v: SyncDone(server_id="me", policy_version=v, ok=True) for v in (6, 7)}

    async def refused(call) -> None:
        with pytest.raises(EngineError) as e:
            await call
        assert e.value.status == 409 and "not the weight sync under way" in e.value.message

    async def scenario():
        async with _trainer(server) as port:
            await refused(port.door(plan6))  # no sync began
            await port.begin(plan6, *ME)
            await refused(port.door(plan7))
            await refused(port.end(plan7, ok[7]))  # a late end of another plan: nothing changes
            late = await port.load_adapter_for(plan7, "me")
            assert not late.ok and "not the weight sync under way" in late.reason
            assert server.in_sync() and server.policy_version == 5
            server.client.version = 6  # the engine loaded it
            await port.end(plan6, ok[6])
            await asyncio.wait_for(asyncio.gather(*server.after_sync), WAIT_S)
            assert not server.in_sync() and server.policy_version == 6
            # the engine's label, read at the end, reaches the buffer in the heartbeat after it
            beats = [m for m in server.control.sent if isinstance(m, P.Heartbeat)]
            assert beats[-1].policy_version == 6
            await refused(port.end(plan6, ok[6]))  # ended: its powers with it
            await refused(port.door(plan6))

    asyncio.run(scenario())


def test_a_label_read_across_a_sync_does_not_undo_the_label_read_at_its_end(tmp_path):
    server = _server(tmp_path, version=5)

    class SlowLabel(_Engine):
        async def weight_version(self) -> str:  # the first read answers late, from before
            label = str(self.version)
            if not asking.is_set():
                asking.set()
                await answer.wait()
            return label

    async def scenario():
        nonlocal asking, answer
        asking, answer = asyncio.Event(), asyncio.Event()
        server.client = SlowLabel(5)
        async with _trainer(server) as port:
            read = asyncio.create_task(server.read_engine_version())
            await asyncio.wait_for(asking.wait(), WAIT_S)
            await port.begin(_plan(6), *ME)
            server.client.version = 6  # the engine loaded it
            await port.end(_plan(6), SyncDone(server_id="me", policy_version=6, ok=True))
            await asyncio.wait_for(asyncio.gather(*server.after_sync), WAIT_S)  # its heartbeat
            assert server.policy_version == 6
            answer.set()
            await asyncio.wait_for(read, WAIT_S)

    asking = answer = None
    asyncio.run(scenario())
    assert server.policy_version == 6


def test_no_sync_begins_while_the_engine_of_an_abandoned_one_is_being_continued(tmp_path,
                                                                                monkeypatch):
    import rollout_server.server as server_module

    monkeypatch.setattr(server_module, "CONTINUE_TIMEOUT_S", 0.0)  # the window: the deadline alone
    server = _server(tmp_path, version=5)
    calls = []

    class Abandoned(_Engine):
        async def end_weight_update(self, timeout_s=None) -> None:
            calls.append("end_weight_update")
            await closing.wait()

        async def continue_generation(self, timeout_s=None) -> None:
            calls.append("continue_generation")

        async def health_generate(self, timeout_s=None) -> None:
            calls.append("health_generate")

    async def scenario():
        nonlocal closing
        closing = asyncio.Event()
        server.client = Abandoned(5)
        async with _trainer(server) as port:
            await port.begin(msgspec.structs.replace(_plan(6), deadline_s=1.0), *ME)
            await _until(lambda: not server.in_sync(), "the sync's window to pass")
            server.end_abandoned_sync()  # as the loop does once the window passed
            await _until(lambda: calls == ["end_weight_update"], "the session closed")
            with pytest.raises(EngineError) as refused:
                await port.begin(_plan(7), *ME)
            assert refused.value.status == 409 and "abandoned sync of v6" in refused.value.message
            closing.set()
            await asyncio.wait_for(server.resuming, WAIT_S)
            await port.begin(_plan(7), *ME)  # taken once the engine is continued and probed
            assert server.in_sync() and server.failure is None

    closing = None
    asyncio.run(scenario())
    assert calls == ["end_weight_update", "continue_generation", "health_generate"]
