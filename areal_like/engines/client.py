"""What the rest of the system calls on an inference engine (``EngineClient``), and the HTTP
plumbing every engine client and the sync port's client share (``HttpClient``).

``EngineClient`` is the interface: SGLang's client (``sglang.py``, which also drives the embedded
engine) and vLLM's (``vllm.py``) implement it side by side, each in its own engine's routes and
shapes, and answer in the same terms (``GenerateOutput``, weight versions as text, ``EngineError``).

Invariants:
* idempotent calls are retried (bounded, exponential backoff) on connection errors, timeouts and
  5xx; a non-idempotent one (generate, group join, weight loads) only when nothing was sent
  (``ClientConnectorError``) or it was refused unread (429): a generate that may have run or a
  bucket whose broadcast may have started is never re-posted;
* ``api_key`` goes as ``Authorization: Bearer`` on every call but to ``OPEN_PATHS`` (``/health``,
  open on every engine: a process that holds the engine's port, while it starts say, gets no key
  from the health poll; a sync port's ``/vouch`` and ``/begin``, whose proofs of the key go
  before it is sent) and is never logged;
* ``adapter`` (LoRA) is the (name, version) generate calls name; a request's tokens carry that
  adapter's version, and ``running(name)`` counts calls in flight naming it
  (``areal_like/weights/server_sync.py`` unloads only names at 0);
* every failure raises ``EngineError`` with the HTTP status (None: no answer) and the peer's own
  message, whichever of its error bodies carried it (cut to ``MESSAGE_CHARS``; quoted in
  ``str()``, which log lines show: ``areal_like/net/answers.py`` ``peer_text``);
* every answer is read up to a limit (``areal_like/net/answers.py``), never past it: a generate
  answer's comes from the request itself (its prompts' tokens and new tokens, times
  ``ANSWER_BYTES_PER_TOKEN``, plus the experts' bytes per token when it asks for them, plus
  ``ANSWER_BASE_BYTES`` each), ``/health``'s and ``/health_generate``'s are
  ``PROBE_ANSWER_BYTES``, ``/server_info``'s ``INFO_ANSWER_BYTES``, every other one's
  ``max_answer_bytes``. An answer over it is an ``EngineError`` naming the URL and the limit, not
  retried, and counted (``areal_answers_refused_total{client="engine"}``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
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
# called without the API key (engines leave /health open; a sync port's /vouch and /begin prove it)
OPEN_PATHS = frozenset({"/health", "/vouch", "/begin"})
MESSAGE_CHARS = 2000  # of an error message an answer carried (the rest is dropped)
# answer limits (module docstring): a control call's answer is a few hundred bytes
CONTROL_ANSWER_BYTES = 1 << 20
PROBE_ANSWER_BYTES = 4 << 10  # /health, /health_generate: a status, no body
INFO_ANSWER_BYTES = 8 << 20  # /server_info: the engine's whole server args and scheduler state
ANSWER_PATHS = {"/health": PROBE_ANSWER_BYTES, "/health_generate": PROBE_ANSWER_BYTES,
                "/server_info": INFO_ANSWER_BYTES}
# a generate answer per prompt: this, plus these bytes per token of the prompt and of its
# new tokens (a log-prob entry is ~40 bytes, a token's text up to a few dozen, escaped), plus
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
    """One sample's segment as an engine returned it (non-streaming, one prompt)."""

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


def ok(status: int, body: Any) -> bool:
    """A 2xx that is not a control endpoint's ``{"success": false}``."""
    return status < 300 and not (isinstance(body, dict) and body.get("success") is False)


def error_message(body: Any, raw: str) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
    return raw.strip()[:500] or "(empty body)"


def generate_answer_bytes(body: dict, *, tokens_key: str = "input_ids",
                          max_new_key: str = "max_new_tokens") -> int:
    """The most bytes a generate answer to ``body`` (one prompt or a batch) may take (module
    docstring): what its prompts and their new tokens can make."""
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


class HttpClient:
    """JSON over HTTP to one server, with the retries, timeouts, key and answer limits of the
    module docstring. Create inside a running event loop; ``close()`` it.

    ``on_request(method, path, body)`` is called with every request body before it is sent and
    ``on_response(method, path, status, parsed_json_or_None, raw_text)`` with every answer
    (tracing; the contract test validates both sides through them).
    """

    max_answer_bytes = CONTROL_ANSWER_BYTES  # any answer but those of ``ANSWER_PATHS``, generate
    client_name = "engine"  # its refused answers' label (areal_answers_refused_total{client})

    def __init__(self, base_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_attempts: int = MAX_ATTEMPTS,
                 on_request: Callable[[str, str, Any], None] | None = None,
                 on_response: Callable[[str, str, int, Any, str], None] | None = None,
                 api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        # sent as the engines' --api-key expects it; never logged (EngineError carries the
        # answer, not the request)
        self.api_key = api_key
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.on_request = on_request
        self.on_response = on_response
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self):
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
                    if ok(resp.status, parsed):
                        return resp.status, parsed, raw
                    last = EngineError(path, resp.status, error_message(parsed, raw),
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


class EngineClient(HttpClient, abc.ABC):
    """One inference engine, as the rollout server, the teacher, evaluation, the log-prob guard
    and the weight sync drive it. Versions are text (the engine's label); every failure is an
    ``EngineError``.

    ``local``: an engine in this process that answers generate calls without HTTP (the embedded
    engine); ``routed_experts``: every generate asks for the experts each token was routed to
    (routing replay). Both are the SGLang protocol's; another engine's client ignores them.
    """

    def __init__(self, base_url: str, *, generate_timeout_s: float = GENERATE_TIMEOUT_S,
                 local: Any = None, routed_experts: bool = False, **http):
        super().__init__(base_url, **http)
        self.generate_timeout_s = generate_timeout_s
        self.local = local
        self.routed_experts = routed_experts
        self.adapter: tuple[str, int] | None = None  # LoRA: what generate calls name, its version
        self._naming: Counter[str] = Counter()  # adapter name -> generate calls in flight naming it

    def running(self, name: str) -> int:
        """How many of this client's generate calls naming adapter ``name`` are in flight."""
        return self._naming[name]

    @contextlib.contextmanager
    def _naming_adapter(self) -> Iterator[tuple[str, int] | None]:
        """The adapter generate calls name now, counted in ``running`` until the block ends. Read
        and counted with no await between, so a sync that switches ``adapter`` and then reads
        ``running`` of the old name sees every call that named it."""
        named = self.adapter
        self._naming.update([named[0]] if named else [])
        try:
            yield named
        finally:
            self._naming -= Counter([named[0]] if named else [])  # an adapter at 0 is dropped

    @staticmethod
    def _under(out: GenerateOutput, adapter: tuple[str, int] | None) -> GenerateOutput:
        """``out`` of a request that named ``adapter``: every token is that adapter's version."""
        if adapter is None:
            return out
        return replace(out, weight_version=str(adapter[1]), weight_spans=[])

    async def health(self, *, timeout_s: float = 5.0) -> bool:
        """``GET /health`` (without the key: ``OPEN_PATHS``): True on 200; False on 503 or no
        answer."""
        try:
            await self._call("GET", "/health", timeout_s=timeout_s, idempotent=True)
            return True
        except EngineError:
            return False

    async def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await self.health(timeout_s=min(10.0, timeout_s)):
            if loop.time() > deadline:
                raise EngineError("/health", None, f"not healthy within {timeout_s:.0f}s")
            await asyncio.sleep(poll_s)

    # ------------------------------------------------------------------ generation
    @abc.abstractmethod
    async def generate(self, input_ids: list[int], sampling_params: dict, *, rid: str | None = None,
                       timeout_s: float | None = None) -> GenerateOutput:
        """One prompt, one sample, under ``adapter``; ``sampling_params`` in SGLang's names.
        One still running at its timeout is aborted."""

    @abc.abstractmethod
    async def generate_batch(self, inputs: list[list[int]], sampling_params: list[dict], *,
                             timeout_s: float | None = None) -> list[GenerateOutput]:
        """One sample per prompt of ``inputs`` (their own sampling params), answered in order."""

    @abc.abstractmethod
    async def input_logprobs(self, inputs: list[list[int]], starts: list[int], *,
                             timeout_s: float | None = None) -> list[list[float]]:
        """The log-prob of each token of ``inputs[i]`` from ``starts[i]`` (>= 1) on, given the
        tokens before it, at temperature 1: what a teacher gives a sampled response (distill)."""

    @abc.abstractmethod
    async def abort_request(self, rid: str = "", *, abort_all: bool = False,
                            timeout_s: float | None = None) -> None:
        """Abort request ``rid`` (or every one); its caller gets what it made."""

    # ------------------------------------------------------------------ health and info
    @abc.abstractmethod
    async def health_generate(self, timeout_s: float = 30.0) -> None:
        """One token generated: EngineError saying what happened (the connection refused, no
        answer within ``timeout_s``, a 503) when it fails."""

    @abc.abstractmethod
    async def server_info(self) -> dict:
        """The engine's settings, with ``max_req_input_len`` and ``tp_size`` as SGLang names
        them."""

    @abc.abstractmethod
    async def weight_version(self) -> str | None:
        """The version label the engine serves."""

    # ------------------------------------------------------------------ pause, continue
    @abc.abstractmethod
    async def pause_generation(self, mode: str = "abort", *,
                               timeout_s: float | None = None) -> None:
        """Returns once generation is paused (``rollout.pause_mode``; with ``abort``, once every
        in-flight request was aborted and answered)."""

    @abc.abstractmethod
    async def continue_generation(self, *, timeout_s: float | None = None) -> None:
        """Generation goes on."""

    # ------------------------------------------------------------------ weight updates
    @abc.abstractmethod
    async def init_weights_update_group(self, *, master_address: str, master_port: int,
                                        rank_offset: int, world_size: int, group_name: str,
                                        backend: str, timeout_s: float | None = None) -> None:
        """Blocks until every rank (the trainer included) joined the TCP rendezvous."""

    @abc.abstractmethod
    async def destroy_weights_update_group(self, group_name: str, *,
                                           timeout_s: float | None = None) -> None:
        """Leave the weight-update group."""

    @abc.abstractmethod
    async def begin_weight_update(self, *, timeout_s: float | None = None) -> bool:
        """Open a weight-update session. False (and remembered) on an engine without them."""

    @abc.abstractmethod
    async def end_weight_update(self, *, timeout_s: float | None = None) -> bool:
        """Close the session ``begin_weight_update`` opened; False on an engine without them."""

    @abc.abstractmethod
    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]], group_name: str,
                                              weight_version: str | None, flush_cache: bool,
                                              load_format: str | None = None,
                                              timeout_s: float | None = None) -> None:
        """Receive one bucket by broadcast from group rank 0; returns once it is loaded.
        ``load_format`` ``"flattened_bucket"``: ONE uint8 broadcast per bucket
        (``areal_like.wire.weight_wire``). ``weight_version``: the label once it is loaded."""

    @abc.abstractmethod
    async def update_weights_from_tensor(self, serialized_named_tensors: list[str], *,
                                         load_format: str | None = None, flush_cache: bool = True,
                                         weight_version: str | None = None,
                                         timeout_s: float | None = None) -> None:
        """Load tensors shared with the engine's device: one entry per TP rank, each the base64
        text of a ForkingPickler dump of ``[(name, tensor), ...]`` (CUDA IPC handles on a GPU)."""

    @abc.abstractmethod
    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       timeout_s: float | None = None) -> None:
        """Load the model in the Hugging Face directory ``model_path``."""

    @abc.abstractmethod
    async def update_weight_version(self, version: str, *, timeout_s: float | None = None) -> None:
        """Label what the engine serves from now on ``version`` (no weights change)."""

    # ------------------------------------------------------------------ LoRA adapters
    @abc.abstractmethod
    async def load_lora_adapter(self, name: str, path: str, *, timeout_s: float | None = None
                                ) -> None:
        """Load the adapter in the PEFT directory ``path`` (``adapter_config.json`` and its
        weights) as ``name``."""

    @abc.abstractmethod
    async def unload_lora_adapter(self, name: str, *, timeout_s: float | None = None) -> None:
        """Unload adapter ``name``: later requests cannot name it."""
