"""Prometheus series of the embedded engine under SGLang's names and label keys (ENGINE.md,
Metrics), on a private ``CollectorRegistry`` so several engines can live in one process (tests).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

THROUGHPUT_WINDOW_S = 2.0  # gen_throughput averages the tokens of this trailing window
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)


class EngineMetrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        # SGLang's common labels (metrics_collector.py); one engine, no parallelism: constant ranks
        m = {"model_name": model_name, "engine_type": "unified", "tp_rank": "0", "pp_rank": "0",
             "moe_ep_rank": "0"}
        req = {**m, "is_streaming": "false"}  # the request series' labels

        def child(kind, name: str, doc: str, labels: dict = m, **kw):  # a series' one child
            return kind(f"sglang:{name}", doc, tuple(labels), registry=r, **kw).labels(**labels)

        self.num_running = child(Gauge, "num_running_reqs", "The number of running requests.")
        self.num_queue = child(Gauge, "num_queue_reqs",
                               "The number of requests in the waiting queue.")
        self.token_usage = child(Gauge, "token_usage",
                                 "The token usage (used KV tokens / max_total_tokens).")
        self.gen_throughput = child(Gauge, "gen_throughput", "The generation throughput (token/s).")
        self.num_paused = child(Gauge, "num_paused_reqs",
                                "The number of requests paused by async weight sync.")
        self.weight_load = Gauge("sglang:weight_load_duration_seconds",
                                 "Wall time of the last update_weights_from_<source>.",
                                 (*m, "source"), registry=r)
        self.prompt_tokens = child(Counter, "prompt_tokens", "Number of prefill tokens processed.",
                                   req)
        self.generation_tokens = child(Counter, "generation_tokens",
                                       "Number of generation tokens processed.", req)
        self.num_requests = child(Counter, "num_requests", "The number of processed requests.", req)
        self.num_aborted = child(Counter, "num_aborted_requests", "Number of requests aborted.")
        self.ttft = child(Histogram, "time_to_first_token_seconds",
                          "Histogram of time to first token in seconds.", req,
                          buckets=_LATENCY_BUCKETS)
        self.e2e = child(Histogram, "e2e_request_latency_seconds",
                         "Histogram of End-to-end request latency in seconds", req,
                         buckets=_LATENCY_BUCKETS)
        self._labels = m
        self._window: list[tuple[float, int]] = []
        self.throughput = 0.0

    # ---- scheduler callbacks
    def on_submit(self, req) -> None:
        self.prompt_tokens.inc(len(req.input_ids))

    def on_tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)
        now = time.monotonic()
        self._window.append((now, n))
        while self._window and self._window[0][0] < now - THROUGHPUT_WINDOW_S:
            self._window.pop(0)
        span = max(now - self._window[0][0], 1e-3) if len(self._window) > 1 else THROUGHPUT_WINDOW_S
        self.throughput = sum(k for _, k in self._window) / span
        self.gen_throughput.set(self.throughput)

    def on_finish(self, req) -> None:
        self.num_requests.inc()
        if req.finish_reason and req.finish_reason.get("type") == "abort":
            self.num_aborted.inc()
        if req.first_token_at is not None:
            self.ttft.observe(req.first_token_at - req.created)
        self.e2e.observe(req.finished_at - req.created)

    def on_step(self, load: dict) -> None:
        self.num_running.set(load["num_running_reqs"])
        self.num_queue.set(load["num_waiting_reqs"])
        self.token_usage.set(load["token_usage"])
        if not load["num_running_reqs"]:
            self.throughput = 0.0
            self.gen_throughput.set(0.0)

    # ---- HTTP side
    def observe_weight_load(self, source: str, seconds: float) -> None:
        self.weight_load.labels(**self._labels, source=source).set(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
