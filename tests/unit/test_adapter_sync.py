"""apply_adapter_sync against an engine with SGLang 0.5.23's LoRA lock (load and unload share it;
unload waits for its requests); the real SGLangClient with only _call replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import uuid

import msgspec

from areal_like.engines.client import EngineError
from areal_like.engines.sglang import SGLangClient
from areal_like.weights.plan import BucketSpec, SyncMember, WeightSyncPlan
from areal_like.weights.server_sync import apply_adapter_sync

DONE = {"meta_info": {"id": "r", "finish_reason": {"type": "stop"}, "output_token_logprobs": []},
        "output_ids": []}


class LockedLoraEngine:
    """SGLang's LoRA registry and lock; a generate naming hold runs until release."""

    def __init__(self):
        self.lock = asyncio.Lock()
        self.loaded: set[str] = set()
        self.using: dict[str, int] = {}
        self.most = 0  # the most adapters loaded at once
        self.calls: list[str] = []
        self.changed = asyncio.Condition()
        self.release = asyncio.Event()
        self.block: asyncio.Event | None = None  # set: /update_weight_version waits on it
        self.tasks: set[asyncio.Task] = set()

    async def until(self, done, timeout_s: float = 10.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(done), timeout_s)

    async def notify(self) -> None:
        self.most = max(self.most, len(self.loaded))
        async with self.changed:
            self.changed.notify_all()

    async def handle(self, path: str, body: dict):
        self.calls.append(path)
        await self.notify()
        name = (body or {}).get("lora_name")
        if path == "/load_lora_adapter":
            async with self.lock:
                self.loaded.add(name)
        elif path == "/unload_lora_adapter":
            async with self.lock:
                if name not in self.loaded:
                    raise EngineError(path, 400, f"LoRA with name {name} does not exist")
                self.loaded.discard(name)
                async with self.changed:  # wait_for_unload: every request using it ended
                    await self.changed.wait_for(lambda: not self.using.get(name))
        elif path == "/generate":
            return await self.generate(body.get("lora_path"))
        elif path == "/update_weight_version" and self.block is not None:
            await self.block.wait()
        await self.notify()
        return {"success": True}

    async def generate(self, name: str | None):
        if name is not None and name not in self.loaded:
            raise EngineError("/generate", 400, f"no adapter {name}")
        self.using[name] = self.using.get(name, 0) + 1
        try:
            if name == self.hold:
                await self.release.wait()
            return DONE
        finally:
            self.using[name] -= 1
            await self.notify()

    hold: str | None = None


class FakeTransportClient(SGLangClient):
    def __init__(self, engine: LockedLoraEngine):
        super().__init__(f"http://{uuid.uuid4().hex}.invalid")  # its own retired adapters
        self.engine = engine

    async def _call(self, method, path, body=None, *, timeout_s=None, idempotent, params=None,
                    limit=None):
        task = asyncio.create_task(self.engine.handle(path, body))  # goes on after a timeout
        self.engine.tasks.add(task)
        task.add_done_callback(self.engine.tasks.discard)
        try:
            return 200, await asyncio.wait_for(asyncio.shield(task),
                                               timeout_s or self.timeout_s), ""
        except asyncio.TimeoutError:
            raise EngineError(path, None, "TimeoutError: no answer in time") from None


# a directory that exists (the engine's read of it is faked), made by nobody: a module-level
# mkdtemp left one behind whenever an xdist worker ended without running atexit
ADAPTER_DIR = tempfile.gettempdir()


def plan(version: int, deadline_s: float = 2.0) -> WeightSyncPlan:
    return WeightSyncPlan(policy_version=version, group_name="g", master_addr="127.0.0.1",
                          master_port=0, world_size=2, backend="gloo", reform=False,
                          members=[SyncMember(server_id="s", rank_offset=1)],
                          buckets=[BucketSpec(names=["a"], dtypes=["float32"], shapes=[[1]])],
                          deadline_s=deadline_s, plan_id=f"p{version}", path="disk",
                          payloads=[ADAPTER_DIR])


async def sync(client, version: int, deadline_s: float = 2.0):
    return await apply_adapter_sync(client, plan(version, deadline_s), "s",
                                    pause_mode="retract")


def run(test) -> None:
    """test(engine, client), then every engine call it left running is awaited."""
    async def main():
        engine = LockedLoraEngine()
        await test(engine, FakeTransportClient(engine))
        await asyncio.gather(*engine.tasks)
    asyncio.run(main())


def test_a_request_kept_across_syncs_neither_stalls_loads_nor_leaks_adapters():
    async def ten_syncs(engine, client):
        assert (await sync(client, 1)).ok
        engine.hold = client.adapter[0]
        long = asyncio.create_task(client.generate([1], {}))
        await engine.until(lambda: engine.using.get(engine.hold))
        assert client.running(engine.hold) == 1
        results = [await sync(client, v, deadline_s=0.5) for v in range(2, 12)]
        assert [r.reason for r in results if not r.ok] == []
        assert engine.hold in engine.loaded and engine.most <= 4
        engine.release.set()
        await long
        assert client.running(engine.hold) == 0
        for v in (12, 13):
            assert (await sync(client, v)).ok
        await engine.until(lambda: engine.loaded == {"policy-v12-p12", "policy-v13-p13"})
    run(ten_syncs)


def test_an_adapter_whose_load_timed_out_is_unloaded_by_the_next_sync():
    async def slow_load(engine, client):
        # first a plan naming no directory on this node: refused before SGLang is called
        gone = msgspec.structs.replace(plan(1), payloads=[ADAPTER_DIR + "-not-here"])
        done = await apply_adapter_sync(client, gone, "s")
        assert not done.ok and "no adapter directory" in done.reason and done.plan_id == "p1"
        assert engine.calls == []
        assert (await sync(client, 1)).ok
        await engine.lock.acquire()  # a slow engine: the load waits past the deadline
        done = await sync(client, 2, deadline_s=0.2)
        assert not done.ok and client.adapter == ("policy-v1-p1", 1)
        engine.lock.release()
        await engine.until(lambda: "policy-v2-p2" in engine.loaded)
        assert (await sync(client, 3)).ok
        await engine.until(lambda: engine.loaded == {"policy-v1-p1", "policy-v3-p3"})
    run(slow_load)


def test_a_sync_cancelled_while_paused_continues_generation():
    async def cancelled(engine, client):
        assert (await sync(client, 1)).ok
        engine.block = asyncio.Event()
        task = asyncio.create_task(sync(client, 2))
        await engine.until(lambda: "/update_weight_version" in engine.calls[-1:])
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert engine.calls[-1] == "/continue_generation"
        assert client.adapter == ("policy-v1-p1", 1)  # the new one is not served ...
        engine.block.set()
        assert (await sync(client, 3)).ok  # ... so the next sync unloads it
        await engine.until(lambda: engine.loaded == {"policy-v1-p1", "policy-v3-p3"})
    run(cancelled)
