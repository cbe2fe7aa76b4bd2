"""``EmbeddedEngine``: a Hugging Face causal LM served over SGLang's HTTP protocol, in-process.

``EmbeddedEngine(model_cfg, engine_cfg).start()`` builds the model and tokenizer, starts the
scheduler thread and the aiohttp server on its own event-loop thread, runs a one-token warm-up,
and returns; ``.url`` is then live and ``/health`` answers 200. ``.stop()`` tears everything down.
Sizing and the initial ``weight_version``: ENGINE.md. With ``lora`` enabled the model gets the
trainer's LoRA layers (``areal_like/weights/lora.py``): one live adapter, replaced in place by each
weight update as full weights are, under the same pause and version rules.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

from areal_like.net.http_guard import GuardStats, HttpLimits
from areal_like.net.http_guard import serve as guarded_serve
from areal_like.settings.config import EngineConfig, LoraConfig, ModelConfig
from areal_like.weights.lora import add_adapters
from areal_like.weights.routing import route_shape
from rollout_server.engine.http_server import EngineHttp
from rollout_server.engine.local import LocalGenerate
from rollout_server.engine.metrics import EngineMetrics
from rollout_server.engine.sampling import SamplingParams
from rollout_server.engine.scheduler import Request, Scheduler
from rollout_server.engine.weights import WeightUpdater

SERVER_START_TIMEOUT_S = 60.0  # binding a socket and starting a loop; long only on a loaded machine
STOP_TIMEOUT_S = 10.0
# in-flight handlers get this long to answer (their requests are aborted first)
HTTP_SHUTDOWN_S = 2.0
# Every wait of the weight group (rendezvous, each broadcast) is bounded by this: a trainer that
# dies mid-update frees the engine's receive thread after it. Long enough for a multi-GB bucket over
# gloo.
WEIGHT_GROUP_TIMEOUT_S = 300.0
# the SGLang release whose protocol this engine speaks (begin/end weight update)
PROTOCOL_VERSION = "0.5.23"
CHAR_TOKENIZER = "areal_like.tasks.tokenizer:char_tokenizer"  # of a model built from config


class EmbeddedEngine:
    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, *, tokenizer=None,
                 seed: int = 0, api_key: str | None = None, limits: HttpLimits = HttpLimits(),
                 lora: LoraConfig | None = None, group_key: str | None = None):
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        # the job's engine API key, which its door proves to a weight group's store gate (None:
        # it joins no group, its answer says where the key comes from)
        self.group_key = group_key
        # enabled: the model gets the trainer's adapters (areal_like/weights/lora.py)
        self.lora = lora
        # api_key None: no authentication (in-process tests)
        self.api_key, self.limits = api_key, limits
        self.tokenizer = tokenizer
        self.seed = seed
        self.log = logging.getLogger("engine")
        self.status = "starting"
        self.port = engine_cfg.port
        self.started_at = time.time()
        self.model = self.scheduler = self.weights = self.metrics = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._http_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.engine_cfg.host}:{self.port}"

    @property
    def http_stats(self) -> GuardStats:
        """What its port refused so far (401s, slow clients cut off, calls in flight)."""
        return self._server.stats if self._server is not None else GuardStats()

    @property
    def unauthorized(self) -> int:
        """Requests its port refused 401 (no or a wrong API key) so far."""
        return self.http_stats.unauthorized

    @property
    def model_name(self) -> str:
        return self.model_cfg.path or "areal_like/tiny-qwen2"

    # ---- lifecycle
    def start(self) -> EmbeddedEngine:
        try:
            self._start()
        except BaseException:  # never leave a half-started engine (threads, sockets) behind
            self.stop()
            raise
        return self

    def _start(self) -> None:
        from areal_like.tasks.tokenizer import load_tokenizer
        from areal_like.weights.hf import build_model

        ec = self.engine_cfg
        self.model = build_model(self.model_cfg, device=ec.device)
        if self.lora is not None and self.lora.enabled:  # weight updates carry the adapter alone
            add_adapters(self.model, self.lora).eval()
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_cfg)
        cfg = self.model.config
        try:  # (layers, top_k) of the routes a request may ask for (return_routed_experts)
            self.route_shape, self.route_error = route_shape(self.model), ""
        except ValueError as e:
            self.route_shape, self.route_error = None, str(e)
        self.vocab_size = cfg.vocab_size
        self.context_len = min(cfg.max_position_embeddings, ec.max_total_tokens)
        self.eos_ids = self._eos_ids()
        self.metrics = EngineMetrics(self.model_name)
        self.scheduler = Scheduler(self.model, max_running=ec.max_running_requests,
                                   max_total_tokens=ec.max_total_tokens,
                                   context_len=self.context_len,
                                   weight_version="0", metrics=self.metrics,
                                   seed=self.seed).start()
        self.weights = WeightUpdater(self.scheduler, self.model_cfg,
                                     group_timeout_s=min(WEIGHT_GROUP_TIMEOUT_S,
                                                         ec.request_timeout_s),
                                     door_key=self.group_key)
        self._start_http()
        warm_up = self.generate_one_token(timeout_s=ec.startup_timeout_s)
        if not asyncio.run_coroutine_threadsafe(warm_up, self._loop).result():
            raise RuntimeError("engine warm-up generation did not complete")
        self.status = "up"
        self.log.info("embedded engine up at %s (model %s, %d slots, context %d)",
                      self.url, self.model_name,
                      ec.max_running_requests, self.context_len)

    def stop(self) -> None:
        self.status = "stopping"
        # answer in-flight requests right away
        if self.scheduler is not None and self.scheduler.alive:
            self.scheduler.abort(abort_all=True, message="engine shutting down")
        if self._loop is not None and self._loop.is_running():
            try:
                if self._server is not None:
                    closing = asyncio.run_coroutine_threadsafe(self._server.close(), self._loop)
                    closing.result(timeout=STOP_TIMEOUT_S)
            except Exception:  # a stuck handler must not block shutdown; the loop is stopped below
                self.log.warning("HTTP server cleanup timed out")
            self.local.cancel_all()  # in-process calls (one may wait at the pause gate) end too
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._http_thread is not None:
            self._http_thread.join(timeout=STOP_TIMEOUT_S)
            if not self._http_thread.is_alive():
                self._loop.close()
        if self.scheduler is not None:
            self.scheduler.stop(timeout_s=STOP_TIMEOUT_S)
        if self.weights is not None:
            self.weights.close()

    async def generate_local(self, body) -> tuple[int, object]:
        """``POST /generate`` (not streaming) for a caller in this process, without HTTP
        (``local.py``): (status, JSON body). ConnectionRefusedError while the engine is not up,
        ConnectionAbortedError when it stops meanwhile."""
        loop = self._loop
        if self.status != "up" or loop is None or not loop.is_running():
            # HTTP: connection refused
            raise ConnectionRefusedError(f"the embedded engine is {self.status}")
        return await self.local.call(loop, body)

    def _start_http(self) -> None:
        self.http = EngineHttp(self)
        self.local = LocalGenerate(self.http)
        self._loop = asyncio.new_event_loop()
        self._http_thread = threading.Thread(target=self._loop.run_forever, name="engine-http",
                                             daemon=True)
        self._http_thread.start()
        ec = self.engine_cfg  # handler_cancellation: a client that hangs up frees its slot
        serving = guarded_serve(self.http.app(), ec.host, ec.port,
                                shutdown_timeout_s=HTTP_SHUTDOWN_S, handler_cancellation=True)
        try:
            started = asyncio.run_coroutine_threadsafe(serving, self._loop)
            self._server = started.result(SERVER_START_TIMEOUT_S)
        except Exception as e:
            raise RuntimeError(f"engine HTTP server failed to start: {e!r}") from e
        self.port = self._server.port

    # ---- helpers used by the HTTP layer
    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for src in (getattr(self.tokenizer, "eos_token_id", None),
                    getattr(gen, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(t) for t in src)
        return frozenset(ids)

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        extra = frozenset() if params.ignore_eos else self.eos_ids
        return frozenset(params.stop_token_ids) | extra

    async def generate_one_token(self, timeout_s: float) -> bool:
        """SGLang's health check (and the warm-up): one greedy token, not counted in the metrics."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        req = Request(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}",
                      input_ids=[next(iter(self.eos_ids), 0)],
                      params=SamplingParams(max_new_tokens=1, temperature=0.0),
                      stop_ids=frozenset(), log_metrics=False,
                      on_finish=lambda r: loop.is_closed() or loop.call_soon_threadsafe(
                          lambda: fut.done() or fut.set_result(r)))
        self.scheduler.submit(req)
        try:
            r = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            self.scheduler.abort(req.rid)
            return False
        return r.finish_reason is not None and r.finish_reason.get("type") == "length"

    def model_info(self) -> dict:
        cfg = self.model.config
        return {"model_path": self.model_name, "served_model_name": self.model_name,
                "tokenizer_path": self.model_cfg.path or CHAR_TOKENIZER,
                "is_generation": True,
                "preferred_sampling_params": None, "weight_version": self.scheduler.weight_version,
                "load_format": "auto", "reasoning_parser": None, "tool_call_parser": None,
                "disaggregation_mode": "null", "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": getattr(cfg, "model_type", None),
                "architectures": getattr(cfg, "architectures", None)}

    def server_info(self) -> dict:
        ec = self.engine_cfg
        return {"model_path": self.model_name, "served_model_name": self.model_name,
                "tokenizer_path": self.model_info()["tokenizer_path"],
                "max_context_length": self.context_len,
                # as SGLang's: an input this long is refused (HTTP 400; api.py, scheduler.py)
                "max_req_input_len": self.context_len,
                "max_total_num_tokens": ec.max_total_tokens,
                "max_running_requests": ec.max_running_requests,
                "version": PROTOCOL_VERSION, "engine": "areal_like.embedded", "frontend": "python",
                "internal_states": [{**self.scheduler.load(),
                                     "weight_version": self.scheduler.weight_version,
                                     "last_gen_throughput": self.metrics.throughput}],
                "host": ec.host, "port": self.port, "device": ec.device,
                "dtype": self.model_cfg.dtype,
                "startup_time": self.started_at, "incremental_streaming_output": False,
                "disaggregation_mode": "null",
                "weight_version": self.scheduler.weight_version, "dp_size": 1, "tp_size": 1}

    def loads(self) -> dict:
        load = self.scheduler.load()
        ec = self.engine_cfg
        return {"timestamp": time.time(), "version": PROTOCOL_VERSION,
                "accelerator": "cuda" if ec.device.startswith("cuda") else "cpu",
                "num_accelerators": 1,
                "loads": [{"dp_rank": 0, **load, "num_total_tokens": load["num_used_tokens"],
                           "max_total_num_tokens": ec.max_total_tokens,
                           "max_running_requests": ec.max_running_requests,
                           "gen_throughput": self.metrics.throughput, "cache_hit_rate": 0.0,
                           "utilization": load["num_running_reqs"] / ec.max_running_requests}]}

