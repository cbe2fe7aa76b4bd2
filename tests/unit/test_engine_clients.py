"""Engine clients and the SGLang launcher against a scripted HTTP server (real: tests/vllm)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import uuid
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

import rollout_server.server as server_module
from areal_like.engines import engine_client
from areal_like.engines.client import KEEPALIVE_S, EngineError, GenerateOutput
from areal_like.engines.sglang import SGLangClient
from areal_like.engines.vllm import VLLMClient
from areal_like.net.distributed import free_port
from areal_like.settings.config import ConfigError, EngineConfig, ModelConfig
from areal_like.settings.schema import RunConfig
from areal_like.weights.plan import BucketSpec, SyncMember, WeightSyncPlan
from areal_like.weights.push import apply_weight_sync
from rollout_server.engine_process import StartAborted, healthy
from rollout_server.engine_reaper import group_members
from rollout_server.episode import generate_sample, segment_versions
from rollout_server.launch_sglang import SGLangProcess, sglang_command


class Scripted:
    """An aiohttp app whose handlers pop scripted answers per path and record every request."""

    def __init__(self):
        self.calls: list[tuple[str, object]] = []
        self.auth: list[tuple[str, str | None]] = []  # (path, its Authorization header)
        self.peers: list[tuple] = []  # each request's client address: one per connection
        self.script: dict[str, list] = {}
        self.app = web.Application()
        self.app.router.add_route("*", "/{path:.*}", self.handle)
        self.runner: web.AppRunner | None = None
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        body = await request.text()
        self.calls.append((path, json.loads(body) if body else None))
        self.auth.append((path, request.headers.get("Authorization")))
        self.peers.append(request.transport.get_extra_info("peername"))
        answers = self.script.get(path) or [(404, {"detail": "Not Found"})]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if callable(answer):
            answer = await answer(json.loads(body) if body else None)
        status, payload = answer
        if isinstance(payload, str):
            return web.Response(status=status, text=payload)
        return web.json_response(payload, status=status)

    async def start(self) -> str:
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.calls if p == path)


def gen_response(ids, logps, finish, version="0", rid="r"):
    return {"text": "", "output_ids": ids,
            "meta_info": {"id": rid, "finish_reason": finish, "prompt_tokens": 3,
                          "completion_tokens": len(ids),
                          "weight_version": version,
                          "output_token_logprobs": [[lp, t, None] for t, lp in zip(ids, logps)]}}


def run(coro_fn, kind: str = "sglang"):
    """Run ``coro_fn(server, client)`` with a fresh scripted server and a client of ``kind``."""
    async def main():
        server = Scripted()
        url = server.base = await server.start()
        client = engine_client(kind, url, timeout_s=5.0)
        try:
            return await coro_fn(server, client)
        finally:
            await client.close()
            await server.stop()
    return asyncio.run(main())


def test_generate_parses_tokens_logprobs_finish_and_version():
    async def body(server, client):
        server.script["/generate"] = [(200, gen_response([5, 6, 2], [-0.5, -1.25, -0.125],
                                                          {"type": "stop", "matched": 2},
                                                          version="3"))]
        out = await client.generate([1, 7, 8], {"max_new_tokens": 4, "temperature": 1.0},
                                    rid="r1")
        assert out == GenerateOutput(rid="r", output_ids=[5, 6, 2], logprobs=[-0.5, -1.25, -0.125],
                                     finish_reason="stop", finish_message="2", abort_status=None,
                                     weight_version="3", weight_spans=[])
        assert server.calls == [("/generate", {"input_ids": [1, 7, 8], "return_logprob": True,
                                               "stream": False, "rid": "r1",
                                               "sampling_params": {"max_new_tokens": 4,
                                                                   "temperature": 1.0}})]
    run(body)


def vllm_answer(ids, logps, spans, finish="length"):
    """An ``/inference/v1/generate`` answer of vLLM 0.32 (one choice)."""
    return {"request_id": "r1", "choices": [{
        "index": 0, "finish_reason": finish, "token_ids": ids,
        "logprobs": {"content": [{"token_id": t, "logprob": lp} for t, lp in zip(ids, logps)]},
        "weight_versions": [{"version": v, "start": a, "end": b} for v, a, b in spans]}]}


def test_the_engine_kind_picks_the_client():
    assert type(engine_client("vllm", "http://h:1")) is VLLMClient
    for kind in ("sglang", "embedded", "url"):
        assert type(engine_client(kind, "http://h:1")) is SGLangClient


def test_vllm_takes_sglangs_sampling_params_in_its_names_and_answers_each_tokens_version():
    async def body(server, client):
        server.script["/inference/v1/generate"] = [(200, vllm_answer(
            [30, 31, 80], [-1.5, -0.25, -3.0], [("20", 0, 1), ("21", 1, 3)], finish="abort"))]
        out = await client.generate([1, 7], {
            "max_new_tokens": 8, "temperature": 0.7, "top_p": 1.0, "top_k": -1,
            "stop_token_ids": [2], "ignore_eos": True, "sampling_seed": 5, "n": 1}, rid="q")
        assert out == GenerateOutput(rid="r1", output_ids=[30, 31, 80],
                                     logprobs=[-1.5, -0.25, -3.0], finish_reason="abort",
                                     finish_message="", abort_status=None, weight_version="21",
                                     weight_spans=[("20", 0, 1), ("21", 1, 3)])
        assert server.calls == [("/inference/v1/generate", {
            "request_id": "q", "token_ids": [1, 7], "stream": False,
            "sampling_params": {"max_tokens": 8, "temperature": 0.7, "top_p": 1.0, "top_k": 0,
                                "stop_token_ids": [2], "ignore_eos": True, "seed": 5,
                                "logprobs": 0}})]
    run(body, "vllm")


SHAPE = r"/inference/v1/generate: HTTP 200: .unexpected"


@pytest.mark.parametrize("params, answer, error", [
    ({"regex": "a+"}, None, r"sampling params \['regex'\]"),  # refused before anything is sent
    ({"n": 2}, None, r"sampling params \['n != 1'\]"),
    ({}, {"choices": []}, SHAPE),
    ({}, vllm_answer([30, 31], [-1.0], []), SHAPE),  # a token without its log-prob
    ({}, vllm_answer([30], [-1.0], [], finish="error"), SHAPE),
])
def test_vllm_refuses_params_it_does_not_take_and_answers_of_another_shape(params, answer, error):
    async def body(server, client):
        server.script["/inference/v1/generate"] = [(200, answer)]
        with pytest.raises(EngineError, match=error):
            await client.generate([1], {"max_new_tokens": 2, **params})
        assert server.count("/inference/v1/generate") == (answer is not None)
    run(body, "vllm")


@pytest.mark.parametrize("kind, route, naming", [
    ("sglang", "/generate", "lora_path"), ("vllm", "/inference/v1/generate", "model")])
def test_a_generate_under_an_adapter_names_it_is_counted_while_running_and_carries_its_version(
        kind, route, naming):
    answers = {"sglang": gen_response([5], [-0.5], {"type": "length"}, version="0"),
               "vllm": vllm_answer([5], [-0.5], [("0", 0, 1)])}

    async def body(server, client):
        release = asyncio.Event()

        async def held(request):
            await release.wait()
            return 200, answers[kind]
        server.script[route] = [held]
        client.adapter = ("v7", 7)
        call = asyncio.ensure_future(client.generate([1], {"max_new_tokens": 1}))
        while not server.calls:
            await asyncio.sleep(0.01)
        client.adapter = ("v8", 8)  # a sync switched it: the call in flight still names v7
        assert (client.running("v7"), client.running("v8")) == (1, 0)
        release.set()
        out = await call
        assert server.calls[0][1][naming] == "v7" and client.running("v7") == 0
        assert (out.weight_version, out.weight_spans) == ("7", [])
    run(body, kind)


def test_generate_is_not_retried_after_it_may_have_run():
    async def body(server, client):
        server.script["/generate"] = [(500, {"error": {"message": "boom"}})]
        with pytest.raises(EngineError) as e:
            await client.generate([1], {"max_new_tokens": 1})
        assert (e.value.status, e.value.message) == (500, "boom")
        assert server.count("/generate") == 1

        async def slow(_):
            await asyncio.sleep(1.0)
            return 200, gen_response([], [], {"type": "abort", "message": "Aborted"})
        server.script["/generate"] = [slow]
        with pytest.raises(EngineError) as e:  # aborted at 0.3 s without a token: a timeout
            await client.generate([1], {"max_new_tokens": 1}, timeout_s=0.3)
        assert e.value.status is None and "Timeout" in e.value.message
        assert server.count("/generate") == 2  # one more call, no retry
    run(body)


def test_a_generate_past_its_timeout_is_aborted_and_keeps_what_it_made(monkeypatch):
    """No abort answer: a timeout."""
    async def body(server, client):
        aborted = asyncio.Event()

        async def held(req):
            await aborted.wait()  # a real engine answers the generate once its rids are aborted
            return 200, [gen_response([4, 5], [-1.0, -2.0], {"type": "abort"}, rid=r)
                         for r in req["rid"]]

        async def abort(req):
            aborted.set()
            return 200, {}
        server.script["/generate"], server.script["/abort_request"] = [held], [abort]
        outs = await client.generate_batch([[1], [2]], [{"max_new_tokens": 8}] * 2, timeout_s=0.3)
        assert [(o.output_ids, o.finish_reason) for o in outs] == [([4, 5], "abort")] * 2
        rids = server.calls[0][1]["rid"]
        assert len(set(rids)) == 2 and [b for p, b in server.calls if p == "/abort_request"] == [
            {"rid": r, "abort_all": False} for r in rids]

        # the aborts go out together: this engine answers none until all of a batch's arrived
        arrived, all_in = [], asyncio.Event()

        async def held_batch(req):
            await all_in.wait()
            return 200, [gen_response([7], [-1.0], {"type": "abort"}, rid=r) for r in req["rid"]]

        async def abort_together(req):
            arrived.append(req["rid"])
            if len(arrived) == 4:
                all_in.set()
            await all_in.wait()
            return 200, {}
        server.script["/generate"], server.script["/abort_request"] = [held_batch], [abort_together]
        outs = await client.generate_batch([[1]] * 4, [{"max_new_tokens": 8}] * 4, timeout_s=0.3)
        assert [o.output_ids for o in outs] == [[7]] * 4 and len(set(arrived)) == 4

        async def wedged(_):
            await asyncio.sleep(5.0)
            return 200, gen_response([4], [-1.0], {"type": "length", "length": 1})
        monkeypatch.setattr("areal_like.engines.sglang.ABORT_GRACE_S", 0.3)
        server.script["/generate"] = [wedged]
        with pytest.raises(EngineError, match="Timeout"):
            await client.generate([1], {"max_new_tokens": 1}, timeout_s=0.3)
    run(body)


def test_idempotent_calls_retry_on_5xx_within_the_timeout_and_generate_on_refused_connection():
    async def body(server, client):
        unreachable = SGLangClient(f"http://127.0.0.1:{free_port()}", max_attempts=2)
        with pytest.raises(EngineError) as e:  # bounded attempts, then an error without status
            await unreachable.pause_generation()
        assert e.value.status is None and not await unreachable.health()
        await unreachable.close()

        server.script["/model_info"] = [(503, "starting"), (503, "starting"),
                                        (200, {"weight_version": "7"})]
        assert await client.weight_version() == "7"
        assert server.count("/model_info") == 3
        # the timeout bounds the whole call, retries included (without it: 4 attempts)
        server.script["/pause_generation"] = [(503, "busy")]
        with pytest.raises(EngineError) as e:
            await client.pause_generation(timeout_s=0.5)
        assert e.value.status == 503 and 1 <= server.count("/pause_generation") <= 2

        # connection refused before anything was sent: safe even for generate
        late = Scripted()
        late.script["/generate"] = [(200, gen_response([9], [-0.5],
                                                       {"type": "length", "length": 1}))]
        late_client = SGLangClient(f"http://127.0.0.1:{late.port}")
        starter = asyncio.get_running_loop().call_later(
            0.1, lambda: asyncio.ensure_future(late.start()))
        try:
            out = await late_client.generate([1], {"max_new_tokens": 1})
            assert out.output_ids == [9] and late.count("/generate") == 1
        finally:
            starter.cancel()
            await late_client.close()
            await late.stop()
    run(body)


def test_a_connection_idle_past_the_keepalive_is_not_reused():
    async def body(server, client):
        server.script["/model_info"] = [(200, {"model_path": "m"})]
        for _ in range(2):
            await client.model_info()
        assert len(server.peers) == 2 and server.peers[0] == server.peers[1]  # reused when fresh
        await asyncio.sleep(KEEPALIVE_S + 0.5)  # the idleness is the behaviour under test
        await client.model_info()
        assert server.peers[2] != server.peers[1]
    assert KEEPALIVE_S < 5
    run(body)


def test_error_bodies_of_every_sglang_shape_become_the_message():
    async def body(server, client):
        server.script["/pause_generation"] = [
            (400, {"message": "bad mode", "type": "Bad Request", "code": 400})]
        server.script["/init_weights_update_group"] = [
            (400, {"success": False, "message": "rendezvous failed"})]
        server.script["/update_weights_from_distributed"] = [
            (200, {"success": False, "message": "not in session"})]
        server.script["/abort_request"] = [
            (400, {"error": "invalid type: string \"x\", expected a boolean"})]
        cases = [
            (client.pause_generation("bogus"), 400, "bad mode"),
            (client.init_weights_update_group(master_address="h", master_port=1, rank_offset=1,
                                              world_size=2, group_name="g", backend="gloo"),
             400, "rendezvous failed"),
            (client.update_weights_from_distributed(names=["w"], dtypes=["float32"], shapes=[[2]],
                                                    group_name="g", weight_version="1",
                                                    flush_cache=True),
             200, "not in session"),
            (client.abort_request("x"), 400, 'invalid type: string "x", expected a boolean'),
        ]
        for call, status, message in cases:
            with pytest.raises(EngineError) as e:
                await call
            assert (e.value.status, e.value.message) == (status, message)
        assert server.count("/pause_generation") == 1  # 4xx is never retried
    run(body)


def test_weight_session_endpoints_missing_on_older_servers_are_detected_once():
    async def body(server, client):
        assert await client.begin_weight_update() is False  # scripted server: 404 for unknown paths
        assert client.weight_session_supported is False
        assert await client.end_weight_update() is False
        assert server.count("/begin_weight_update") == 1 and server.count("/end_weight_update") == 0

        newer = SGLangClient(client.base_url)
        server.script["/begin_weight_update"] = [(200, {"success": True, "message": "ok"})]
        assert await newer.begin_weight_update() is True and newer.weight_session_supported is True
        await newer.close()
    run(body)


def test_interrupted_sample_is_resumed_with_prompt_plus_tokens_and_remaining_budget():
    abort = {"type": "abort", "message": "Abort by pause", "status_code": None, "err_type": None}

    async def body(server, client):
        server.script["/generate"] = [
            (200, gen_response([10, 11], [-0.1, -0.2], abort, version="4")),
            (200, gen_response([], [], {"type": "abort", "message": "Abort in waiting queue"},
                               version="4")),
            (200, gen_response([12, 2], [-0.3, -0.4], {"type": "stop", "matched": 2}, version="5")),
        ]
        s = await generate_sample(client, [1, 7], {"temperature": 1.0}, 8,
                                  current_version_fn=lambda: 99)
        assert (s.output_ids, s.logprobs, s.versions) == ([10, 11, 12, 2], [-0.1, -0.2, -0.3, -0.4],
                                                          [4, 4, 5, 5])
        assert s.finish_reason == "stop" and s.resumed == 2
        sent = [b for p, b in server.calls if p == "/generate"]
        assert [b["input_ids"] for b in sent] == [[1, 7], [1, 7, 10, 11], [1, 7, 10, 11]]
        assert [b["sampling_params"]["max_new_tokens"] for b in sent] == [8, 6, 6]

        # an abort that exhausts the budget finishes as length; one with an HTTP status: an error
        server.script["/generate"] = [(200, gen_response([3, 4], [-1.0, -1.0], abort, version="5"))]
        s = await generate_sample(client, [1], {}, 2, current_version_fn=lambda: 0)
        assert s.finish_reason == "length" and s.output_ids == [3, 4]
        server.script["/generate"] = [(200, gen_response([], [], {**abort, "status_code": 400}))]
        with pytest.raises(EngineError):
            await generate_sample(client, [1], {}, 2, current_version_fn=lambda: 0)
    run(body)


def test_segment_versions_use_spans_and_a_default_label_is_the_version_served_when_sent():
    out = GenerateOutput(rid="", output_ids=[1, 2, 3, 4], logprobs=[0.0] * 4, finish_reason="stop",
                         finish_message="", abort_status=None, weight_version="8",
                         weight_spans=[("7", 0, 3), ("8", 3, 4)])
    assert segment_versions(out, fallback=0) == [7, 7, 7, 8]
    default = GenerateOutput(rid="", output_ids=[1, 2], logprobs=[0.0, 0.0], finish_reason="length",
                             finish_message="", abort_status=None, weight_version="default")
    assert segment_versions(default, fallback=3) == [3, 3]

    async def body(server, client):
        served = [0]

        async def across_a_sync(_):
            served[0] = 1  # the server applied a sync while the request was held
            out = gen_response([4, 5], [-1.0, -2.0], {"type": "length", "length": 2},
                               version="1")
            out["meta_info"]["weight_versions"] = [{"version": "default", "start": 0, "end": 1},
                                                   {"version": "1", "start": 1, "end": 2}]
            return 200, out
        server.script["/generate"] = [across_a_sync]
        s = await generate_sample(client, [1], {}, 2, current_version_fn=lambda: served[0])
        assert s.output_ids == [4, 5] and s.versions == [0, 1]
    run(body)


def test_sglang_command_passes_every_option_through():
    argv = sglang_command(ModelConfig(path="/m"), EngineConfig(kind="sglang", tp_size=2, sglang={
        "skip_server_warmup": True, "enable_metrics": False, "cuda_graph_max_bs": 8}), 30001)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert argv[3:] == ["--model-path", "/m", "--host", "127.0.0.1", "--port", "30001",
                        "--weight-version", "0", "--tp-size", "2", "--dtype", "float32",
                        "--skip-server-warmup", "--cuda-graph-max-bs", "8"]


@pytest.mark.parametrize("sglang,want", [
    ({}, ["--dtype", "bfloat16"]),  # model.dtype: what the trainer sends, not config.json's choice
    ({"dtype": "float16"}, ["--dtype", "float16"]),  # the user's pass-through flag wins
    ({"dtype": None}, []),  # set to null: SGLang's own default (config.json)
])
def test_sglang_dtype_follows_model_dtype_unless_passed_through(sglang, want):
    argv = sglang_command(ModelConfig(path="/m", dtype="bfloat16"),
                          EngineConfig(kind="sglang", sglang=sglang), 1)
    got = [a for i, a in enumerate(argv) if a == "--dtype" or (i and argv[i - 1] == "--dtype")]
    assert got == want


def test_tp_size_has_one_source_of_truth():
    with pytest.raises(ConfigError, match=r"rollout.engine.sglang.tp_size is not passed through"):
        EngineConfig(kind="sglang", sglang={"tp_size": 2})
    with pytest.raises(ConfigError, match=r"rollout.engine.tp_size=2 is invalid"):
        EngineConfig(kind="embedded", tp_size=2)
    assert SGLangProcess(ModelConfig(path="/m"),
                         EngineConfig(kind="sglang", tp_size=4)).engine_ranks == 4


def _plan(reform: bool, buckets: int = 2, deadline_s: float = 10.0):
    return WeightSyncPlan(policy_version=3, group_name="g", master_addr="10.0.0.1",
                          master_port=29500, world_size=3, backend="gloo", reform=reform,
                          members=[SyncMember(server_id="s0", rank_offset=1),
                                   SyncMember(server_id="s1", rank_offset=2)],
                          buckets=[BucketSpec(names=[f"w{i}"], dtypes=["float32"], shapes=[[2, 2]])
                                   for i in range(buckets)], deadline_s=deadline_s)


OK = (200, {"success": True, "message": "ok"})


def test_weight_sync_follows_the_contract_in_order_and_a_failed_one_always_continues():
    async def body(server, client):
        order = ["/destroy_weights_update_group", "/init_weights_update_group", "/pause_generation",
                 "/begin_weight_update", *["/update_weights_from_distributed"] * 2,
                 "/end_weight_update", "/continue_generation"]  # one update a bucket
        server.script = {path: [OK] for path in order}
        done = await apply_weight_sync(client, _plan(reform=True), "s1")
        assert done.ok and done.server_id == "s1" and done.policy_version == 3 and done.pause_s > 0
        assert [p for p, _ in server.calls] == order
        bodies = dict(server.calls[:3])
        assert bodies["/init_weights_update_group"] == {"master_address": "10.0.0.1",
                                                         "master_port": 29500, "rank_offset": 2,
                                                         "world_size": 3, "group_name": "g",
                                                         "backend": "gloo"}
        assert bodies["/pause_generation"] == {"mode": "abort"}
        updates = [b for p, b in server.calls if p == "/update_weights_from_distributed"]
        # the new version label goes only with the last bucket: a half-applied sync keeps the old
        assert [(b["names"], b.get("weight_version"), b["flush_cache"]) for b in updates] == [
            (["w0"], None, False), (["w1"], "3", True)]

        # not a member: nothing is called
        n = len(server.calls)
        done = await apply_weight_sync(client, _plan(reform=False), "s9")
        assert not done.ok and "not a member" in done.reason and len(server.calls) == n

        # a path this server does not know (a newer trainer): refused, naming it, nothing called
        done = await apply_weight_sync(client,
                                       msgspec.structs.replace(_plan(reform=False), path="shm"),
                                       "s1")
        assert (not done.ok and "unknown weight-sync path 'shm'" in done.reason
                and len(server.calls) == n)

        # a failed sync reports the reason and always continues
        server.script["/update_weights_from_distributed"] = [
            (400, {"success": False, "message": "bad shape"})]
        done = await apply_weight_sync(client, _plan(reform=False), "s0")
        assert not done.ok and "bad shape" in done.reason
        # the session is closed (or every later sync would be refused) and generation continues
        assert [p for p, _ in server.calls][-2:] == ["/end_weight_update", "/continue_generation"]

        # a rendezvous that never completes is bounded by the deadline; the engine was never paused
        async def hang(_):
            await asyncio.sleep(1.5)
            return OK
        server.calls.clear()
        server.script["/destroy_weights_update_group"] = [
            (400, {"success": False, "message": "no group"})]
        server.script["/init_weights_update_group"] = [hang]
        done = await apply_weight_sync(client, _plan(reform=True, deadline_s=0.5), "s0")
        assert not done.ok and "Timeout" in done.reason and done.pause_s == 0.0
        assert "/pause_generation" not in [p for p, _ in server.calls]
    run(body)


def test_a_vllm_weight_sync_takes_the_new_label_only_once_the_session_closes():
    async def body(server, client):
        order = ["/shutdown_weight_transfer_engine", "/init_weight_transfer_engine", "/pause",
                 "/start_weight_update", "/update_weights", "/update_weights",
                 "/finish_weight_update", "/reset_prefix_cache", "/resume"]
        server.script = {path: [OK] for path in order}
        done = await apply_weight_sync(client, _plan(reform=True), "s1")
        assert done.ok, done.reason
        assert [p for p, _ in server.calls] == order
        bodies = [b for p, b in server.calls if p in ("/update_weights", "/finish_weight_update")]
        assert [b["update_info"]["names"] for b in bodies[:2]] == [["w0"], ["w1"]]
        assert "weight_version" not in json.dumps(bodies[:2])  # no label with a bucket
        assert bodies[2] == {"weight_version": "3"}

        # a session that fails before its last bucket keeps the old label: none is sent
        server.script["/update_weights"] = [(500, {"error": "peer died"})]
        done = await apply_weight_sync(client, _plan(reform=False), "s1")
        assert not done.ok and "peer died" in done.reason
        assert server.calls[-2:] == [("/finish_weight_update", {}), ("/resume", None)]
    run(body, "vllm")


def test_a_begin_that_times_out_after_the_engine_opened_the_session_does_not_wedge_later_syncs():
    async def body(server, client):
        session, delays = [False], [2.0]  # the first begin answers after the plan's deadline
        slow_begin_done = asyncio.Event()

        async def begin(_):
            if session[0]:
                return 400, {"success": False, "message": "a session is already open"}
            session[0] = True
            await asyncio.sleep(delays.pop(0) if delays else 0.0)
            slow_begin_done.set()
            return OK

        async def end(_):
            was, session[0] = session[0], False
            return OK if was else (400, {"success": False, "message": "no session is open"})

        async def update(_):
            return OK if session[0] else (400, {"success": False, "message": "no session"})
        server.script = {"/pause_generation": [OK], "/continue_generation": [OK],
                         "/begin_weight_update": [begin], "/end_weight_update": [end],
                         "/update_weights_from_distributed": [update]}
        first = await apply_weight_sync(client, _plan(reform=False, buckets=1, deadline_s=0.5),
                                        "s0")
        assert not first.ok and server.calls[-1][0] == "/continue_generation"  # never left paused
        await asyncio.wait_for(slow_begin_done.wait(), 10)  # the engine opened the session late
        second = await apply_weight_sync(client, _plan(reform=False, buckets=1), "s0")
        assert second.ok and not session[0], second.reason
    run(body)


def sglang_process(log, api_key: str | None = None, **engine) -> SGLangProcess:
    """An SGLangProcess of model /m logging to ``log``, started by nobody yet."""
    return SGLangProcess(ModelConfig(path="/m"),
                         EngineConfig(kind="sglang", **{"startup_timeout_s": 60, **engine}),
                         str(log), api_key=api_key)


def _sglang_standin(tmp_path, monkeypatch, body: str) -> None:
    """sglang.launch_server stand-in running body, first on the engine's PYTHONPATH."""
    package = tmp_path / "standin" / "sglang"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "launch_server.py").write_text(body + "\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(package.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))


def test_a_startup_failure_names_the_exception_not_the_lines_after_it(tmp_path, monkeypatch):
    """The log is 0600 and kept."""
    log = tmp_path / "sglang-s0.log"
    log.write_text("ValueError: an earlier start\n")
    log.chmod(0o644)
    lines = ["[TP1] Scheduler hit an exception: Traceback (most recent call last):",
             "AssertionError: SGLANG_CPU_OMP_THREADS_BIND is not set",
             "[x] Received sigquit from a child process.", "[x] kill_process_tree called: pid=1"]
    for body, want in ((f"print({chr(10).join(lines)!r}, flush=True); import os; "
                        "os.kill(os.getpid(), 9)",
                        r"code -9 during startup: AssertionError: SGLANG_CPU_OMP_THREADS_BIND"),
                       ("print('bye'); raise SystemExit(1)", r"code 1 during startup: bye \(in")):
        _sglang_standin(tmp_path, monkeypatch, body)
        proc = sglang_process(log)
        with pytest.raises(RuntimeError, match=want):
            proc.start()
    assert log.stat().st_mode & 0o777 == 0o600
    assert log.read_text().startswith("ValueError: an earlier start\n")


def test_shared_memory_files_made_while_sglang_starts_are_removed_when_it_never_comes_up(
        tmp_path, monkeypatch):
    shm = f"/dev/shm/areal-like-test-{uuid.uuid4().hex}"
    _sglang_standin(tmp_path, monkeypatch,
                    f"import os, time; os.open({shm!r}, os.O_CREAT | os.O_RDWR, 0o600)\n"
                    "while True: time.sleep(0.1)")
    proc = sglang_process(tmp_path / "sglang.log")
    try:
        with pytest.raises((StartAborted, TimeoutError)):  # stopped once the file is known
            proc.start(stop_requested=lambda: shm in proc.shm)
        assert not os.path.exists(shm)
    finally:
        proc.stop()
        Path(shm).unlink(missing_ok=True)


def test_what_the_caller_does_meanwhile_runs_while_the_engine_starts_and_its_error_stops_it(
        tmp_path, monkeypatch):
    _sglang_standin(tmp_path, monkeypatch, "import time\nwhile True: time.sleep(0.1)")
    proc = sglang_process(tmp_path / "sglang.log")
    seen = []

    def meanwhile():
        seen.append(proc.proc.poll())  # launched, still running
        raise ValueError("no tokenizer")

    try:
        with pytest.raises(ValueError, match="no tokenizer"):
            proc.start(meanwhile=meanwhile)
        assert seen == [None]
        assert proc.proc.poll() is not None and not group_members(proc.proc.pid)
    finally:
        proc.stop()


def test_a_port_in_use_is_refused_naming_it_before_sglang_starts(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = sglang_process(tmp_path / "sglang.log", port=port)
        with pytest.raises(RuntimeError, match=rf":{port} \(rollout.engine.port\) is in use"):
            proc.start()
    assert proc.proc is None  # nothing was launched


def rollout_server(client, url: str) -> server_module.RolloutServer:
    """A rollout server (never started) whose engine is ``client`` at ``url``."""
    server = server_module.RolloutServer.from_run(RunConfig())
    server.client, server.engine_url = client, url
    return server


def test_the_engine_probe_says_whether_the_connection_was_refused_or_not_answered(monkeypatch):
    monkeypatch.setattr(server_module, "ENGINE_PROBE_S", 1.0)

    async def probe(url: str) -> str:
        async with SGLangClient(url) as client:
            server = rollout_server(client, url)
            await server.probe_engine(7)
        assert server.wedged
        return str(server.failure)

    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, answers nothing
    try:
        refused = asyncio.run(probe(f"http://127.0.0.1:{free_port()}"))
        mute = asyncio.run(probe(f"http://127.0.0.1:{silent.getsockname()[1]}"))
    finally:
        silent.close()
    # the engine's words quoted (areal_like/net/answers.py)
    assert 'after the failed weight sync v7: "connection failed (ConnectionRefusedError)' in refused
    assert "after the failed weight sync v7: 'TimeoutError: no answer within 1s'" in mute


@pytest.mark.parametrize("end", ["silent", "refused", "no session"])
def test_an_abandoned_sync_stops_at_the_first_call_its_engine_does_not_answer(end):
    """A 400 is an answer."""
    calls = []

    class Engine:
        async def end_weight_update(self, *, timeout_s):
            calls.append("/end_weight_update")
            if end == "no session":
                raise EngineError("/end_weight_update", 400, "no weight update session")
            raise EngineError("/end_weight_update", None, "TimeoutError: no answer within 30s"
                              if end == "silent" else "connection failed (ConnectionRefusedError)")

        async def continue_generation(self, *, timeout_s):
            calls.append("/continue_generation")

        async def health_generate(self, timeout_s):
            calls.append("/health_generate")

    server = rollout_server(Engine(), "http://e")
    asyncio.run(server.resume_abandoned(7))
    if end == "no session":
        assert calls == ["/end_weight_update", "/continue_generation", "/health_generate"]
        assert not server.wedged and server.failure is None
    else:
        assert calls == ["/end_weight_update"] and server.wedged
        assert "failed /end_weight_update after the failed weight sync v7" in str(server.failure)


def test_the_sglang_line_copied_into_our_log_never_holds_the_engine_key(tmp_path):
    key = "k3y-" + "x" * 40
    log = tmp_path / "sglang-s0.log"
    log.write_text(f"server_args=ServerArgs(model_path='/m', api_key='{key}', port=30000)\n")
    proc = sglang_process(log, api_key=key)
    proc.proc = subprocess.Popen(["false"])  # SGLang exited during startup (code 1)
    proc.proc.wait()
    why = str(proc.start_failure())
    assert key not in why and "api_key='***'" in why and "exited with code 1" in why, why


def test_the_api_key_goes_to_every_path_but_the_open_health_poll():
    async def body(server, _):
        server.script = {"/health": [(200, "")], "/health_generate": [(200, "")],
                         "/model_info": [(200, {"weight_version": "0"})]}
        async with SGLangClient(server.base, api_key="k-secret", timeout_s=5.0) as client:
            assert await client.health()
            await client.health_generate()
            await client.model_info()
        assert await asyncio.to_thread(healthy, server.base)
        return server.auth

    assert run(body) == [("/health", None), ("/health_generate", "Bearer k-secret"),
                         ("/model_info", "Bearer k-secret"), ("/health", None)]
