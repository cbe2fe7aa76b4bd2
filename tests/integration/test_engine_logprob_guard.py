"""The log-prob guard against real engines: a correct one passes, a mis-configured one is refused.

A real buffer, an embedded engine and a proxy sampling at T=1 (the run's is 0.5); each engine's
rollout server is a SyncStandIn vouching for it (no key is sent to an engine not vouched for).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import aiohttp
import pytest
import torch
from aiohttp import web
from weight_sync_harness import SyncStandIn

from areal_like.engines.sglang import SGLangClient
from areal_like.net.dealer import Client
from areal_like.net.distributed import address_toward
from areal_like.settings.config import load_config, to_yaml
from areal_like.tasks.tokenizer import load_tokenizer
from areal_like.weights.hf import build_model
from areal_like.weights.lora import (
    adapters_disabled,
    add_adapters,
    served_name,
    synced_parameters,
)
from areal_like.wire.protocol import Register
from rollout_server.engine.embedded import EmbeddedEngine
from trainer.logprob_guard import PROBE_TEXT, LogprobGuardError, run_guard
from trainer.weight_local import tensor_payload

TEMPERATURE = 0.5
KEY = "k" * 32  # the job's engine key (the embedded engines here take any)


def start_proxy(target: str,
                port: int) -> tuple[asyncio.AbstractEventLoop, threading.Thread, web.AppRunner]:
    """An SGLang-shaped engine whose log-probs ignore the temperature (T=1)."""

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        body["sampling_params"] = {**body["sampling_params"], "temperature": 1.0}
        async with aiohttp.ClientSession() as s, s.post(target + "/generate", json=body) as r:
            return web.json_response(await r.json(), status=r.status)

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/generate", generate)
    runner = web.AppRunner(app)

    async def up() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(up(), loop).result(timeout=30)
    return loop, thread, runner


def register(client: Client, server_id: str, engine_url: str, sync: SyncStandIn | None = None,
             version: int = 0) -> None:
    """server_id on the buffer's roster, its engine vouched for by ``sync`` (None: by nobody)."""
    client.request(Register(server_id=server_id, engine_url=engine_url, engine_ranks=1,
                            policy_version=version, sync_url=sync.url if sync else ""))


def job(tmp_path, spawn_python, free_port, *overrides: str):
    """The job's config (the run's temperature, small engines) and a client of its buffer."""
    cfg = load_config([f"run_dir={tmp_path}", "security.curve=false",
                       f"buffer.address=tcp://127.0.0.1:{free_port()}",
                       f"buffer.pub_address=tcp://127.0.0.1:{free_port()}",
                       "buffer.heartbeat_timeout_s=120",
                       f"task.temperature={TEMPERATURE}", "rollout.engine.max_running_requests=2",
                       "rollout.engine.max_total_tokens=1024", *overrides])
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(to_yaml(cfg))
    spawn_python("buffer", ["--config-file", cfg_path], capture=False)
    return cfg, Client(cfg.buffer.address, timeout_s=60)


def test_guard_passes_a_correct_engine_and_refuses_one_that_ignores_the_temperature(
        tmp_path, spawn_python, free_port):
    torch.manual_seed(0)
    cfg, client = job(tmp_path, spawn_python, free_port)
    engine = EmbeddedEngine(cfg.model, cfg.rollout.engine).start()
    proxy_port, proxy = free_port(), None
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    ports = {"good": SyncStandIn("good", engine.url, KEY),
             "no-temperature": SyncStandIn("no-temperature", proxy_url, KEY)}
    try:
        proxy = start_proxy(engine.url, proxy_port)
        trainer_model = build_model(cfg.model, device="cpu", dtype="float32").eval()
        # the weights the initial push delivers
        trainer_model.load_state_dict(engine.model.state_dict())
        prompt = list(load_tokenizer(cfg.model).encode(PROBE_TEXT))
        register(client, "good", engine.url, ports["good"])
        register(client, "no-temperature", proxy_url, ports["no-temperature"])
        # a member's word alone: its sync port is another's, which vouches for its own engine only
        register(client, "unvouched", proxy_url, ports["good"])

        def guard(served: list[str], tol: float = 0.05) -> list[str]:
            passed, unchecked = run_guard(trainer_model, torch.device("cpu"), rank=0, buffer=client,
                                          served=[*served, "unvouched"], prompt_ids=prompt,
                                          temperature=TEMPERATURE, tol=tol, api_key=KEY)
            # one node: the loopback URLs are the engines' own
            assert list(unchecked) == ["unvouched"] and "did not vouch" in unchecked["unvouched"]
            return passed

        # the mis-configured engine did not take the push: not probed
        assert guard(["good"]) == ["good"]
        with pytest.raises(LogprobGuardError) as e:
            guard(["good", "no-temperature"])
        msg = str(e.value)
        assert "engine no-temperature" in msg and f"127.0.0.1:{proxy_port}" in msg
        assert "trainer.logprob_guard_tol=0.05" in msg and "SGLANG_RETURN_ORIGINAL_LOGPROB" in msg
        assert "temperature 0.5" in msg and "Refusing to train" in msg
        mean = float(msg.split(" by ")[1].split(" nats")[0])
        assert mean > 0.05
        assert guard(["good", "no-temperature"], tol=mean + 1.0) == ["good", "no-temperature"]
    finally:
        client.close()
        for port in ports.values():
            port.close()
        if proxy is not None:
            loop, thread, runner = proxy
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()
        engine.stop()


def test_on_several_nodes_the_guard_probes_a_routable_engine_and_reports_a_loopback_one_unchecked(
        tmp_path, spawn_python, free_port):
    host = address_toward("198.51.100.1")  # the default route's (TEST-NET-2: nothing is sent)
    if host is None or host.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    cfg, client = job(tmp_path, spawn_python, free_port, f"rollout.engine.host={host}")
    engine = EmbeddedEngine(cfg.model, cfg.rollout.engine).start()
    # the trap: an engine answering on rank 0's own loopback, as another job's (or node's) would
    local = EmbeddedEngine(cfg.model,
                           dataclasses.replace(cfg.rollout.engine, host="127.0.0.1")).start()
    port = SyncStandIn("routable", engine.url, KEY)
    try:
        assert engine.url.startswith(f"http://{host}:")  # what a rollout server registers for it
        trainer_model = build_model(cfg.model, device="cpu", dtype="float32").eval()
        trainer_model.load_state_dict(engine.model.state_dict())
        register(client, "routable", engine.url, port)
        register(client, "loopback", local.url)
        passed, unchecked = run_guard(trainer_model, torch.device("cpu"), rank=0, buffer=client,
                                      served=["routable", "loopback"], prompt_ids=list(
                                          load_tokenizer(cfg.model).encode(PROBE_TEXT)),
                                      temperature=TEMPERATURE, tol=0.05, several_nodes=True,
                                      api_key=KEY)
        assert passed == ["routable"]
        assert (list(unchecked) == ["loopback"]
                and "set rollout.engine.host" in unchecked["loopback"])
    finally:
        client.close()
        port.close()
        engine.stop()
        local.stop()


def test_guard_probes_the_adapter_an_embedded_engine_serves_after_an_adapter_sync(
        tmp_path, spawn_python, free_port):
    torch.manual_seed(0)
    cfg, client = job(tmp_path, spawn_python, free_port, "trainer.lora.rank=4",
                      "trainer.lora.target_modules=[q_proj,v_proj,down_proj,lm_head]")
    engine = EmbeddedEngine(cfg.model, cfg.rollout.engine, lora=cfg.trainer.lora).start()
    port = SyncStandIn("s", engine.url, KEY)
    try:
        trainer_model = add_adapters(build_model(cfg.model, device="cpu", dtype="float32"),
                                     cfg.trainer.lora)
        trainer_model.load_state_dict(engine.model.state_dict())  # the same base, B = 0
        with torch.no_grad():  # a trained adapter, as a resumed job's checkpoint holds
            for name, p in trainer_model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape) * 0.3)
        trainer_model.eval()
        # the adapter alone, as a push sends it (the embedded engine reads a list of pairs)
        strategy = torch.multiprocessing.get_sharing_strategy()
        torch.multiprocessing.set_sharing_strategy("file_system")
        try:
            adapter = [(n, p.detach().clone().share_memory_())
                       for n, p in synced_parameters(trainer_model)]
            payload = tensor_payload(adapter)
        finally:
            torch.multiprocessing.set_sharing_strategy(strategy)

        async def sync() -> None:
            async with SGLangClient(engine.url, timeout_s=60) as c:
                await c.update_weights_from_tensor([payload], weight_version="3")

        asyncio.run(sync())
        register(client, "s", engine.url, port, version=3)
        prompt = list(load_tokenizer(cfg.model).encode(PROBE_TEXT))

        def guard() -> list[str]:
            return run_guard(trainer_model, torch.device("cpu"), rank=0, buffer=client,
                             served=["s"], prompt_ids=prompt, temperature=TEMPERATURE, tol=0.05,
                             adapters={"s": served_name(3, "plan")}, api_key=KEY)[0]

        assert guard() == ["s"]  # the engine serves the synced adapter, and the probe measured it
        with adapters_disabled(trainer_model), pytest.raises(LogprobGuardError):
            guard()  # the base is not what it serves: the adapter is live, so the check has teeth
    finally:
        client.close()
        port.close()
        engine.stop()
