"""The embedded engine over real HTTP on 127.0.0.1 (one per module): SGLang shapes and control;
its in-process ``/generate`` (rollout_server/engine/local.py) against the same engine over HTTP:
answers, errors, the pause gate, aborts, and calls when the engine stops."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from test_engine_scheduler import greedy

from areal_like.engines.client import EngineError
from areal_like.engines.sglang import SGLangClient
from areal_like.settings.config import EngineConfig, ModelConfig
from areal_like.weights.hf import build_model
from benchmarks.weight_checksum import state_checksum
from rollout_server.engine import EmbeddedEngine
from rollout_server.engine.api import max_text_chars
from rollout_server.engine.local import LocalGenerate

HTTP_TIMEOUT_S = 120.0
MODEL = ModelConfig(max_position_embeddings=256)


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    e = EmbeddedEngine(MODEL, EngineConfig(max_running_requests=8)).start()
    try:
        yield e
    finally:
        e.stop()


def call(engine, path: str, body=None, method: str | None = None) -> tuple[int, str]:
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(engine.url + path, data=data,
                                 method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def gen(engine, **body) -> dict | list:
    status, text = call(engine, "/generate", body)
    assert status == 200, text
    return json.loads(text)


def test_generate_shape_and_logprobs(engine):
    out = gen(engine, text="12+34=", sampling_params={"max_new_tokens": 6, "temperature": 0.5},
              return_logprob=True, return_text_in_logprobs=True, return_prompt_token_ids=True)
    meta = out["meta_info"]
    assert (set(out) == {"text", "output_ids", "meta_info", "prompt_token_ids"}
            and len(out["output_ids"]) == 6)
    assert out["prompt_token_ids"] == engine.tokenizer.encode("12+34=")
    assert (meta["prompt_tokens"] == 7 and meta["completion_tokens"] == 6
            and meta["cached_tokens"] == 0)
    assert (meta["finish_reason"] == {"type": "length", "length": 6}
            and meta["weight_version"] == "0")
    assert isinstance(meta["id"], str) and meta["e2e_latency"] > 0
    entries = meta["output_token_logprobs"]
    assert [e[1] for e in entries] == out["output_ids"]
    assert all(len(e) == 3 and e[0] <= 0 and isinstance(e[2], str) for e in entries)
    assert out["text"] == "".join(e[2] for e in entries)
    ids = engine.tokenizer.encode("12+34=")
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids + out["output_ids"]])).logits[0, len(ids) - 1:-1]
    ref = (torch.log_softmax(logits / 0.5, -1)
           .gather(1, torch.tensor(out["output_ids"])[:, None])[:, 0])
    assert (ref - torch.tensor([e[0] for e in entries])).abs().max() <= 1e-4


def test_concurrent_greedy_equals_transformers(engine):
    g = torch.Generator().manual_seed(5)
    prompts = [[1] + torch.randint(4, 104, (int(k),), generator=g).tolist()
               for k in (3, 30, 11, 22, 7, 16)]
    limits = [12, 50, 3, 30, 44, 20]
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda a: gen(engine, input_ids=a[0], sampling_params={
            "max_new_tokens": a[1], "temperature": 0.0}), zip(prompts, limits)))
    for p, m, out in zip(prompts, limits, outs):
        ref = greedy(engine.model, p, m)
        assert out["output_ids"] == ref
        assert "output_token_logprobs" not in out["meta_info"]


def test_n_samples_and_batches_return_arrays(engine):
    outs = gen(engine, input_ids=[1, 20, 21],
               sampling_params={"max_new_tokens": 5, "n": 3, "ignore_eos": True},
               return_logprob=True)
    assert isinstance(outs, list) and len(outs) == 3
    assert len({o["meta_info"]["id"] for o in outs}) == 3
    assert all(len(o["output_ids"]) == 5 and len(o["meta_info"]["output_token_logprobs"]) == 5
               for o in outs)
    batch = gen(engine, input_ids=[[1, 5], [1, 6, 7]],
                sampling_params={"max_new_tokens": 2, "n": 2})
    assert [o["meta_info"]["prompt_tokens"] for o in batch] == [2, 2, 3, 3]


def test_stop_token_ids_finish_with_stop(engine):
    first = gen(engine, input_ids=[1, 9, 9],
                sampling_params={"max_new_tokens": 8, "temperature": 0})
    tok = first["output_ids"][2]
    out = gen(engine, input_ids=[1, 9, 9], sampling_params={"max_new_tokens": 8, "temperature": 0,
                                                            "stop_token_ids": [tok]})
    stop_at = first["output_ids"].index(tok)
    assert out["output_ids"] == first["output_ids"][:stop_at + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok}


@pytest.mark.parametrize("body,names", [
    (b"{not json", "JSON is malformed"), (b"[1, 2]", "Expected `object`"),
    ({"input_ids": "abc"}, "$.input_ids"),
    ({"input_ids": [1, 2], "sampling_params": {"bogus": 1}}, "unknown field `bogus`"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}},
     "$.sampling_params.temperature"),
    ({"input_ids": [1, 2], "sampling_params": {"top_k": True}}, "$.sampling_params.top_k"),
    ({"input_ids": [1, 2], "return_logprob": "yes"}, "$.return_logprob"),
    ({"input_ids": [1, [2]]}, "input_ids"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": -1}}, "temperature"),
    ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, "top_p"),
    ({"input_ids": [1, 2], "text": "ab"}, "Either text"), ({"sampling_params": {}}, "Either text"),
    ({"input_ids": []}, "cannot be empty"), ({"input_ids": [1, 999]}, "out of vocabulary"),
    ({"input_ids": [1, 2], "sampling_params": {"stop": ["x"]}}, "sampling_params.stop"),
    ({"input_ids": [1, 5], "return_routed_experts": True}, "return_routed_experts: "),  # dense
])
def test_malformed_generate_gets_a_400_naming_what_is_wrong(engine, body, names):
    status, text = call(engine, "/generate", body)
    assert status == 400
    assert names in json.loads(text)["error"]["message"]


def test_control_endpoints_shapes(engine):
    assert call(engine, "/health") == (200, "") and call(engine, "/health_generate") == (200, "")
    info = json.loads(call(engine, "/model_info")[1])
    assert info["weight_version"] == "0" and info["is_generation"] is True
    server = json.loads(call(engine, "/server_info")[1])
    assert server["version"] == "0.5.23" and server["max_running_requests"] == 8
    loads = json.loads(call(engine, "/v1/loads")[1])["loads"][0]
    assert loads["num_running_reqs"] == 0 and loads["max_running_requests"] == 8
    assert call(engine, "/get_weight_version")[0] == 404  # removed in 0.5.23
    status, text = call(engine, "/get_weights_by_name",
                        {"name": "model.norm.weight", "truncate_size": 5})
    assert status == 200 and json.loads(text) == engine.model.model.norm.weight[:5].tolist()
    status, text = call(engine, "/get_weights_by_name", {"name": "no.such.weight"})
    assert (status == 400
            and json.loads(text) == {"error": {"message": "Get parameter by name failed"}})
    status, text = call(engine, "/get_weights_by_name",
                        b'{"name": "x", "truncate_size": 1e400}')  # int(inf)
    assert status == 400 and "truncate_size" in text, text
    assert call(engine, "/flush_cache", {})[0] == 200 and call(engine, "/flush_cache")[0] == 200
    assert call(engine, "/abort_request", {"rid": "nope"}) == (200, "")
    status, text = call(engine, "/pause_generation", {"mode": "sideways"})
    assert status == 400 and "$.mode" in json.loads(text)["error"]["message"]
    status, text = call(engine, "/update_weights_from_distributed",
                        {"names": [], "dtypes": [], "shapes": []})
    assert status == 400 and "begin_weight_update" in json.loads(text)["message"]
    assert call(engine, "/end_weight_update", {})[0] == 400
    assert (json.loads(call(engine, "/begin_weight_update", {})[1])
            == {"success": True, "message": "Success"})
    assert call(engine, "/begin_weight_update", {})[0] == 400
    assert call(engine, "/end_weight_update", {})[0] == 200
    assert call(engine, "/init_weights_update_group", {"master_address": "127.0.0.1"})[0] == 400
    metrics = call(engine, "/metrics")[1]
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                 "sglang:gen_throughput", "sglang:prompt_tokens_total",
                 "sglang:generation_tokens_total", "sglang:num_requests_total",
                 "sglang:num_aborted_requests_total", "sglang:time_to_first_token_seconds_bucket",
                 "sglang:e2e_request_latency_seconds_count", "sglang:num_paused_reqs"):
        assert name in metrics, name


@contextmanager
def stalled(engine):
    """Block the scheduler thread between two steps (commands queue up) until the block exits."""
    release = threading.Event()
    entered = threading.Event()
    engine.scheduler.call(lambda s: (entered.set(), release.wait(HTTP_TIMEOUT_S)))
    assert entered.wait(HTTP_TIMEOUT_S)
    try:
        yield
    finally:
        release.set()


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + HTTP_TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_pause_abort_partial_then_blocked_until_continue(engine):
    long = {"input_ids": [1, 30, 31],
            "sampling_params": {"max_new_tokens": 240, "ignore_eos": True},
            "return_logprob": True}
    with ThreadPoolExecutor(4) as pool:
        try:
            inflight = [pool.submit(gen, engine, **long) for _ in range(2)]
            wait_for(lambda: engine.scheduler.load()["num_used_tokens"] >= 20,
                     "two running requests")
            with stalled(engine):
                pause = pool.submit(call, engine, "/pause_generation", {"mode": "abort"})
                wait_for(lambda: engine.http.gate.paused, "the pause to reach the server")
            status, text = pause.result(timeout=HTTP_TIMEOUT_S)
            assert (status == 200
                    and json.loads(text) == {"message": "Generation paused successfully.",
                                             "status": "ok"})
            # pause returned only after every in-flight request was answered
            assert engine.http.gate.readers == 0
            assert call(engine, "/health")[0] == 200  # the health probe bypasses the pause gate
            for f in inflight:
                out = f.result(timeout=HTTP_TIMEOUT_S)
                assert out["meta_info"]["finish_reason"]["type"] == "abort"
                assert 0 < len(out["output_ids"]) < 240
                assert len(out["meta_info"]["output_token_logprobs"]) == len(out["output_ids"])
            blocked = pool.submit(gen, engine, input_ids=[1, 5],
                                  sampling_params={"max_new_tokens": 2})
            with pytest.raises(TimeoutError):  # waits, is not rejected
                blocked.result(timeout=0.5)
        finally:
            assert call(engine, "/continue_generation", {})[0] == 200
        assert (blocked.result(timeout=HTTP_TIMEOUT_S)["meta_info"]["finish_reason"]["type"]
                == "length")


def test_abort_request_by_rid(engine):
    body = {"rid": "kill-me", "input_ids": [1, 40],
            "sampling_params": {"max_new_tokens": 250, "ignore_eos": True}}
    with ThreadPoolExecutor(1) as pool:
        f = pool.submit(gen, engine, **body)
        wait_for(lambda: engine.scheduler.load()["num_running_reqs"], "the request to run")
        with stalled(engine):
            assert call(engine, "/abort_request", {"rid": "kill-me"}) == (200, "")
        out = f.result(timeout=HTTP_TIMEOUT_S)
    assert (out["meta_info"]["id"] == "kill-me"
            and out["meta_info"]["finish_reason"]["type"] == "abort")


@pytest.mark.parametrize("mode,flush", [("in_place", 400), ("retract", 200)])
def test_a_pause_keeps_the_request_and_the_flush_follows_sglang(engine, mode, flush):
    """in_place keeps the request running (no flush); retract requeues it without KV (flush ok)."""
    body = {"input_ids": [1, 50, 51],
            "sampling_params": {"max_new_tokens": 120, "temperature": 0, "ignore_eos": True}}
    ref = gen(engine, **body)["output_ids"]
    with ThreadPoolExecutor(2) as pool:
        try:
            f = pool.submit(gen, engine, **body)
            wait_for(lambda: engine.scheduler.load()["num_running_reqs"], "the request to run")
            with stalled(engine):
                pause = pool.submit(call, engine, "/pause_generation", {"mode": mode})
                wait_for(lambda: engine.http.gate.paused, "the pause to reach the server")
            assert pause.result(timeout=HTTP_TIMEOUT_S)[0] == 200
            assert engine.scheduler.load()["num_waiting_reqs"] == (mode == "retract")
            assert call(engine, "/flush_cache", {})[0] == flush
            with pytest.raises(TimeoutError):
                f.result(timeout=0.2)
        finally:
            assert call(engine, "/continue_generation", {})[0] == 200
        out = f.result(timeout=HTTP_TIMEOUT_S)
    assert out["output_ids"] == ref and out["meta_info"]["finish_reason"]["type"] == "length"


def test_a_continue_that_overtakes_its_in_place_pause_still_resumes(engine):
    with ThreadPoolExecutor(2) as pool:
        try:
            with stalled(engine):  # the hold (and the continue's release) queue behind this
                pause = pool.submit(call, engine, "/pause_generation", {"mode": "in_place"})
                wait_for(lambda: engine.http.hold_posted, "the hold to be queued")
                resume = pool.submit(call, engine, "/continue_generation", {})
                wait_for(lambda: not engine.http.hold_posted, "the continue to reach the server")
            assert pause.result(timeout=HTTP_TIMEOUT_S)[0] == 200
            assert resume.result(timeout=HTTP_TIMEOUT_S)[0] == 200
            assert not engine.scheduler.call(lambda s: s.held).result(timeout=HTTP_TIMEOUT_S)
            assert gen(engine, input_ids=[1, 5],
                       sampling_params={"max_new_tokens": 2})["output_ids"]
        finally:
            if engine.scheduler.held:
                call(engine, "/continue_generation", {})


def test_update_weights_from_disk(engine, tmp_path):
    new = build_model(ModelConfig(max_position_embeddings=256, init_seed=3))
    new.save_pretrained(tmp_path / "m")
    before = state_checksum(engine.model)
    probe = {"input_ids": [1, 60, 61, 62],
             "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}
    old_out = gen(engine, **probe)["output_ids"]  # its KV must not survive the update
    status, text = call(engine, "/update_weights_from_disk",
                        {"model_path": str(tmp_path / "m"), "weight_version": "7"})
    assert status == 200 and json.loads(text)["success"] is True
    try:
        assert state_checksum(engine.model) == state_checksum(new) != before
        assert json.loads(call(engine, "/model_info")[1])["weight_version"] == "7"
        out = gen(engine, **probe)
        assert out["meta_info"]["weight_version"] == "7"
        with torch.no_grad():
            ref = new.generate(torch.tensor([probe["input_ids"]]), max_new_tokens=12,
                               do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
        assert out["output_ids"] == ref != old_out
        bad = call(engine, "/update_weights_from_disk", {"model_path": str(tmp_path / "nothing")})
        assert bad[0] == 400 and json.loads(bad[1])["success"] is False
    finally:  # later tests in this module expect the initial weights
        build_model(MODEL).save_pretrained(tmp_path / "orig")
        assert call(engine, "/update_weights_from_disk", {"model_path": str(tmp_path / "orig"),
                                                          "weight_version": "0"})[0] == 200


def aborted(engine) -> float:
    """sglang:num_aborted_requests_total as /metrics reports it."""
    return float(next(line for line in call(engine, "/metrics")[1].splitlines()
                      if line.startswith("sglang:num_aborted_requests_total")).split()[-1])


def test_client_disconnect_aborts_request(engine):
    before = aborted(engine)
    body = json.dumps({"input_ids": [1, 2],
                       "sampling_params": {"max_new_tokens": 250, "ignore_eos": True}}).encode()
    sock = socket.create_connection(("127.0.0.1", engine.port), timeout=HTTP_TIMEOUT_S)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: engine\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    wait_for(lambda: engine.scheduler.load()["num_running_reqs"], "the request to run")
    with stalled(engine):
        sock.close()
        time.sleep(0.3)  # the server notices the hang-up and queues the abort behind the stall
    wait_for(lambda: aborted(engine) > before, "the abort")
    assert aborted(engine) == before + 1  # aborted, not run to its 250 tokens


def stream(engine, body: dict) -> list:
    req = urllib.request.Request(engine.url + "/generate",
                                 data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_chunks_are_cumulative_and_end_like_the_plain_response(engine):
    body = {"input_ids": [1, 70, 71],
            "sampling_params": {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True},
            "return_logprob": True}
    plain = gen(engine, **body)
    chunks = stream(engine, body)
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    lengths = [len(c["output_ids"]) for c in chunks]
    assert lengths == sorted(lengths) and lengths[-1] == 20
    for c in chunks:  # every chunk is a prefix of the final output, logprobs included
        assert c["output_ids"] == plain["output_ids"][:len(c["output_ids"])]
        assert len(c["meta_info"]["output_token_logprobs"]) == len(c["output_ids"])
    last = chunks[-1]
    assert (last["meta_info"]["finish_reason"] == {"type": "length", "length": 20}
            and "e2e_latency" in last["meta_info"])
    assert last["output_ids"] == plain["output_ids"] and last["text"] == plain["text"]
    many = stream(engine, {"input_ids": [1, 5], "sampling_params": {"max_new_tokens": 3, "n": 2}})
    assert {c["index"] for c in many} == {0, 1}



def local(engine, body: dict) -> tuple[int, object]:
    return asyncio.run(engine.generate_local(body))


def same_answer(a: dict, b: dict) -> None:
    """Equal but for what differs between any two calls (request id, latency)."""
    strip = lambda o: {**o, "meta_info": {k: v for k, v in o["meta_info"].items()
                                          if k not in ("id", "e2e_latency")}}
    # JSON-equal: what the endpoint would have sent
    assert strip(a) == strip(json.loads(json.dumps(b)))


def test_in_process_generate_answers_what_the_endpoint_answers_and_the_client_maps_it(engine):
    body = {"input_ids": [[1, 7, 8], [1, 9]],
            "sampling_params": [{"max_new_tokens": 6, "temperature": 0},
                                {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}],
            "return_logprob": True}
    status, outs = local(engine, body)
    assert status == 200 and len(outs) == 2
    for over_http, in_process in zip(gen(engine, **body), outs):
        same_answer(over_http, in_process)
    bad = {"input_ids": [1, 999]}  # past the vocabulary
    http_status, text = call(engine, "/generate", bad)
    assert local(engine, bad) == (http_status, json.loads(text)) and http_status == 400
    assert local(engine, {"input_ids": [1, 2], "stream": True})[0] == 400  # no streaming in-process

    async def through_the_client():
        client = SGLangClient("http://127.0.0.1:1", local=engine)  # no HTTP reachable
        outs = await client.generate_batch([[1, 3], [1, 4, 5]],
                                           [{"max_new_tokens": 3, "temperature": 0,
                                             "ignore_eos": True}] * 2)
        assert [(len(o.output_ids), len(o.logprobs), o.finish_reason, o.weight_version)
                for o in outs] == [(3, 3, "length", "0")] * 2
        with pytest.raises(EngineError) as e:
            await client.generate([1, 999], {"max_new_tokens": 2})
        assert e.value.status == 400
        await client.close()
    asyncio.run(through_the_client())


def test_in_process_generate_waits_while_paused_and_a_cancelled_caller_aborts(engine):
    async def main():
        assert call(engine, "/pause_generation", {"mode": "abort"})[0] == 200
        try:
            waiting = asyncio.ensure_future(engine.generate_local(
                {"input_ids": [1, 5], "sampling_params": {"max_new_tokens": 2}}))
            done, _ = await asyncio.wait([waiting], timeout=0.5)
            assert not done  # held back by the pause, not refused
        finally:
            assert call(engine, "/continue_generation", {})[0] == 200
        status, out = await asyncio.wait_for(waiting, HTTP_TIMEOUT_S)
        assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "length"
        before = aborted(engine)
        long = asyncio.ensure_future(engine.generate_local(
            {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 250, "ignore_eos": True}}))
        deadline = time.monotonic() + HTTP_TIMEOUT_S
        while not engine.scheduler.load()["num_running_reqs"]:
            assert time.monotonic() < deadline, "the request never ran"
            await asyncio.sleep(0.005)
        long.cancel()
        while aborted(engine) == before:
            assert time.monotonic() < deadline, "the cancelled request was not aborted"
            await asyncio.sleep(0.005)
    asyncio.run(main())


def test_an_in_process_call_ends_when_its_engine_stops_and_later_ones_are_refused():
    """A call held at the pause gate ends as unreachable, not at its timeout; later ones too."""
    e = EmbeddedEngine(MODEL, EngineConfig(max_running_requests=2)).start()

    async def main():
        client = SGLangClient("http://127.0.0.1:1", local=e, generate_timeout_s=HTTP_TIMEOUT_S)
        try:
            assert call(e, "/pause_generation", {"mode": "abort"})[0] == 200
            held = asyncio.ensure_future(client.generate([1, 2], {"max_new_tokens": 2}))
            done, _ = await asyncio.wait([held], timeout=0.3)
            assert not done  # held back by the pause
            await asyncio.to_thread(e.stop)
            with pytest.raises(EngineError) as ended:
                await asyncio.wait_for(held, HTTP_TIMEOUT_S)
            with pytest.raises(EngineError) as refused:
                await client.generate([1, 2], {"max_new_tokens": 2})
            assert ended.value.status is None and refused.value.status is None
        finally:
            await client.close()

    try:
        asyncio.run(main())
    finally:
        e.stop()


def test_calls_ended_by_cancel_all_say_so_and_a_caller_cancelled_stays_cancelled():
    """``LocalGenerate`` with a handler that never answers: ConnectionAbortedError at and after
    ``cancel_all``; a caller cancelled for its own reasons sees its CancelledError."""
    answering = threading.Semaphore(0)  # one release per call the handler took

    async def never(_inp):
        answering.release()
        await asyncio.Event().wait()

    http = SimpleNamespace(parse=lambda body: SimpleNamespace(stream=False), answer=never)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    calls = LocalGenerate(http)

    async def main():
        own = asyncio.ensure_future(calls.call(loop, {}))
        assert await asyncio.to_thread(answering.acquire, timeout=HTTP_TIMEOUT_S)
        own.cancel()
        with pytest.raises(asyncio.CancelledError):
            await own
        running = asyncio.ensure_future(calls.call(loop, {}))
        assert await asyncio.to_thread(answering.acquire, timeout=HTTP_TIMEOUT_S)
        calls.cancel_all()
        with pytest.raises(ConnectionAbortedError):
            await asyncio.wait_for(running, HTTP_TIMEOUT_S)
        with pytest.raises(ConnectionAbortedError):
            await asyncio.wait_for(calls.call(loop, {}), HTTP_TIMEOUT_S)

    try:
        asyncio.run(main())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=HTTP_TIMEOUT_S)
        loop.close()


def test_a_text_no_context_could_hold_is_refused_before_tokenizing(engine, monkeypatch):
    """A 10 MB body is within the default 64 MiB cap: only this bound refuses it untokenized."""
    tokenizer, context = engine.tokenizer, MODEL.max_position_embeddings
    longest = max(tokenizer.get_vocab(), key=len)
    assert max_text_chars(tokenizer, context) == context * len(longest) < 10 * 1024 * 1024
    calls, encode = [], tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode",
                        lambda text, *a, **k: (calls.append(len(text)), encode(text, *a, **k))[1])
    huge = "7" * (10 * 1024 * 1024)
    status, text = call(engine, "/generate", {"text": huge,
                                              "sampling_params": {"max_new_tokens": 2}})
    assert status == 400 and ("(10485760 characters) is longer than the model's context length "
                              "(256 tokens)") in json.loads(text)["error"]["message"]
    assert call(engine, "/generate", {"text": ["1+1=", huge]})[0] == 400  # one of a batch
    assert calls == []  # refused before the tokenizer saw it
    out = gen(engine, text="1+1=", sampling_params={"max_new_tokens": 2})
    assert len(out["output_ids"]) == 2 and calls == [4]
