"""A rollout server's sync port as a trainer's ServerPort calls it, over real sockets: its
door, begin/end, proofs of its own engine, and what keyless or malformed calls do (nothing)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import urllib.error
import urllib.request

import msgspec
import pytest
from test_store_gate import DEADLINE_S, GROUP, KEY, closed_by_peer, echo  # noqa: F401 - fixture

from areal_like.engines.client import EngineError
from areal_like.net.distributed import free_port
from areal_like.net.store_gate import StoreGate
from areal_like.weights.plan import ROOT_PREFIX, BucketSpec, SyncDone, WeightSyncPlan
from areal_like.weights.push import ServerPort
from areal_like.weights.server_sync import close_door, open_door
from rollout_server.sync_port import SyncPort

ENGINE = "http://127.0.0.1:1"  # the engine the port serves (never called here)


@pytest.fixture
def pushed():
    """One push's directory as DiskSender makes its root (mkdtemp, 0700)."""
    root = tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}1_")
    yield os.path.join(root, "v1-abcdef")
    os.rmdir(root)


def _plan(port: int) -> WeightSyncPlan:
    return WeightSyncPlan(policy_version=1, group_name=GROUP, master_addr="127.0.0.1",
                          master_port=port, world_size=2, backend="gloo", reform=True,
                          buckets=[], deadline_s=DEADLINE_S, plan_id="p1", members=[])


def _port(key: str, calls: list, **routes) -> SyncPort:
    async def begin(body) -> bool:
        calls.append(("begin", body.plan_id, body.version))
        return False

    def door(body) -> int:
        return open_door("engine-a", key, body.master_addr, body.master_port, body.group_name)

    return SyncPort(key, "a", ENGINE, incarnation="now", rendezvous=("127.0.0.1", 0),
                    **{"door": door, "begin": begin, "adapter": None,
                       "end": lambda b: calls.append(("end", b.plan_id, b.ok, b.pause_s, b.reason)),
                       **routes})


def _post(url: str, body: bytes, key: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE_S) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_door_asked_of_the_sync_port_reaches_the_gate_and_only_the_key_gets_one(echo, pushed):  # noqa: F811
    gate_port, calls = free_port(), []
    gate = StoreGate("127.0.0.1", gate_port, GROUP, echo, key=KEY)

    async def adapter(plan):  # the LoRA route: the server loads the plan's adapter
        calls.append(("adapter", plan.policy_version, len(plan.buckets[0].names)))
        return SyncDone(server_id="a", policy_version=plan.policy_version, ok=True, pause_s=0.25)

    dialled = []

    def door(body) -> int:
        dialled.append((body.master_addr, body.master_port))
        return open_door("engine-a", KEY, body.master_addr, body.master_port, body.group_name)

    port = _port(KEY, calls, adapter=adapter, door=door)
    port.rendezvous = ("127.0.0.1", gate_port)  # trainer.weight_sync.master_port set

    async def scenario() -> None:
        url = await port.start("127.0.0.1", 0)
        try:
            async with ServerPort(url, api_key=KEY) as trainer:
                first = await trainer.door(_plan(gate_port))
                with socket.create_connection(("127.0.0.1", first), timeout=DEADLINE_S) as s:
                    s.sendall(b"\x00store")
                    assert s.recv(100) == b"erots\x00"  # through the gate, both ways
                second = await trainer.door(_plan(gate_port))  # the engine's next group
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", first), timeout=DEADLINE_S)
                with socket.create_connection(("127.0.0.1", second), timeout=DEADLINE_S) as s:
                    s.sendall(b"\x00store")
                    assert s.recv(100) == b"erots\x00"
                await trainer.begin(_plan(gate_port), "a", ENGINE, "now")
                # a big adapter's plan (its names and shapes: past 4 KB) goes whole, both ways
                names = [f"model.layers.{i}.self_attn.q_proj.lora_A.weight" for i in range(400)]
                big = msgspec.structs.replace(
                    _plan(gate_port), path="disk", payloads=[pushed],
                    buckets=[BucketSpec(names=names, dtypes=["float32"] * 400,
                                        shapes=[[8, 64]] * 400)])
                done = await trainer.load_adapter_for(big, "a")
                assert done.ok and done.pause_s == 0.25 and done.server_id == "a", done
                await trainer.end(_plan(gate_port), SyncDone(
                    server_id="a", policy_version=1, ok=False, reason="why", pause_s=0.5))
            assert calls == [("begin", "p1", 1), ("adapter", 1, 400),
                             ("end", "p1", False, 0.5, "why")]
            async with ServerPort(url, api_key="not-the-key") as stranger:
                with pytest.raises(EngineError) as refused:
                    await stranger.door(_plan(gate_port))
                assert refused.value.status == 401 and port.unauthorized() == 1
                with pytest.raises(EngineError, match="AREAL_LIKE_ENGINE_API_KEY"):
                    await stranger.begin(_plan(gate_port), "a", ENGINE, "now")  # no proof
                assert port.unauthorized() == 2
            # a door leads only to the job's rendezvous
            for addr, p, named in (("127.0.0.1", 0, "master_port"), ("127.0.0.1", 22, ""),
                                   ("10.1.2.3", gate_port, "trainer.weight_sync.master_addr")):
                body = json.dumps({"plan_id": "p1", "master_addr": addr, "master_port": p,
                                   "group_name": GROUP})
                status, text = await asyncio.to_thread(_post, f"{url}/door", body.encode(), KEY)
                assert status == 400 and named in text, text
            assert len(calls) == 3 and dialled == [("127.0.0.1", gate_port)] * 2
        finally:
            await port.close()

    try:
        asyncio.run(scenario())
    finally:
        close_door("engine-a")
        gate.close()


def test_the_port_vouches_for_its_own_engine_only_and_a_relay_of_it_gets_no_key():
    import aiohttp
    from aiohttp import web

    calls, seen = [], []
    port = _port(KEY, calls)

    async def relay(request: web.Request) -> web.Response:  # a stranger's port, in front of ours
        if request.path.startswith("/flood/"):  # one that answers without end (here: 2 MiB)
            return web.Response(body=b"x" * (2 << 20))
        seen.append((request.path, request.headers.get("Authorization")))
        if request.path.startswith("/lie/"):  # a squatter's port: yes to anything
            return web.json_response({"drained": False, "proof": "0" * 64})
        async with (aiohttp.ClientSession() as http,
                    http.post(port.url + request.path, json=await request.json()) as r):
            return web.json_response(await r.json() if r.ok else {}, status=r.status)

    async def scenario() -> None:
        url = await port.start("127.0.0.1", 0)
        app = web.Application()
        app.router.add_post("/{path:.*}", relay)
        runner = web.AppRunner(app)
        await runner.setup()
        listening = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(runner, listening).start()
        relay_url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        try:
            plan = _plan(1)
            async with ServerPort(url, api_key=KEY) as trainer:
                await trainer.vouch("a", ENGINE, DEADLINE_S)  # ours: proven
                await trainer.begin(plan, "a", ENGINE, "now")
                with pytest.raises(EngineError, match="does not prove"):  # a proof the port's
                    await trainer.begin(plan, "a", ENGINE, "before")  # last process was sent
                for server_id, engine in (("a", "http://10.9.9.9:1"),  # not its engine
                                          ("b", ENGINE)):  # another id naming our URLs
                    with pytest.raises(EngineError, match="does not prove"):
                        await trainer.vouch(server_id, engine, DEADLINE_S)
                    with pytest.raises(EngineError, match="does not prove"):
                        await trainer.begin(plan, server_id, engine, "now")
            async with ServerPort(url, api_key="another-jobs-key") as other:
                with pytest.raises(EngineError, match="AREAL_LIKE_ENGINE_API_KEY"):
                    await other.vouch("a", ENGINE, DEADLINE_S)
            assert calls == [("begin", "p1", 1)]  # ours alone began a sync
            for path in ("", "/lie"):  # the proofs name our port's URL; a squatter's are none
                async with ServerPort(relay_url + path, api_key=KEY) as trainer:
                    with pytest.raises(EngineError, match="does not prove"):
                        await trainer.vouch("a", ENGINE, DEADLINE_S)
                    with pytest.raises(EngineError, match="does not prove"):
                        await trainer.begin(plan, "a", ENGINE, "now")
            assert seen == [("/vouch", None), ("/begin", None), ("/lie/vouch", None),
                            ("/lie/begin", None)]  # asked without the key
            assert calls == [("begin", "p1", 1)]
            async with ServerPort(relay_url + "/flood", api_key=KEY) as trainer:
                with pytest.raises(EngineError, match="over its limit of 65536 bytes"):
                    await trainer.vouch("a", ENGINE, DEADLINE_S)
        finally:
            await runner.cleanup()
            await port.close()

    asyncio.run(scenario())


def _begin_body(url: str, nonce: str, plan_id: str = "p1") -> bytes:
    """A /begin as the trainer sends it (``ServerPort.begin``), proof of the key included."""
    from areal_like.net.auth import begin_proof

    proof = begin_proof(KEY, nonce, "a", "now", url, ENGINE, plan_id, 1, 30.0)
    return json.dumps({"plan_id": plan_id, "version": 1, "seconds": 30.0, "nonce": nonce,
                       "proof": proof}).encode()


def _answers(port: SyncPort, route: str, bodies, key: str = KEY) -> list[tuple[int, str]]:
    async def scenario() -> list[tuple[int, str]]:
        url = await port.start("127.0.0.1", 0)
        try:
            return [await asyncio.to_thread(_post, f"{url}{route}", body, key)
                    for body in bodies(url)]
        finally:
            await port.close()

    return asyncio.run(scenario())


def test_a_replayed_begin_is_refused_and_begins_nothing():
    calls = []

    def bodies(url: str) -> list[bytes]:
        first = _begin_body(url, "ab" * 16)
        return [first, first, _begin_body(url, "cd" * 16, "p2")]

    answers = _answers(_port(KEY, calls), "/begin", bodies, key="")
    assert [status for status, _ in answers] == [200, 409, 200], answers
    assert "replayed" in answers[1][1], answers
    assert calls == [("begin", "p1", 1), ("begin", "p2", 1)]  # the replay began nothing


def test_an_adapter_outside_the_push_directories_is_refused_alike_whether_it_exists(tmp_path,
                                                                                   pushed):
    """/adapter outside the push directories (.., links, others' roots) is refused alike."""
    calls = []

    async def adapter(plan):
        calls.append(plan.payloads[0])
        return SyncDone(server_id="a", policy_version=1, ok=True)

    root = tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}1_")
    os.symlink(str(tmp_path), os.path.join(root, "v1-link"))
    open_root = tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}2_")
    os.chmod(open_root, 0o755)
    paths = [str(tmp_path), str(tmp_path / "not-here"), "/etc", f"{root}/../../etc",
             f"{root}/v1-link", f"{open_root}/v1-abcdef", pushed]
    plans = [msgspec.json.encode(msgspec.structs.replace(_plan(1), path="disk", payloads=[path]))
             for path in paths]
    try:
        answers = _answers(_port(KEY, calls, adapter=adapter), "/adapter", lambda url: plans)
    finally:
        os.unlink(os.path.join(root, "v1-link"))
        os.rmdir(root)
        os.rmdir(open_root)
    assert [status for status, _ in answers] == [400] * 6 + [200], answers
    assert len({text for _, text in answers[:6]}) == 1  # says nothing of what exists
    assert calls == [pushed]
