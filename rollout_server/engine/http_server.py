"""The aiohttp app that speaks SGLang 0.5.23's HTTP protocol subset in front of the scheduler: it
validates and tokenizes requests, fans out ``n`` samples, gates generation for pauses and weight
updates (``Gate``; ENGINE.md, "Pause and weight updates"), and shapes responses and errors exactly
like SGLang (``api.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from areal_like.net.http_guard import guarded_app
from areal_like.wire.weight_wire import FLATTENED
from rollout_server.engine import api
from rollout_server.engine.api import (
    ApiError,
    build_output,
    decode_body,
    max_text_chars,
    parse_generate,
)
from rollout_server.engine.scheduler import Request

# re-send abort-all while requests are still in flight (SGLang does the same)
PAUSE_ABORT_POLL_S = 1.0
LOAD_TIMEOUT_S = 300.0  # a load waits for the current forward pass to end; generous under load
HEALTH_TIMEOUT_S = 20.0  # SGLang's HEALTH_CHECK_TIMEOUT: a 1-token generation must finish by then
FLUSHED = ("Cache flushed.\n"
           "Please check backend logs for more details. (When there are running or waiting "
           "requests, the operation will not be performed.)\n")


class Gate:
    """Readers are /generate calls, the writer is a weight update; ``paused`` holds readers back."""

    def __init__(self):
        self.cond = asyncio.Condition()
        self.paused = False
        self.readers = 0
        self.writers = 0

    @asynccontextmanager
    async def reader(self):
        async with self.cond:
            await self.cond.wait_for(lambda: not self.paused and not self.writers)
            self.readers += 1
        try:
            yield
        finally:
            async with self.cond:
                self.readers -= 1
                self.cond.notify_all()

    async def set_paused(self, paused: bool) -> None:
        async with self.cond:
            self.paused = paused
            self.cond.notify_all()

    @asynccontextmanager
    async def writer(self):
        async with self.cond:
            exclusive = not self.paused
            if exclusive:
                self.writers += 1
                await self.cond.wait_for(lambda: self.readers == 0)
        try:
            yield
        finally:
            if exclusive:
                async with self.cond:
                    self.writers -= 1
                    self.cond.notify_all()


async def _body(request: web.Request, kind: type = dict) -> Any:
    """The request's JSON object, checked as ``kind``: a control body pydantic-lax, as SGLang's
    are (numeric strings are numbers), returned as a dict; a 400 naming what is wrong."""
    if kind is api.GenerateBody:
        return decode_body(await request.read(), kind)
    body = decode_body(await request.read(), kind, strict=False)
    return body if kind is dict else msgspec.structs.asdict(body)


def _json_of(describe):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(describe())
    return handler


def _ok_or_400(ok: bool, msg: str, **extra) -> web.Response:
    return web.json_response({"success": ok, "message": msg, **extra}, status=200 if ok else 400)


class EngineHttp:
    """Routes bound to one engine (``engine``: an ``EmbeddedEngine`` that has started its
    scheduler)."""

    def __init__(self, engine):
        self.e = engine
        self.gate = Gate()
        # the longest text worth tokenizing (api.max_text_chars)
        self.max_text_chars = max_text_chars(engine.tokenizer, engine.context_len)
        # an in_place/retract pause posted a hold that no continue released yet
        self.hold_posted = False

    def app(self) -> web.Application:
        # every endpoint but /health needs the API key (SGLang's --api-key leaves /health open:
        # its answer is a status, no body), within the limits (http_guard.py); generate calls
        # (which wait while paused) count against max_inflight, control calls always get in
        app = guarded_app(limits=self.e.limits, token=self.e.api_key, open_paths=("/health",),
                          capped_paths=("/generate",), middlewares=(self._errors,))
        r = app.router
        for path, handler in [("/generate", self.generate), ("/flush_cache", self.flush_cache),
                              ("/get_weights_by_name", self.weights_by_name)]:
            r.add_post(path, handler)
            r.add_route("PUT" if path == "/generate" else "GET", path, handler)
        for path in ("/health", "/health_generate"):
            r.add_get(path, self.health)
        info = {"/model_info": self.e.model_info, "/get_model_info": self.e.model_info,
                "/server_info": self.e.server_info, "/get_server_info": self.e.server_info,
                "/v1/loads": self.e.loads}
        for path, describe in info.items():
            r.add_get(path, _json_of(describe))
        r.add_get("/metrics", self.metrics)
        for path, handler in [("/abort_request", self.abort_request),
                              ("/pause_generation", self.pause),
                              ("/continue_generation", self.continue_),
                              ("/init_weights_update_group", self.init_group),
                              ("/destroy_weights_update_group", self.destroy_group),
                              ("/begin_weight_update", self.begin_update),
                              ("/end_weight_update", self.end_update),
                              ("/update_weights_from_distributed", self.update_distributed),
                              ("/update_weights_from_disk", self.update_disk),
                              ("/update_weights_from_tensor", self.update_tensor)]:
            r.add_post(path, handler)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ApiError as e:
            return web.json_response(e.body, status=e.status)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as e:  # the one error shape
            return web.json_response({"error": {"message": e.reason}}, status=e.status)
        except web.HTTPException:
            raise
        except Exception as e:  # a bug answers 500 with SGLang's error body; the server stays up
            self.e.log.exception("%s %s failed", request.method, request.path)
            return web.json_response({"error": {"message": f"{type(e).__name__}: {e}"}}, status=500)

    # ---- generation
    async def generate(self, request: web.Request) -> web.StreamResponse:
        inp = self.parse(await _body(request, api.GenerateBody))
        if not inp.stream:
            status, body = await self.answer(inp)
            return web.json_response(body, status=status)
        async with self.gate.reader():
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            await self._run(inp, resp)
            await resp.write(b"data: [DONE]\n\n")
            return resp

    def parse(self, body):
        e = self.e
        inp = parse_generate(body, e.tokenizer, e.vocab_size, e.context_len, self.max_text_chars)
        if inp.routed_experts and e.route_shape is None:
            raise api.value_error(f"return_routed_experts: {e.route_error}")
        return inp

    async def answer(self, inp) -> tuple[int, object]:
        """A parsed, not streaming ``/generate``'s (status, JSON body); also for in-process callers
        (local.py)."""
        async with self.gate.reader():
            reqs = await self._run(inp)
        for r, _ in reqs:  # an abort carrying an HTTP status is an error response, as in SGLang
            code = (r.finish_reason or {}).get("status_code")
            if code and code >= 400:
                return code, {"error": {"message": r.finish_reason["message"]}}
        outs = [self._output(r, lp, inp) for r, lp in reqs]
        return 200, outs[0] if inp.is_single else outs

    def _output(self, req: Request, return_logprob: bool, inp, finished: bool = True) -> dict:
        return build_output(req, self.e.tokenizer, return_logprob=return_logprob,
                            text_in_logprobs=inp.text_in_logprobs,
                            default_version=self.e.scheduler.weight_version, finished=finished,
                            prompt_ids=inp.prompt_ids_out)

    async def _run(self, inp,
                   stream: web.StreamResponse | None = None) -> list[tuple[Request, bool]]:
        """Submit every (prompt, sample) and wait for all; with ``stream``, write a chunk per
        update."""
        loop, mail = asyncio.get_running_loop(), self.e.scheduler.mail
        events: asyncio.Queue[int] = asyncio.Queue()
        made: list[tuple[Request, bool]] = []
        for i, prompt in enumerate(inp.prompts):
            for j in range(inp.n):
                params = inp.params[i]
                # distinct streams for the n samples of one seed
                if params.sampling_seed is not None and j:
                    params = replace(params, sampling_seed=params.sampling_seed + j)
                # scheduler thread -> this loop, after the step (mailbox.py)
                notify = lambda _, i=len(made): mail.post(loop, events.put_nowait, i)  # noqa: E731
                req = Request(rid=inp.rids[i] if inp.n == 1 else uuid.uuid4().hex,
                              input_ids=prompt, params=params,
                              stop_ids=self.e.stop_ids(params), on_finish=notify,
                              on_token=notify if stream is not None else None,
                              routes=[] if inp.routed_experts else None,
                              input_logprob_start=inp.logprob_starts[i]
                              if inp.logprob_starts else None)
                made.append((req, inp.return_logprob[i]))
        for req, _ in made:
            self.e.scheduler.submit(req)
        pending = set(range(len(made)))
        try:
            while pending:
                updated = {await events.get()}
                while not events.empty():  # coalesce: one chunk per request per wake-up
                    updated.add(events.get_nowait())
                for idx in sorted(updated & pending):
                    req, return_logprob = made[idx]
                    finished = req.finish_reason is not None
                    if finished:
                        pending.discard(idx)
                    if stream is not None:
                        chunk = self._output(req, return_logprob, inp, finished=finished)
                        if not inp.is_single:
                            chunk["index"] = idx
                        await stream.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        except (asyncio.CancelledError, ConnectionResetError):  # the client went away: free slots
            for req, _ in made:
                self.e.scheduler.abort(req.rid)
            raise
        return made

    async def health(self, request: web.Request) -> web.Response:
        e = self.e
        if e.status != "up" or not e.scheduler.alive:
            return web.Response(status=503)
        sched = e.scheduler
        if sched.running or sched.held:  # progress (or a deliberate hold) already proves liveness
            fresh = time.monotonic() - sched.heartbeat < HEALTH_TIMEOUT_S
            return web.Response(status=200 if fresh else 503)
        ok = await e.generate_one_token(timeout_s=HEALTH_TIMEOUT_S)
        return web.Response(status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.e.metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- cache, abort, pause
    async def flush_cache(self, request: web.Request) -> web.Response:
        ok = await asyncio.wrap_future(self.e.scheduler.call(lambda s: s.flush()))
        return web.Response(text=FLUSHED if ok else "Flush cache failed.\n",
                            status=200 if ok else 400)

    async def abort_request(self, request: web.Request) -> web.Response:
        f = await _body(request, api.AbortBody)
        if f["abort_all"] or f["rid"]:  # an empty rid without abort_all is ignored (SGLang)
            self.e.scheduler.abort(f["rid"], abort_all=f["abort_all"],
                                   message=f["abort_message"] or "Aborted")
        return web.Response(status=200)

    async def pause(self, request: web.Request) -> web.Response:
        f = await _body(request, api.PauseBody)
        await self.gate.set_paused(True)
        sched = self.e.scheduler
        if f["mode"] == "abort":
            while self.gate.readers:
                sched.abort(abort_all=True, message="Abort by pause_generation")
                async with self.gate.cond:
                    try:
                        await asyncio.wait_for(self.gate.cond.wait_for(
                                                   lambda: not self.gate.readers),
                                               PAUSE_ABORT_POLL_S)
                    except asyncio.TimeoutError:
                        pass
            self.e.metrics.num_paused.set(0)
        else:
            # before the hold runs: a continue that overtakes it must still release it
            self.hold_posted = True
            self.e.metrics.num_paused.set(await asyncio.wrap_future(
                sched.hold(retract=f["mode"] == "retract")))
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_(self, request: web.Request) -> web.Response:
        await _body(request, api.ContinueBody)
        # in_place / retract hold the steps; abort does not (no hop)
        if self.hold_posted or self.e.scheduler.held:
            self.hold_posted = False
            # queued behind the hold, so it wins
            await asyncio.wrap_future(self.e.scheduler.release())
        await self.gate.set_paused(False)
        self.e.metrics.num_paused.set(0)
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    # ---- weights
    async def weights_by_name(self, request: web.Request) -> web.Response:
        f = await _body(request, api.WeightsByNameBody)

        def read(sched):  # on the scheduler thread: never half-way through a weight load
            t = dict(sched.model.named_parameters()).get(f["name"])
            return None if t is None else t.detach().float().cpu()[:f["truncate_size"]].tolist()
        values = await asyncio.wrap_future(self.e.scheduler.call(read))
        if values is None:
            return web.json_response({"error": {"message": "Get parameter by name failed"}},
                                     status=400)
        return web.json_response(values)

    async def init_group(self, request: web.Request) -> web.Response:
        f = await _body(request, api.InitGroupBody)
        return _ok_or_400(*await asyncio.to_thread(self.e.weights.init_group, **f))

    async def destroy_group(self, request: web.Request) -> web.Response:
        f = await _body(request, api.GroupBody)
        return _ok_or_400(*await asyncio.to_thread(self.e.weights.destroy_group, **f))

    async def begin_update(self, request: web.Request) -> web.Response:
        await _body(request, api.BeginBody)
        return _ok_or_400(*self.e.weights.begin())

    async def end_update(self, request: web.Request) -> web.Response:
        await _body(request)
        # end() waits for buckets answered before they were loaded: off the loop then
        w = self.e.weights
        return _ok_or_400(*(await asyncio.to_thread(w.end) if w.unsettled else w.end()))

    async def update_distributed(self, request: web.Request) -> web.Response:
        f = await _body(request, api.DistributedBody)
        if f["load_format"] not in (None, "auto", FLATTENED):
            return _ok_or_400(False, f"load_format={f['load_format']!r} is not supported by the "
                                     "embedded engine")
        # only a paused engine may answer a bucket before it arrived
        return _ok_or_400(*await self._weight_load(
            "distributed", self.e.weights.update_from_distributed, f, f["names"], f["dtypes"],
            f["shapes"], f["group_name"], f["load_format"], self.gate.paused))

    async def update_disk(self, request: web.Request) -> web.Response:
        f = await _body(request, api.DiskBody)
        ok, msg = await self._weight_load("disk", self.e.weights.update_from_disk, f,
                                          f["model_path"])
        return _ok_or_400(ok, msg, num_paused_requests=0)

    async def update_tensor(self, request: web.Request) -> web.Response:
        f = await _body(request, api.TensorBody)
        return _ok_or_400(*await self._weight_load("tensor", self.e.weights.update_from_tensor, f,
                                                   f["serialized_named_tensors"], f["load_format"]))

    async def _weight_load(self, source: str, fn, f: dict, *args) -> tuple[bool, str]:
        """``fn(*args, weight_version, flush_cache)`` as SGLang runs a weight update: after the
        requests it aborts, under the writer gate, timed in the metrics."""
        if f["abort_all_requests"]:
            self.e.scheduler.abort(abort_all=True, message="Abort for weight update")
        async with self.gate.writer():
            t0 = time.monotonic()
            out = await asyncio.to_thread(fn, *args, f["weight_version"], f["flush_cache"])
            if isinstance(out, Future):  # the answer of a load still queued (weights.py)
                out = await asyncio.wait_for(asyncio.wrap_future(out), LOAD_TIMEOUT_S)
            ok, msg = out
            seconds = time.monotonic() - t0
            self.e.metrics.observe_weight_load(source, seconds)
        self.e.log.log(logging.DEBUG if ok else logging.WARNING,
                       "update_weights_from_%s: %s in %.3fs", source, msg, seconds)
        return ok, msg
