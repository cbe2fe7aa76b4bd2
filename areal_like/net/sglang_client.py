"""The one async HTTP client for SGLang's server protocol (pinned: SGLang 0.5.23).

The only module that knows SGLang's request and response shapes (SGLang defines them in
``entrypoints/http_server.py`` and ``managers/io_struct.py``; ``parse_generate_output`` reads
``/generate``'s). It drives a real ``sglang.launch_server`` and the embedded engine alike; with
``local`` (an ``EmbeddedEngine`` in this process) ``/generate`` goes to its ``generate_local``,
errors mapped alike, never retried. One method per endpoint; every call has a timeout.

Invariants:
* idempotent calls are retried (bounded, exponential backoff) on connection errors, timeouts and
  5xx; a non-idempotent one (generate, group join, weight loads) only when nothing was sent
  (``ClientConnectorError``) or it was refused unread (429): a generate that may have run or a
  bucket whose broadcast may have started is never re-posted;
* ``api_key`` goes as ``Authorization: Bearer`` on every call but to ``OPEN_PATHS`` (``/health``,
  open on SGLang and the embedded engine alike: a process that holds the engine's port, while it
  starts say, gets no key from the health poll; a sync port's ``/vouch`` and ``/begin``, whose
  proofs of the key go before it is sent) and is never logged;
* ``adapter`` (LoRA) is the (name, version) generate calls name; a request's tokens carry that
  adapter's version, and ``running(name)`` counts calls in flight naming it
  (``areal_like/weights/server_sync.py`` unloads only names at 0);
* ``/begin_weight_update``/``/end_weight_update``: a server answering 404 predates them; the
  client remembers it (``weight_session_supported = False``) and skips both from then on;
* errors raise ``EngineError`` with the HTTP status (None: no answer) and SGLang's own message,
  whichever of its error bodies carried it (cut to ``MESSAGE_CHARS``; quoted in ``str()``, which
  log lines show: ``areal_like/net/answers.py`` ``peer_text``);
* every answer is read up to a limit (``areal_like/net/answers.py``), never past it: a
  ``/generate`` answer's comes from the request itself (its prompts' tokens and
  ``max_new_tokens``, times ``ANSWER_BYTES_PER_TOKEN``, plus the experts' bytes per token when it
  asks for them, plus ``ANSWER_BASE_BYTES`` each), ``/health``'s and ``/health_generate``'s are
  ``PROBE_ANSWER_BYTES``, ``/server_info``'s ``INFO_ANSWER_BYTES``, every other one's
  ``max_answer_bytes``. An answer over it is an ``EngineError`` naming the URL and the limit, not
  retried, and counted (``areal_answers_refused_total{client="engine"}``);
* a generate still running at its timeout is aborted by its ``rid``s: the tokens it made come back
  as an abort's (``finish_reason`` abort, resubmitted by ``rollout_server/episode.py``), so a
  request that waited out weight syncs in the engine (``pause_mode=retract``) loses nothing. One
  that made no token in that time, or whose abort is not answered within ``ABORT_GRACE_S``, is a
  timeout error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from areal_like.net.answers import AnswerTooLarge, peer_text, read_capped

# control calls on a healthy server take milliseconds; 30 s is a wedged server
DEFAULT_TIMEOUT_S = 30.0
GENERATE_TIMEOUT_S = 600.0  # a long generation on a busy CPU engine can take minutes
MAX_ATTEMPTS = 4  # per call; with the backoff below a dead server is declared dead in about 3 s
BACKOFF_S = 0.25  # first retry delay, doubled per attempt (0.25, 0.5, 1.0)
KEEPALIVE_S = 2.0  # an idle connection is reused this long: well inside the servers' 5 s
ABORT_GRACE_S = 30.0  # a generate aborted at its timeout: how long its partial answer may take
# called without the API key (SGLang leaves /health open; a sync port's /vouch and /begin prove it)
OPEN_PATHS = frozenset({"/health", "/vouch", "/begin"})
MESSAGE_CHARS = 2000  # of an error message an answer carried (the rest is dropped)
# answer limits (module docstring): a control call's answer is a few hundred bytes
CONTROL_ANSWER_BYTES = 1 << 20
PROBE_ANSWER_BYTES = 4 << 10  # /health, /health_generate: a status, no body
INFO_ANSWER_BYTES = 8 << 20  # /server_info: SGLang's whole server args and scheduler state
ANSWER_PATHS = {"/health": PROBE_ANSWER_BYTES, "/health_generate": PROBE_ANSWER_BYTES,
                "/server_info": INFO_ANSWER_BYTES}
# a /generate answer per prompt: this, plus these bytes per token of the prompt and of its
# max_new_tokens (a log-prob entry is ~40 bytes, a token's text up to a few dozen, escaped), plus
# the routed experts' (base64 of int32 x layers x top_k: 3 KiB for 94 layers of top-8) when asked
ANSWER_BASE_BYTES = 64 << 10
ANSWER_BYTES_PER_TOKEN = 512
ROUTED_BYTES_PER_TOKEN = 8 << 10
SGLANG_MAX_NEW_TOKENS = 128  # SGLang's default when a request names none


class EngineError(RuntimeError):
    """A failed call to an engine (SGLang, vLLM, the embedded one) or to a peer that speaks
    HTTP like one. ``status`` is the HTTP status, or None if no answer came."""

    def __init__(self, endpoint: str, status: int | None, message: str, *,
                 from_peer: bool = False):
        """``from_peer``: ``message`` is the peer's own text, cut to ``MESSAGE_CHARS`` and shown
        quoted (``peer_text``) by ``str()``."""
        message = message[:MESSAGE_CHARS] if from_peer else message
        super().__init__(f"{endpoint}: "
                         f"{'HTTP ' + str(status) if status is not None else 'unreachable'}"
                         f": {peer_text(message) if from_peer else message}")
        self.endpoint = endpoint
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class GenerateOutput:
    """One sample's segment as returned by ``/generate`` (non-streaming, one prompt)."""

    rid: str
    output_ids: list[int]  # generated tokens of this segment, in order
    logprobs: list[float]  # behaviour logprob of each output token (aligned with output_ids)
    finish_reason: str  # "stop" | "length" | "abort"
    finish_message: str  # abort message (or the matched stop) for logs
    abort_status: int | None  # an abort that carries an HTTP status is an error, not a pause
    weight_version: str | None  # the version that produced the segment (last span if several)
    weight_spans: list[tuple[str, int, int]] = field(default_factory=list)  # (version, start, end)
    # return_routed_experts: int32 [input + output - 1, layers, top_k] bytes (None: not asked)
    routed_experts: bytes | None = None


def _ok(status: int, body: Any) -> bool:
    """A 2xx that is not a control endpoint's ``{"success": false}``."""
    return status < 300 and not (isinstance(body, dict) and body.get("success") is False)


def _error_message(body: Any, raw: str) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
    return raw.strip()[:500] or "(empty body)"


def parse_generate_output(body: Any) -> GenerateOutput:
    """Turn one ``/generate`` response object into a GenerateOutput. Raises EngineError on a
    shape we do not understand (never a KeyError deep in the caller)."""
    try:
        meta = body["meta_info"]
        entries = meta.get("output_token_logprobs") or []
        ids = [int(e[1]) for e in entries]
        logprobs = [float(e[0]) for e in entries]
        if "output_ids" in body and body["output_ids"] is not None and not entries:
            ids = [int(t) for t in body["output_ids"]]
        if "output_ids" in body and entries and list(body["output_ids"]) != ids:
            raise ValueError("output_ids disagree with output_token_logprobs")
        fr = meta.get("finish_reason") or {}
        kind = fr.get("type", "") if isinstance(fr, dict) else str(fr)
        if kind not in ("stop", "length", "abort"):
            raise ValueError(f"unknown finish_reason {fr!r}")
        message = str(fr.get("message") or fr.get("matched") or "") if isinstance(fr, dict) else ""
        spans = [(str(s["version"]), int(s["start"]), int(s["end"]))
                 for s in meta.get("weight_versions") or []]
        version = meta.get("weight_version")
        return GenerateOutput(
            rid=str(meta.get("id", "")), output_ids=ids, logprobs=logprobs, finish_reason=kind,
            finish_message=message,
            abort_status=fr.get("status_code") if isinstance(fr, dict) else None,
            weight_version=None if version is None else str(version), weight_spans=spans,
            routed_experts=None if meta.get("routed_experts") is None
            else base64.b64decode(meta["routed_experts"], validate=True))
    except (KeyError, TypeError, ValueError, IndexError, binascii.Error) as e:
        raise EngineError("/generate", 200, f"unexpected response shape: {type(e).__name__}: {e}",
                          from_peer=True) from None


def generate_answer_bytes(body: dict, *, tokens_key: str = "input_ids",
                          max_new_key: str = "max_new_tokens") -> int:
    """The most bytes a ``/generate`` answer to ``body`` (one prompt or a batch) may take (module
    docstring): what its prompts and their ``max_new_tokens`` can make."""
    prompts = body[tokens_key]
    params = body.get("sampling_params") or {}
    batch = bool(prompts) and isinstance(prompts[0], list)
    prompts, params = (prompts, params) if batch else ([prompts], [params])
    per_token = ANSWER_BYTES_PER_TOKEN + ROUTED_BYTES_PER_TOKEN * bool(
        body.get("return_routed_experts"))
    total = 0
    for i, prompt in enumerate(prompts):
        p = params[i] if isinstance(params, list) and i < len(params) else params
        new = (p.get(max_new_key) if isinstance(p, dict) else None) or SGLANG_MAX_NEW_TOKENS
        total += ANSWER_BASE_BYTES + (len(prompt) + int(new)) * per_token
    return total


def _under(out: GenerateOutput, adapter: tuple[str, int] | None) -> GenerateOutput:
    """``out`` of a request that named ``adapter``: every token is that adapter's version."""
    if adapter is None:
        return out
    return replace(out, weight_version=str(adapter[1]), weight_spans=[])


class SGLangClient:
    """Async client for one SGLang server. Create inside a running event loop; ``close()`` it.

    ``on_request(method, path, body)`` is called with every request body before it is sent and
    ``on_response(method, path, status, parsed_json_or_None, raw_text)`` with every answer
    (tracing; the contract test validates both sides through them).
    """

    max_answer_bytes = CONTROL_ANSWER_BYTES  # any answer but those of ``ANSWER_PATHS``, /generate
    client_name = "engine"  # its refused answers' label (areal_answers_refused_total{client})

    def __init__(self, base_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 generate_timeout_s: float = GENERATE_TIMEOUT_S, max_attempts: int = MAX_ATTEMPTS,
                 on_request: Callable[[str, str, Any], None] | None = None,
                 on_response: Callable[[str, str, int, Any, str], None] | None = None,
                 api_key: str | None = None,
                 local: Any = None, routed_experts: bool = False):
        self.base_url = base_url.rstrip("/")
        # every /generate asks for the experts it routed each token to (routing replay)
        self.routed_experts = routed_experts
        self.local = local  # an engine in this process (``generate_local``): /generate without HTTP
        # sent as SGLang's --api-key expects it; never logged (EngineError carries the answer, not
        # the request)
        self.api_key = api_key
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.generate_timeout_s = generate_timeout_s
        self.max_attempts = max_attempts
        self.on_request = on_request
        self.on_response = on_response
        self.weight_session_supported: bool | None = None  # None: not probed yet
        self.adapter: tuple[str, int] | None = None  # LoRA: what generate calls name, its version
        self._naming: Counter[str] = Counter()  # adapter name -> generate calls in flight naming it
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SGLangClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # no connection limit: a rollout server keeps many generate calls open at once.
            # SGLang's and vLLM's servers (uvicorn) close a connection idle for 5 s; aiohttp would
            # reuse one for 15 s, and a call sent as the server closes it is lost unanswered
            # (ServerDisconnectedError: seen on CI for a LoRA load after a 5 s generation)
            # answers come as they are (no gzip: a few KiB of one inflate to gigabytes), so that
            # their limits (answers.py) count what is held
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
                auto_decompress=False, headers={"Accept-Encoding": "identity"})
        return self._session

    async def _call(self, method: str, path: str, body: Any = None, *,
                    timeout_s: float | None = None, idempotent: bool,
                    params: dict | None = None, limit: int | None = None) -> tuple[int, Any, str]:
        """One HTTP call with retries; returns (status, parsed JSON or None, raw text).
        ``timeout_s`` bounds the whole call, retries included; ``limit`` the answer's bytes (None:
        the path's, module docstring). Raises EngineError for non-2xx answers, for answers over
        the limit and for unreachable servers."""
        loop = asyncio.get_running_loop()
        deadline = (start := loop.time()) + (self.timeout_s if timeout_s is None else timeout_s)
        if self.on_request is not None:
            self.on_request(method, path, body)
        if path == "/generate" and self.local is not None:
            return await self._call_local(path, body, deadline - loop.time())
        last = EngineError(path, None, "no attempt fitted in the timeout")
        for attempt in range(self.max_attempts):
            if attempt:
                delay = BACKOFF_S * 2 ** (attempt - 1)
                if loop.time() + delay >= deadline:
                    break
                await asyncio.sleep(delay)
            timeout = aiohttp.ClientTimeout(total=max(1e-3, deadline - loop.time()))
            try:
                async with self._http().request(
                        method, self.base_url + path, json=body, params=params, timeout=timeout,
                        headers=None if path in OPEN_PATHS else self._headers) as resp:
                    raw = await self._read(path, resp, limit)
                    try:
                        parsed = json.loads(raw) if raw.strip() else None
                    except ValueError:
                        parsed = None
                    if self.on_response is not None:
                        self.on_response(method, path, resp.status, parsed, raw)
                    if _ok(resp.status, parsed):
                        return resp.status, parsed, raw
                    last = EngineError(path, resp.status, _error_message(parsed, raw),
                                       from_peer=True)
                    # 429: refused unread
                    if not ((idempotent and resp.status >= 500) or resp.status == 429):
                        raise last
            # (their texts name the URL: a member's, as it registered it)
            except aiohttp.ClientConnectorError as e:  # nothing was sent: safe to retry any call
                last = EngineError(path, None,
                                   f"connection failed ({type(e.os_error).__name__}): {e}",
                                   from_peer=True)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                last = EngineError(path, None, f"{type(e).__name__}: "
                                   f"{str(e) or f'no answer within {deadline - start:g}s'}",
                                   from_peer=True)
                if not idempotent:
                    raise last from None
        raise last

    async def _read(self, path: str, resp, limit: int | None) -> str:
        """The answer's text, read up to ``limit`` (None: the path's); EngineError past it."""
        limit = limit or ANSWER_PATHS.get(path, self.max_answer_bytes)
        try:
            body = await read_capped(resp, self.base_url + path, limit, self.client_name)
        except AnswerTooLarge as e:
            raise EngineError(path, resp.status, str(e)) from None
        return body.decode("utf-8", errors="replace")

    async def _call_local(self, path: str, body: Any, timeout_s: float) -> tuple[int, Any, str]:
        """``_call`` answered by ``local`` (an engine in this process), errors mapped alike."""
        try:
            status, parsed = await asyncio.wait_for(self.local.generate_local(body),
                                                    max(1e-3, timeout_s))
        except asyncio.TimeoutError:
            raise EngineError(path, None, "TimeoutError: no answer in time") from None
        except OSError as e:
            # the engine is not up (or stopped meanwhile): as an unreachable server
            raise EngineError(path, None, f"connection failed: {e}") from None
        if self.on_response is not None:
            self.on_response("POST", path, status, parsed, "")
        if not _ok(status, parsed):
            raise EngineError(path, status, _error_message(parsed, ""), from_peer=True)
        return status, parsed, ""

    # ------------------------------------------------------------------ generation
    def running(self, name: str) -> int:
        """How many of this client's generate calls naming adapter ``name`` are in flight."""
        return self._naming[name]

    async def _generate(self, body: dict, n: int, timeout_s: float | None) -> list[GenerateOutput]:
        """``POST /generate`` of ``body`` (``n`` prompts, 0: a single one) under the adapter
        generate calls name now, counted in ``running`` until it ends. The adapter is read and
        counted with no await between, so a sync that switches ``adapter`` and then reads
        ``running`` of the old name sees every call that named it."""
        named = self.adapter
        if named is not None:
            body["lora_path"] = [named[0]] * n if n else named[0]
            self._naming[named[0]] += 1
        try:
            out = await self._generate_or_abort(body, n, timeout_s or self.generate_timeout_s)
        finally:
            if named is not None:
                self._naming -= Counter([named[0]])  # an adapter at 0 is dropped
        if not n and isinstance(out, list):
            raise EngineError("/generate", 200, "got a batch answer to a single request (n > 1?)")
        if n and (not isinstance(out, list) or len(out) != n):
            got = len(out) if isinstance(out, list) else 1
            raise EngineError("/generate", 200, f"a batch of {n} prompts got {got} answers")
        return [_under(parse_generate_output(o), named) for o in (out if n else [out])]

    async def _generate_or_abort(self, body: dict, n: int, timeout_s: float) -> Any:
        """The parsed answer of ``POST /generate``; past ``timeout_s`` its requests are aborted and
        what they made is the answer (module docstring)."""
        if "rid" not in body:
            body["rid"] = [uuid.uuid4().hex for _ in range(n)] if n else uuid.uuid4().hex
        call = asyncio.ensure_future(self._call("POST", "/generate", body, idempotent=False,
                                                timeout_s=timeout_s + ABORT_GRACE_S,
                                                limit=generate_answer_bytes(body)))
        try:
            done, _ = await asyncio.wait({call}, timeout=timeout_s)
            if done:
                return (await call)[1]
            # all at once, each bounded: an unanswered one leaves it to the call's own limit
            await asyncio.gather(*(self._abort_quietly(rid, ABORT_GRACE_S)
                                   for rid in (body["rid"] if n else [body["rid"]])))
            out = (await call)[1]
        finally:
            call.cancel()
        if not any(parse_generate_output(o).output_ids
                   for o in (out if isinstance(out, list) else [out])):
            raise EngineError("/generate", None, f"TimeoutError: no token in {timeout_s:g} s")
        return out

    async def _abort_quietly(self, rid: str, timeout_s: float) -> None:
        with contextlib.suppress(EngineError):
            await self.abort_request(rid, timeout_s=timeout_s)

    async def generate(self, input_ids: list[int], sampling_params: dict, *, rid: str | None = None,
                       timeout_s: float | None = None) -> GenerateOutput:
        """``POST /generate`` for one prompt and one sample (``n`` must be 1: a group's samples are
        requests of their own)."""
        body = {"input_ids": [int(t) for t in input_ids], "sampling_params": dict(sampling_params),
                "return_logprob": True, "stream": False}
        if rid is not None:
            body["rid"] = rid
        if self.routed_experts:
            body["return_routed_experts"] = True
        return (await self._generate(body, 0, timeout_s))[0]

    async def generate_batch(self, inputs: list[list[int]], sampling_params: list[dict], *,
                             timeout_s: float | None = None) -> list[GenerateOutput]:
        """``POST /generate`` with a batch: one sample per prompt of ``inputs`` (their own sampling
        params, ``n`` 1), answered in order in one response."""
        body = {"input_ids": [[int(t) for t in p] for p in inputs],
                "sampling_params": [dict(p) for p in sampling_params], "return_logprob": True,
                "stream": False}
        if self.routed_experts:
            body["return_routed_experts"] = True
        return await self._generate(body, len(inputs), timeout_s)

    async def input_logprobs(self, inputs: list[list[int]], starts: list[int], *,
                             timeout_s: float | None = None) -> list[list[float]]:
        """The log-prob of each token of ``inputs[i]`` from ``starts[i]`` (>= 1) on, given the
        tokens before it, at temperature 1: ``POST /generate`` generating nothing
        (``max_new_tokens`` 0) with ``logprob_start_len`` one before ``starts[i]`` (SGLang's
        entry there is None), read from SGLang's ``input_token_logprobs``. What a teacher gives
        a sampled response (distill)."""
        body = {"input_ids": [[int(t) for t in p] for p in inputs],
                "sampling_params": [{"max_new_tokens": 0, "temperature": 1.0} for _ in inputs],
                "return_logprob": True, "logprob_start_len": [int(s) - 1 for s in starts],
                "stream": False}
        _, out, _ = await self._call("POST", "/generate", body, idempotent=True,
                                     timeout_s=timeout_s or self.generate_timeout_s,
                                     limit=generate_answer_bytes(body))
        if not isinstance(out, list) or len(out) != len(inputs):
            raise EngineError("/generate", 200, f"a batch of {len(inputs)} inputs got another "
                              "answer")
        values = []
        for o, p, start in zip(out, inputs, starts):
            entries = ((o or {}).get("meta_info") or {}).get("input_token_logprobs") or []
            got = [e[0] for e in entries[-(len(p) - start):]] if len(p) > start else []
            if len(got) != len(p) - start or any(not isinstance(v, int | float) for v in got):
                raise EngineError("/generate", 200, f"input_token_logprobs: {len(entries)} "
                                  f"entries for {len(p) - start} tokens")
            values.append([float(v) for v in got])
        return values

    async def abort_request(self, rid: str = "", *, abort_all: bool = False,
                            timeout_s: float | None = None) -> None:
        await self._call("POST", "/abort_request", {"rid": rid, "abort_all": abort_all},
                         idempotent=True, timeout_s=timeout_s)

    # ------------------------------------------------------------------ health and info
    async def health(self, *, timeout_s: float = 5.0) -> bool:
        """``GET /health`` (without the key: ``OPEN_PATHS``): True on 200; False on 503 or no
        answer."""
        try:
            await self._call("GET", "/health", timeout_s=timeout_s, idempotent=True)
            return True
        except EngineError:
            return False

    async def health_generate(self, timeout_s: float = 30.0) -> None:
        """``GET /health_generate`` (one token generated): EngineError saying what happened (the
        connection refused, no answer within ``timeout_s``, a 503) when it fails."""
        await self._call("GET", "/health_generate", timeout_s=timeout_s, idempotent=True)

    async def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await self.health(timeout_s=min(10.0, timeout_s)):
            if loop.time() > deadline:
                raise EngineError("/health", None, f"not healthy within {timeout_s:.0f}s")
            await asyncio.sleep(poll_s)

    async def model_info(self) -> dict:
        return (await self._call("GET", "/model_info", idempotent=True))[1]

    async def server_info(self) -> dict:
        return (await self._call("GET", "/server_info", idempotent=True))[1]

    async def loads(self) -> list[dict]:
        """``GET /v1/loads?include=core``: one entry per DP rank (``num_running_reqs``,
        ``num_waiting_reqs``, ``num_used_tokens``, ...). SGLang only (not the embedded engine)."""
        query = {"include": "core"}
        body = (await self._call("GET", "/v1/loads", idempotent=True, params=query))[1]
        return list(body.get("loads") or []) if isinstance(body, dict) else []

    async def weight_version(self) -> str | None:
        """The version the server serves, from ``/model_info`` (0.5.23 has no /weight_version)."""
        v = (await self.model_info()).get("weight_version")
        return None if v is None else str(v)

    # ------------------------------------------------------------------ pause, continue
    async def pause_generation(self, mode: str = "abort", *,
                               timeout_s: float | None = None) -> None:
        """Returns once every in-flight request was aborted and answered (mode ``abort``)."""
        await self._call("POST", "/pause_generation", {"mode": mode}, timeout_s=timeout_s,
                         idempotent=True)

    async def continue_generation(self, *, timeout_s: float | None = None) -> None:
        await self._call("POST", "/continue_generation", {}, timeout_s=timeout_s, idempotent=True)

    # ------------------------------------------------------------------ weight updates
    async def init_weights_update_group(self, *, master_address: str, master_port: int,
                                        rank_offset: int,
                                        world_size: int, group_name: str, backend: str,
                                        timeout_s: float | None = None) -> None:
        """Blocks until every rank (the trainer included) joined the TCP rendezvous."""
        body = {"master_address": master_address, "master_port": int(master_port),
                "rank_offset": int(rank_offset),
                "world_size": int(world_size), "group_name": group_name, "backend": backend}
        await self._call("POST", "/init_weights_update_group", body, timeout_s=timeout_s,
                         idempotent=False)

    async def destroy_weights_update_group(self, group_name: str, *,
                                           timeout_s: float | None = None) -> None:
        await self._call("POST", "/destroy_weights_update_group", {"group_name": group_name},
                         timeout_s=timeout_s, idempotent=True)

    async def begin_weight_update(self, *, timeout_s: float | None = None) -> bool:
        """Open a weight-update session. Returns False (and remembers) on servers without it."""
        return await self._weight_session("/begin_weight_update", {"selector": "all"}, timeout_s)

    async def end_weight_update(self, *, timeout_s: float | None = None) -> bool:
        return await self._weight_session("/end_weight_update", {}, timeout_s)

    async def _weight_session(self, path: str, body: dict, timeout_s: float | None) -> bool:
        if self.weight_session_supported is False:
            return False
        try:
            await self._call("POST", path, body, timeout_s=timeout_s, idempotent=False)
        except EngineError as e:
            if e.status == 404:  # an SGLang release before weight-update sessions
                self.weight_session_supported = False
                return False
            raise
        self.weight_session_supported = True
        return True

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]], group_name: str,
                                              weight_version: str | None, flush_cache: bool,
                                              load_format: str | None = None,
                                              timeout_s: float | None = None) -> None:
        """Receive one bucket by broadcast from group rank 0; returns once it is loaded.
        ``load_format`` ``"flattened_bucket"``: ONE uint8 broadcast per bucket
        (``areal_like.wire.weight_wire``)."""
        body = {"names": list(names), "dtypes": list(dtypes),
                "shapes": [list(map(int, s)) for s in shapes], "group_name": group_name,
                "flush_cache": flush_cache, "weight_version": weight_version,
                "load_format": load_format}
        await self._load("/update_weights_from_distributed", body, timeout_s)

    async def update_weights_from_tensor(self, serialized_named_tensors: list[str], *,
                                         load_format: str | None = None, flush_cache: bool = True,
                                         weight_version: str | None = None,
                                         timeout_s: float | None = None) -> None:
        """Load tensors shared with the engine's device: one entry per TP rank, each the base64
        text of a ForkingPickler dump of ``[(name, tensor), ...]`` (CUDA IPC handles on a GPU)."""
        body = {"serialized_named_tensors": list(serialized_named_tensors),
                "flush_cache": flush_cache, "weight_version": weight_version}
        await self._load("/update_weights_from_tensor", body, timeout_s, load_format=load_format)

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       timeout_s: float | None = None) -> None:
        body = {"model_path": model_path, "weight_version": weight_version}
        await self._load("/update_weights_from_disk", body, timeout_s)

    async def _load(self, path: str, body: dict, timeout_s: float | None, **always) -> None:
        """A weight update: ``body`` without its None values (SGLang's defaults), plus
        ``always`` as given."""
        body = {k: v for k, v in body.items() if v is not None} | always
        await self._call("POST", path, body, timeout_s=timeout_s, idempotent=False)

    # ------------------------------------------------------------------ LoRA adapters
    async def load_lora_adapter(self, name: str, path: str, *, timeout_s: float | None = None
                                ) -> None:
        """Load the adapter in the PEFT directory ``path`` (``adapter_config.json`` and its
        weights) as ``name``; SGLang reads it on every TP rank itself."""
        await self._call("POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path},
                         timeout_s=timeout_s, idempotent=False)

    async def unload_lora_adapter(self, name: str, *, timeout_s: float | None = None) -> None:
        """Unload adapter ``name``; returns once no admitted request uses it (SGLang waits for
        them holding its LoRA lock, so loads wait too); 400 if SGLang has no adapter so named."""
        await self._call("POST", "/unload_lora_adapter", {"lora_name": name}, timeout_s=timeout_s,
                         idempotent=False)

    async def update_weight_version(self, version: str, *, timeout_s: float | None = None) -> None:
        """Label what the engine serves from now on ``version`` (no weights change)."""
        body = {"new_version": version, "abort_all_requests": False}
        await self._call("POST", "/update_weight_version", body, timeout_s=timeout_s,
                         idempotent=True)
