"""The embedded engine's in-process ``/generate`` (rollout_server/engine/local.py) against the
same engine over HTTP: answers, errors, the pause gate, aborts, and calls when the engine stops."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from test_engine_http import HTTP_TIMEOUT_S, MODEL, aborted, call, gen

from areal_like.settings.config import EngineConfig
from rollout_server.engine import EmbeddedEngine


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    e = EmbeddedEngine(MODEL, EngineConfig(max_running_requests=8)).start()
    try:
        yield e
    finally:
        e.stop()


def local(engine, body: dict) -> tuple[int, object]:
    return asyncio.run(engine.generate_local(body))


def same_answer(a: dict, b: dict) -> None:
    """Equal but for what differs between any two calls (request id, latency)."""
    strip = lambda o: {**o, "meta_info": {k: v for k, v in o["meta_info"].items()
                                          if k not in ("id", "e2e_latency")}}
    # JSON-equal: what the endpoint would have sent
    assert strip(a) == strip(json.loads(json.dumps(b)))


def test_in_process_generate_answers_what_the_endpoint_answers(engine):
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


def test_the_client_maps_in_process_answers_like_http_ones(engine):
    from areal_like.engines.client import EngineError
    from areal_like.engines.sglang import SGLangClient

    async def main():
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
    asyncio.run(main())


def test_an_in_process_call_ends_when_its_engine_stops_and_later_ones_are_refused():
    """A call held at the pause gate ends as unreachable, not at its timeout; later ones too."""
    from areal_like.engines.client import EngineError
    from areal_like.engines.sglang import SGLangClient

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
    import threading
    from types import SimpleNamespace

    from rollout_server.engine.local import LocalGenerate

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
