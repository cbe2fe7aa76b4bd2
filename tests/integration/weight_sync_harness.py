"""Shared by the weight-sync tests: start_system, Driver, start_pusher; System and Pusher (a
buffer and engines shared by a module's tests, a trainer per test).

A Driver with ``fault`` kills its engine by PID (SIGKILL) at one point of the first push reaching
it: "rendezvous" (before it joins the group), "session" (paused, before its first bucket),
"bucket" (after its first bucket) or "done" (after /end_weight_update, before the trainer knows);
then it stops heartbeating, as a dead rollout server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import threading
from pathlib import Path

import pytest
from test_trainer_weight_sync import RUNNER, STARTUP_S, read_json

from tests.conftest import Spawner, wait_until

HERE = Path(__file__).resolve().parent
PUSHER = HERE.parent / "weight_pusher.py"


def write_config(tmp_path: Path, free_port, overrides: list[str]) -> tuple[object, Path]:
    from areal_like.settings.config import load_config, to_yaml

    cfg = load_config([f"run_dir={tmp_path}", "security.curve=false",
                       f"buffer.address=tcp://127.0.0.1:{free_port()}",
                       f"buffer.pub_address=tcp://127.0.0.1:{free_port()}",
                       "rollout.engine.max_running_requests=4",
                       "rollout.engine.max_total_tokens=2048", *overrides])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    return cfg, path


def start_system(tmp_path: Path, spawn_python, wait_until, cfg_path: Path, server_ids: list[str]):
    """The buffer and one engine per server id; returns ({id: engine Popen}, {id: url})."""
    spawn_python("buffer", ["--config-file", cfg_path], capture=False)
    return start_engines(tmp_path, spawn_python, wait_until, cfg_path, server_ids)


def start_engines(tmp_path: Path, spawn_python, wait_until, cfg_path: Path, server_ids: list[str]):
    """One engine per server id, reporting its weights to tmp_path/<id> (``engine_at``)."""
    engines = {sid: spawn_python(RUNNER, [HERE / "test_trainer_weight_sync.py", "engine", cfg_path,
                                          tmp_path / sid],
                                 capture=False) for sid in server_ids}
    urls = {sid: wait_until(lambda sid=sid: read_json(tmp_path / sid)
                                            and (tmp_path / f"{sid}.url").read_text(),
                            STARTUP_S, 0.2, f"engine {sid}") for sid in engines}
    return engines, urls


def write_job_key(run_dir: Path, key: str) -> None:
    """Write key as the job's engine key in run_dir; the pusher drives the engines with it."""
    from areal_like.net.auth import KEY_FILE

    path = run_dir / KEY_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(key + "\n")
    path.chmod(0o600)


def start_pusher(spawn_python, cfg_path: Path, out: Path, pushes: list[dict]):
    """The trainer stand-in (tests/weight_pusher.py): it drives the members' engines."""
    return spawn_python(RUNNER, [PUSHER, cfg_path, out, json.dumps(pushes)], capture=False)


# fault -> (the engine route it fires at, whether before the call reaches the engine)
FAULT_AT = {"rendezvous": ("/init_weights_update_group", True),
            "session": ("/update_weights_from_distributed", True),  # paused, session open
            "bucket": ("/update_weights_from_distributed", False),
            "done": ("/end_weight_update", False)}
BEFORE_PAUSE = {"/init_weights_update_group"}  # a push joins the group before it pauses


class FaultProxy:
    """HTTP proxy before one engine; SIGKILLs it (group: its pgroup) at fault in push at_pause."""

    def __init__(self, target: str, fault: str, pid: int, killed: threading.Event,
                 group: bool = False, at_pause: int = 1):
        self.target, self.fault, self.pid, self.killed, self.group = (
            target.rstrip("/"), fault, pid, killed, group)
        self.at_pause, self.pauses = at_pause, 0
        self.ready = threading.Event()
        self.url = ""
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True,
                                       name=f"fault-proxy-{fault}")
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("the fault proxy did not start")

    def kill(self) -> None:
        if not self.killed.is_set():
            self.killed.set()
            (os.killpg if self.group else os.kill)(self.pid, signal.SIGKILL)

    async def _forward(self, request):
        import aiohttp
        from aiohttp import web

        route, before = FAULT_AT[self.fault]
        self.pauses += request.path == "/pause_generation"
        hit = request.path == route and self.pauses + (route in BEFORE_PAUSE) >= self.at_pause
        if hit and before:
            self.kill()  # the call then finds no engine: it never reaches the rendezvous
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type")}
        try:
            async with aiohttp.ClientSession() as session, session.request(
                    request.method, self.target + request.path_qs, headers=headers,
                    data=await request.read()) as answer:
                body, status = await answer.read(), answer.status
                kind = answer.headers.get("Content-Type", "application/json")
        except aiohttp.ClientError as e:
            return web.Response(status=502, text=f"fault proxy: {e}")
        if hit and not before and status == 200:
            self.kill()
        return web.Response(status=status, body=body, headers={"Content-Type": kind})

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.loop, self.stopped = asyncio.get_running_loop(), asyncio.Event()
        self.ready.set()
        await self.stopped.wait()
        await runner.cleanup()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.thread.join(10)


class SyncStandIn:
    """A real rollout sync port for engine_url on its own loop thread; calls: plan ids seen."""

    def __init__(self, server_id: str, engine_url: str, key: str, *, kind: str = "embedded",
                 door_url: str | None = None, incarnation: str = ""):
        from areal_like.engines import engine_client
        from areal_like.weights.server_sync import apply_adapter_sync, open_door
        from rollout_server.sync_port import SyncPort

        self.door_url, self.calls = door_url or engine_url, []

        async def begin(body) -> bool:
            self.calls.append(("begin", body.plan_id))
            return False

        async def adapter(plan):
            return await apply_adapter_sync(self.engine, plan, server_id)

        def end(body) -> None:
            self.calls.append(("end", body.plan_id, body.ok))

        def door(body) -> int:
            return open_door(self.door_url, key, body.master_addr, body.master_port,
                             body.group_name)

        self.port = SyncPort(key, server_id, engine_url, incarnation=incarnation,
                             rendezvous=("127.0.0.1", 0), door=door, begin=begin,
                             adapter=adapter, end=end)  # the tests' master_addr
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name=f"sync-port-{server_id}")
        self.thread.start()
        self.engine = engine_client(kind, self.door_url, api_key=key)
        self.url = self._run(self.port.start("127.0.0.1", 0))

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(STARTUP_S)

    def close(self) -> None:
        from areal_like.weights.server_sync import close_door

        async def closing() -> None:
            await self.port.close()
            await self.engine.close()

        try:
            self._run(closing())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(STARTUP_S)
            close_door(self.door_url)


class Driver(threading.Thread):
    """Rollout server stand-in: registers, heartbeats; stops as a dead one when its engine dies."""

    def __init__(self, server_id: str, url: str, cfg, *, fault: str | None = None,
                 engine_pid: int | None = None, fresh: bool = False, sglang: str | None = None,
                 at_pause: int = 1):
        super().__init__(daemon=True, name=f"driver-{server_id}")
        self.server_id, self.url, self.address, self.fault, self.pid = (
            server_id, url, cfg.buffer.address, fault, engine_pid)
        self.run_dir = cfg.run_dir
        self.at_pause = at_pause  # the fault fires in the push of this pause (FaultProxy)
        # ``sglang``: the real SGLang's API key (the job's: the trainer drives it with it); the
        # fault kills its process group, ``engine_pid`` its id
        self.sglang = sglang
        self.fresh = fresh  # registers as a new process (Register.fresh), as a started server does
        self.incarnation = secrets.token_hex(8)  # one stand-in, one process (Register.incarnation)
        self.stop = threading.Event()
        self.killed = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            # surfaced by the test (a thread's exception is otherwise only printed)
            self.error = e

    async def _main(self) -> None:
        import msgspec

        from areal_like.engines.sglang import SGLangClient
        from areal_like.net.auth import engine_api_key
        from areal_like.net.dealer import Client
        from areal_like.wire.protocol import Heartbeat, HeartbeatAck, Register, RegisterAck
        from rollout_server.episode import as_version

        client = Client(self.address, timeout_s=10)
        proxy = None if self.fault is None else FaultProxy(
            self.url, self.fault, self.pid, self.killed, group=self.sglang is not None,
            at_pause=self.at_pause)
        url = self.url if proxy is None else proxy.url
        kind = "sglang" if self.sglang else "embedded"
        port = SyncStandIn(self.server_id, url, engine_api_key(self.run_dir, make=True),
                           kind=kind, door_url=self.url, incarnation=self.incarnation)
        engine = SGLangClient(self.url, api_key=self.sglang, timeout_s=5)
        register = Register(server_id=self.server_id, engine_url=url, engine_ranks=1,
                            policy_version=0, fresh=self.fresh, incarnation=self.incarnation,
                            engine_kind=kind, sync_url=port.url)
        # as a rollout server does: a restart is let in once the old process is silent for
        # buffer.heartbeat_timeout_s (``id_in_use`` until then)
        while not isinstance(client.request(register), RegisterAck) and not self.stop.is_set():
            await asyncio.sleep(0.2)
        served = 0
        try:
            while not self.stop.is_set() and not self.killed.is_set():
                ack = client.request(Heartbeat(server_id=self.server_id, policy_version=served,
                                               incarnation=self.incarnation))
                if isinstance(ack, HeartbeatAck) and not ack.known:
                    # expired (this thread starved past buffer.heartbeat_timeout_s on a loaded
                    # machine): join again, as a rollout server does; left out, a push waiting
                    # for every member would wait forever
                    client.request(msgspec.structs.replace(register, policy_version=served))
                with contextlib.suppress(Exception):  # a dying engine: the last version stands
                    served = as_version(await engine.weight_version(), served)
                await asyncio.sleep(0.1)
        finally:
            await engine.close()
            client.close()
            await asyncio.to_thread(port.close)
            if proxy is not None:
                proxy.close()


def engine_at(tmp_path: Path, sid: str, version: int):
    """The engine's last weights report if it serves ``version`` (else None)."""
    r = read_json(tmp_path / sid)
    return r if r and r["version"] == str(version) else None


class System:
    """A buffer and engines with their Drivers, shared by a module's tests (a module fixture)."""

    def __init__(self, root: Path, overrides: list[str], server_ids: list[str]):
        from areal_like.net.dealer import Client
        from areal_like.net.distributed import free_port

        self.root, self.spawn, self.version = root, Spawner(root), 0
        self.cfg, self.cfg_path = write_config(root, free_port, overrides)
        self.drivers: dict[str, Driver] = {}
        self.buffer = Client(self.cfg.buffer.address, timeout_s=10)
        try:
            self.engines, self.urls = start_system(root, self.spawn, wait_until, self.cfg_path,
                                                   server_ids)
            for sid in server_ids:
                self.drivers[sid] = Driver(sid, self.urls[sid], self.cfg)
                self.drivers[sid].start()
        except BaseException:
            self.close()
            raise

    def versions(self, n: int) -> list[int]:
        """The next n versions: each test's pushes go past every earlier one's."""
        self.version += n
        return list(range(self.version - n + 1, self.version + 1))

    def roster(self) -> list:
        from areal_like.wire.protocol import RosterRequest

        return sorted(self.buffer.request(RosterRequest()).members, key=lambda m: m.server_id)

    def settle(self, timeout_s: float = 60.0) -> None:
        """Until the roster is this system's own members again, all alive (between tests)."""
        wait_until(lambda: [m.server_id for m in self.roster()] == sorted(self.drivers),
                   timeout_s, 0.1, f"the roster back to {sorted(self.drivers)}")
        assert all(e.poll() is None for e in self.engines.values()), "a shared engine died"
        assert all(d.error is None and d.is_alive() for d in self.drivers.values()), [
            d.error for d in self.drivers.values()]

    def close(self) -> None:
        for d in self.drivers.values():
            d.stop.set()
        for d in self.drivers.values():
            d.join(timeout=15)
        self.buffer.close()
        self.spawn.cleanup()


class Pusher:
    """tests/weight_pusher.py run by one test against a System; its config: the System's plus
    overrides. ``report(name)`` fails at once if the trainer or a Driver in ``drivers`` died."""

    def __init__(self, spawn_python, system: System, out: Path, pushes: list[dict],
                 overrides: tuple | list = (), drivers: tuple | list = ()):
        from areal_like.settings.config import load_daemon_config, to_yaml

        cfg_path = out / "pusher.yaml"
        cfg_path.write_text(to_yaml(load_daemon_config(["--config-file", str(system.cfg_path),
                                                        *overrides])))
        self.out, self.drivers = out, [*system.drivers.values(), *drivers]
        self.proc = start_pusher(spawn_python, cfg_path, out, pushes)

    def report(self, name: str, timeout_s: float):
        def read():
            assert self.proc.poll() in (None, 0), (
                f"the trainer died (exit {self.proc.returncode}); see its log above")
            assert all(d.error is None for d in self.drivers), [d.error for d in self.drivers]
            return read_json(self.out / name)

        return wait_until(read, timeout_s, 0.2, f"the trainer's {name}")

    def exited(self, timeout_s: float = 60.0) -> None:
        """Its pushes done, it exits 0 (its group and buffers released before the next test)."""
        assert self.proc.wait(timeout=timeout_s) == 0


def module_system(name: str, overrides: list[str], server_ids: list[str]):
    """A module's fixtures: ``system`` (a System shared by its tests) and ``settled`` (autouse:
    the roster back to the system's own members before and after each test)."""
    @pytest.fixture(scope="module")
    def system(tmp_path_factory):
        s = System(tmp_path_factory.mktemp(name), overrides, server_ids)
        yield s
        s.close()

    @pytest.fixture(autouse=True)
    def settled(system):
        system.settle()
        yield
        system.settle()

    return system, settled
