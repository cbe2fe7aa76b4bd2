"""Pieces shared by the weight-sync fault and one-GPU-path tests (not a test module).

``start_system`` starts the real buffer daemon, the given embedded engines (each its own process,
``test_trainer_weight_sync.engine_role``: it writes the SHA-256 of its weights whenever its
served version changes) and returns their URLs; ``Driver`` plays a rollout server in a thread of
the test process (Register, Heartbeat, and each plan applied with the real
``areal_like.weights.engine_sync.apply_weight_sync``); ``start_pusher`` starts a world-size-1
trainer (``tests/weight_pusher.py``) that pushes the given versions.

A ``Driver`` applies each plan once, told apart by ``plan_id`` (a re-push of the same version is
a new plan), and keeps every attempt in ``attempts``. A ``Driver`` with ``fault`` puts a
``FaultProxy`` in front of its engine, which kills it with SIGKILL, by PID, at one point of the
first push it sees; the Driver then stops as a dead rollout server does (no ``SyncDone``, no more
heartbeats, so the buffer expires it after ``buffer.heartbeat_timeout_s``):

* ``"rendezvous"``: as it is about to join the group: the engine dies before its
  ``/init_weights_update_group`` reaches it, so it never joins and the group cannot form;
* ``"bucket"``: once its first bucket was answered (later buckets still to come);
* ``"done"``: after ``/end_weight_update`` answered, i.e. after every bucket, before ``SyncDone``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import threading
import time
from pathlib import Path

from test_trainer_weight_sync import RUNNER, STARTUP_S, _read_json

HERE = Path(__file__).resolve().parent
PUSHER = HERE.parent / "weight_pusher.py"
FAULTS = ("rendezvous", "bucket", "done")


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
    engines = {sid: spawn_python(RUNNER, [HERE / "test_trainer_weight_sync.py", "engine", cfg_path,
                                          tmp_path / sid],
                                 capture=False) for sid in server_ids}
    urls = {sid: wait_until(lambda sid=sid: _read_json(tmp_path / sid)
                                            and (tmp_path / f"{sid}.url").read_text(),
                            STARTUP_S, 0.2, f"engine {sid}") for sid in engines}
    return engines, urls


def start_pusher(spawn_python, cfg_path: Path, out: Path, pushes: list[dict],
                 drive: bool = False):
    """``drive``: the pusher drives the engines itself (its ``Driver``s then only register and
    heartbeat: no plan reaches them)."""
    return spawn_python(RUNNER, [PUSHER, cfg_path, out, json.dumps(pushes),
                                 *(["--drive"] if drive else [])], capture=False)


# fault -> (the engine route it fires at, whether before the call reaches the engine)
FAULT_AT = {"rendezvous": ("/init_weights_update_group", True),
            "bucket": ("/update_weights_from_distributed", False),
            "done": ("/end_weight_update", False)}


class FaultProxy:
    """An HTTP proxy in front of one engine that kills it (SIGKILL by PID; ``group``: its process
    group) at ``fault``. Whoever drives the engine sees only its URL (``url``), so the fault does
    not depend on who sends the weight-sync calls (trainer/WEIGHT_SYNC.md, "Where this is
    going")."""

    def __init__(self, target: str, fault: str, pid: int, killed: threading.Event,
                 group: bool = False):
        self.target, self.fault, self.pid, self.killed, self.group = (
            target.rstrip("/"), fault, pid, killed, group)
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
        hit = request.path == route
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


class Driver(threading.Thread):
    """A rollout server stand-in. ``attempts``: ``(version, plan_id, ok, seconds applying)`` for
    each plan it reported, in order; ``results[version]``: ``(ok, seconds)`` of the last plan of
    that version."""

    def __init__(self, server_id: str, url: str, address: str, *, fault: str | None = None,
                 engine_pid: int | None = None, fresh: bool = False, sglang: str | None = None):
        super().__init__(daemon=True, name=f"driver-{server_id}")
        self.server_id, self.url, self.address, self.fault, self.pid = (
            server_id, url, address, fault, engine_pid)
        # ``sglang``: the real SGLang's API key. Its engine joins through a door (as a rollout
        # server of kind sglang); the fault kills its process group, ``engine_pid`` its group id.
        self.sglang = sglang
        self.fresh = fresh  # registers as a new process (Register.fresh), as a started server does
        self.incarnation = secrets.token_hex(8)  # one stand-in, one process (Register.incarnation)
        self.stop = threading.Event()
        self.killed = threading.Event()
        self.results: dict[int, tuple[bool, float]] = {}
        self.attempts: list[tuple[int, str, bool, float]] = []
        self.taken: list[tuple[int, str]] = []  # (version, plan_id) of each plan it began to apply
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            # surfaced by the test (a thread's exception is otherwise only printed)
            self.error = e

    async def _main(self) -> None:
        from areal_like.net.dealer import Client
        from areal_like.net.sglang_client import SGLangClient
        from areal_like.weights.engine_sync import apply_weight_sync, local_door
        from areal_like.wire.protocol import Heartbeat, Register

        client = Client(self.address, timeout_s=10)
        proxy = None if self.fault is None else FaultProxy(
            self.url, self.fault, self.pid, self.killed, group=self.sglang is not None)
        url = self.url if proxy is None else proxy.url
        sg = SGLangClient(url, api_key=self.sglang, timeout_s=60)
        client.request(Register(server_id=self.server_id, engine_url=url, engine_ranks=1,
                                policy_version=0, fresh=self.fresh, incarnation=self.incarnation))
        served, handled, applying, applying_plan = 0, set(), None, (0, "", 0.0)
        try:
            # Heartbeats go on while a plan is applied (as a rollout server's do): a member busy in
            # a long join must not look dead to the buffer.
            # a dead server stops heartbeating
            while not self.stop.is_set() and not self.killed.is_set():
                plan = client.request(Heartbeat(server_id=self.server_id,
                                                policy_version=served)).pending_plan
                if applying is not None and applying.done():
                    version, plan_id, t0 = applying_plan
                    done = applying.result()
                    self.results[version] = (done.ok, time.monotonic() - t0)
                    self.attempts.append((version, plan_id, done.ok, self.results[version][1]))
                    client.request(done)
                    served, applying = version if done.ok else served, None
                if applying is None and plan is not None and plan.plan_id not in handled:
                    handled.add(plan.plan_id)
                    self.taken.append((plan.policy_version, plan.plan_id))
                    applying = asyncio.create_task(apply_weight_sync(
                        sg, plan, self.server_id,
                        door=local_door(sg.base_url, None) if self.sglang is not None else None))
                    applying_plan = (plan.policy_version, plan.plan_id, time.monotonic())
                await asyncio.sleep(0.1)
        finally:
            if applying is not None and not applying.done():  # killed mid-apply: it reports nothing
                applying.cancel()
                await asyncio.gather(applying, return_exceptions=True)
            await sg.close()
            client.close()
            if proxy is not None:
                proxy.close()


def engine_at(tmp_path: Path, sid: str, version: int):
    """The engine's last weights report if it serves ``version`` (else None)."""
    r = _read_json(tmp_path / sid)
    return r if r and r["version"] == str(version) else None

