"""Prometheus ``/metrics`` and ``/health`` on a daemon's own port, from its own registry.

Invariants: a metric's hierarchical name is stable (``buffer/staleness_max``), its Prometheus name
is ``areal_`` + the name with ``/``, ``-`` and ``.`` as ``_``; each daemon has a private
``CollectorRegistry`` (several daemons in one test process never collide).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from areal_like.net.answers import read_capped_sync, refused_answers
from areal_like.net.auth import metrics_token
from areal_like.net.http_guard import METRICS_LIMITS, HttpLimits, guarded_app, serve

PREFIX = "areal_"
SCRAPE_ANSWER_BYTES = 64 << 20  # a /metrics page: a few hundred KiB with every histogram
RENDER_THREADS = 2  # /metrics renders and /health probes run here, at most this many at once


def prom_name(name: str) -> str:
    """``buffer/staleness_max`` -> ``areal_buffer_staleness_max``."""
    return PREFIX + name.replace("/", "_").replace("-", "_").replace(".", "_")


class Metrics:
    """A private registry with get-or-create helpers keyed by the hierarchical name."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._by_name: dict[str, object] = {}
        self._totals: dict[str, float] = {}  # count_to's last totals
        self._lock = threading.Lock()
        self._refusals: dict[str, Callable[[], int]] = {}  # count_refusals' sources, by port
        self.registry.register(self)  # collect(): the refusals, read at each scrape

    def _get(self, kind, name: str, doc: str, labels: tuple[str, ...], **kw):
        with self._lock:
            m = self._by_name.get(name)
            if m is None:
                m = kind(prom_name(name), doc or name, labelnames=labels, registry=self.registry,
                         **kw)
                self._by_name[name] = m
            # one name, one meaning: a silent mix-up would corrupt dashboards
            elif not isinstance(m, kind):
                raise ValueError(f"metric {name!r} is a {type(m).__name__}, not a {kind.__name__}")
            return m

    def counter(self, name: str, doc: str = "", labels: tuple[str, ...] = ()) -> Counter:
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str = "", labels: tuple[str, ...] = ()) -> Gauge:
        return self._get(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str = "", labels: tuple[str, ...] = (),
                  buckets=None) -> Histogram:
        kw = {"buckets": buckets} if buckets is not None else {}
        return self._get(Histogram, name, doc, labels, **kw)

    def count_to(self, name: str, doc: str, total: float) -> None:
        """The counter ``name`` brought up to ``total``, a running count kept elsewhere."""
        counter = self.counter(name, doc)
        with self._lock:
            last = self._totals.get(name, 0.0)
            self._totals[name] = max(last, total)
        if total > last:
            counter.inc(total - last)

    def count_refusals(self, port: str, total: Callable[[], int]) -> None:
        """``areal_refused_total{port=...}``: strangers this daemon refused on ``port`` (a missing
        or wrong key or proof), read from ``total()`` at each scrape (areal_like/SECURITY.md)."""
        self._refusals[port] = total

    def collect(self):
        family = CounterMetricFamily(prom_name("refused"), "requests or connections refused for a "
                                     "missing or wrong key or proof, by port", labels=("port",))
        for port, total in sorted(self._refusals.items()):
            family.add_metric((port,), total())
        yield family
        family = CounterMetricFamily(prom_name("answers_refused"), "HTTP answers of peers refused "
                                     "for their size, by client (areal_like/net/answers.py)",
                                     labels=("client",))
        for client, total in sorted(refused_answers().items()):
            family.add_metric((client,), total)
        yield family

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``GET /metrics`` (Prometheus text; with ``token``, only with it) and ``GET /health``
    (``health()``'s ``(ok, details)`` as JSON with the uptime and PID, 200 or 503): an
    ``http_guard`` server on its own thread's loop, answering from construction on, rendering on
    ``RENDER_THREADS`` threads."""

    def __init__(self, metrics: Metrics, port: int, host: str = "127.0.0.1",
                 health: Callable[[], tuple[bool, dict]] | None = None, token: str | None = None,
                 limits: HttpLimits = METRICS_LIMITS):
        self.metrics = metrics
        self.health = health or (lambda: (True, {}))
        self.started = time.time()
        self.host = host
        self.app = guarded_app(limits=limits, token=token, open_paths=("/health",),
                               health=self._health_answer)  # also past the connection cap
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/health", self._health)
        self._pool = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="metrics-render")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="metrics-http",
                                        daemon=True)
        # the port is bound here, so that it is known (and a bind error raised) now
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(serve(self.app, host, port),
                                                            self._loop).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            raise
        self.port = self._server.port
        metrics.count_refusals("metrics", lambda: self._server.stats.unauthorized)

    @property
    def stats(self):
        """The guard's counters (connections open and refused, timeouts, 401s)."""
        return self._server.stats

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._server.close(), self._loop).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _probe(self) -> tuple[int, bytes]:
        try:
            ok, details = self.health()
        except Exception as e:  # a broken probe is an unhealthy daemon, not a crash
            ok, details = False, {"error": f"{type(e).__name__}: {e}"}
        body = json.dumps({"ok": ok, "uptime_s": round(time.time() - self.started, 1),
                           "pid": os.getpid(), **details}, default=str)
        return (200 if ok else 503), body.encode()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(self._pool, self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        status, body = await self._health_answer()
        return web.Response(body=body, status=status, content_type="application/json")

    async def _health_answer(self) -> tuple[int, bytes]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._probe)


def scrape(url: str, timeout_s: float = 2.0, token: str | None = None) -> dict[str, float]:
    """``{series: value}`` of a ``/metrics`` URL, read with ``token`` (default: the job's)."""
    import urllib.request

    token = token or metrics_token()
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return parse_exposition(read_capped_sync(r, url, SCRAPE_ANSWER_BYTES, "scrape").decode())


def parse_exposition(text: str) -> dict[str, float]:
    """Prometheus text format -> ``{series-with-labels: value}`` (comments and junk skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out
