"""Prometheus ``/metrics`` and ``/health`` on a daemon's own port, from its own registry.

Metric names are hierarchical and stable (``buffer/staleness_max``); the Prometheus name is the
same with ``/`` replaced by ``_`` and the ``areal_`` prefix (``areal_buffer_staleness_max``).
Each daemon builds its metrics on a private ``CollectorRegistry`` so tests can run several
daemons in one process and nothing collides.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "areal_"


def prom_name(name: str) -> str:
    """``buffer/staleness_max`` -> ``areal_buffer_staleness_max``."""
    return PREFIX + name.replace("/", "_").replace("-", "_").replace(".", "_")


class Metrics:
    """A private registry with get-or-create helpers keyed by the hierarchical name."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._by_name: dict[str, object] = {}
        self._lock = threading.Lock()

    def _get(self, kind, name: str, doc: str, labels: tuple[str, ...], **kw):
        with self._lock:
            m = self._by_name.get(name)
            if m is None:
                m = kind(prom_name(name), doc or name, labelnames=labels, registry=self.registry, **kw)
                self._by_name[name] = m
            elif not isinstance(m, kind):  # one name, one meaning: a silent mix-up would corrupt dashboards
                raise ValueError(f"metric {name!r} is a {type(m).__name__}, not a {kind.__name__}")
            return m

    def counter(self, name: str, doc: str = "", labels: tuple[str, ...] = ()) -> Counter:
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str = "", labels: tuple[str, ...] = ()) -> Gauge:
        return self._get(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str = "", labels: tuple[str, ...] = (), buckets=None) -> Histogram:
        kw = {"buckets": buckets} if buckets is not None else {}
        return self._get(Histogram, name, doc, labels, **kw)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """HTTP server: ``GET /metrics`` (Prometheus text) and ``GET /health`` (JSON, 200 or 503).

    ``health`` returns ``(ok, details)``; it is called on every probe, so keep it cheap.
    ``extra_text`` (optional) lets a daemon append more exposition text (e.g. SGLang-named series).
    """

    def __init__(self, metrics: Metrics, port: int, host: str = "0.0.0.0",
                 health: Callable[[], tuple[bool, dict]] | None = None,
                 extra_text: Callable[[], str] | None = None):
        self.metrics = metrics
        self.health = health or (lambda: (True, {}))
        self.extra_text = extra_text
        self.started = time.time()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = outer.metrics.render()
                    if outer.extra_text is not None:
                        try:
                            body += outer.extra_text().encode()
                        except Exception as e:  # keep our own series scrapeable
                            body += f"# extra_text failed: {type(e).__name__}\n".encode()
                    self._reply(200, body, CONTENT_TYPE_LATEST)
                elif path == "/health":
                    try:
                        ok, details = outer.health()
                    except Exception as e:  # a broken probe is an unhealthy daemon, not a crash
                        ok, details = False, {"error": f"{type(e).__name__}: {e}"}
                    body = json.dumps({"ok": ok, "uptime_s": round(time.time() - outer.started, 1), **details})
                    self._reply(200 if ok else 503, body.encode(), "application/json")
                else:
                    self._reply(404, b'{"error": "not found"}', "application/json")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep daemon logs for daemon events
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="metrics-http", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def scrape(url: str, timeout_s: float = 2.0) -> dict[str, float]:
    """Fetch a ``/metrics`` URL and return ``{series: value}`` (labels kept in the key)."""
    import urllib.request

    return parse_exposition(urllib.request.urlopen(url, timeout=timeout_s).read().decode())


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
