"""Metrics: hierarchical names, private registries, the HTTP endpoints and ``scrape``."""

from __future__ import annotations

import json
import os
import resource
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from areal_like.net.http_guard import EVICT_IDLE_S, HttpLimits
from areal_like.net.metrics import Metrics, MetricsServer, prom_name, scrape


def test_prom_name():
    assert prom_name("buffer/staleness_max") == "areal_buffer_staleness_max"
    assert prom_name("rollout/tokens-per.s") == "areal_rollout_tokens_per_s"


def test_registries_are_private_and_get_or_create():
    a, b = Metrics(), Metrics()
    a.counter("x/events", "events").inc(2)
    b.counter("x/events", "events").inc(5)  # same name in another daemon: no collision
    assert a.counter("x/events") is a.counter("x/events")
    a.gauge("x/level").set(1.5)
    a.histogram("x/seconds", buckets=(0.1, 1.0)).observe(0.5)
    a.counter("x/by_kind", labels=("kind",)).labels(kind="ok").inc()
    text = a.render().decode()
    assert "areal_x_events_total 2.0" in text and "areal_x_level 1.5" in text
    assert ('areal_x_seconds_bucket{le="1.0"} 1.0' in text
            and 'areal_x_by_kind_total{kind="ok"} 1.0' in text)
    assert "areal_x_events_total 5.0" in b.render().decode()


def test_one_name_one_kind():
    m = Metrics()
    m.counter("x/n")
    with pytest.raises(ValueError, match="x/n"):
        m.gauge("x/n")


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_server_endpoints_and_scrape():
    m = Metrics()
    m.counter("t/requests").inc(3)
    state = {"ok": True}

    def health():
        if state["ok"] is None:
            raise RuntimeError("probe broke")
        return state["ok"], {"detail": 7}

    server = MetricsServer(m, 0, "127.0.0.1", health=health)
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, ctype, text = get(base + "/metrics")
        assert (status == 200 and ctype.startswith("text/plain")
                and "areal_t_requests_total 3.0" in text)
        values = scrape(base + "/metrics")
        assert values["areal_t_requests_total"] == 3.0
        status, ctype, body = get(base + "/health?verbose=1")
        assert status == 200 and ctype == "application/json"
        assert json.loads(body)["ok"] is True and json.loads(body)["detail"] == 7
        state["ok"] = False
        assert get(base + "/health")[0] == 503
        state["ok"] = None  # a probe that raises is unhealthy, not a crash
        status, _, body = get(base + "/health")
        assert status == 503 and "probe broke" in json.loads(body)["error"]
        assert get(base + "/other")[0] == 404
    finally:
        server.stop()


def test_metrics_token_guards_metrics_not_health():
    m = Metrics()
    m.counter("t/requests").inc()
    server = MetricsServer(m, 0, "127.0.0.1", token="s3cret-token")
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, _, body = get(base + "/metrics")
        assert status == 401 and "s3cret" not in body
        req = urllib.request.Request(base + "/metrics", headers={"Authorization": "Bearer wrong"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 401
        assert scrape(base + "/metrics", token="s3cret-token")["areal_t_requests_total"] == 1.0
        assert get(base + "/health")[0] == 200  # liveness probes need no token
        assert server.stats.unauthorized == 2
        scraped = scrape(base + "/metrics", token="s3cret-token")
        assert scraped['areal_refused_total{port="metrics"}'] == 2  # the strangers, counted
    finally:
        server.stop()


def test_many_idle_connections_cost_no_threads_and_are_cut_off():
    """300 clients connect and send nothing: the server holds at most max_connections of them at
    once (the others get 503 as soon as they are accepted), starts no thread per connection,
    closes each idle one at the header deadline, and answers a probe afterwards."""
    limits = HttpLimits(max_connections=32, header_timeout_s=1.0, max_inflight=4,
                        max_body_bytes=1024)
    before = threading.active_count()
    server = MetricsServer(Metrics(), 0, "127.0.0.1", limits=limits)
    socks = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        # every socket ends: refused ones with a 503 head (or, silent while newer ones came, closed
        # unanswered to make way for them: b""), the others closed at the deadline (b"")
        answers = []
        for s in socks:
            try:
                answers.append(s.recv(64))
            except ConnectionResetError:
                answers.append(b"")
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert all(a == b"" or a.startswith(b"HTTP/1.1 503") for a in answers) and refused
        assert server.stats.connections_refused + server.stats.timed_out == 300
        assert server.stats.peak_connections == 32 and server.stats.connections == 0
        # the server's threads: its loop and at most its render pool, whatever the connections
        assert threading.active_count() - before <= 1 + 2
        assert get(f"http://127.0.0.1:{server.port}/health")[0] == 200
    finally:
        for s in socks:
            s.close()
        server.stop()


def _past_fd_setsize() -> list[int]:
    """Open files enough that later sockets are numbered past FD_SETSIZE (1024), as in an engine's
    process ([] where the open-file limit is too low): an eviction check by ``select.select``
    raised on such a socket in ``connection_made``, leaving the newcomer neither served nor
    refused."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(soft, hard) < 1200:
        return []
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]


def test_at_the_cap_only_kept_alive_strangers_are_evicted_and_health_always_answers():
    """A connection that showed the token keeps its slot while idle, one kept alive by a stranger
    after an open /health is closed for a newcomer, and past a full cap a /health probe is still
    answered from the daemon's state (anything else gets 503)."""
    pad = _past_fd_setsize()
    limits = HttpLimits(max_connections=4, header_timeout_s=30.0, keepalive_s=30.0, max_inflight=4,
                        max_body_bytes=1024)
    server = MetricsServer(Metrics(), 0, "127.0.0.1", token="t0k", limits=limits)
    scrape_req = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0k\r\n\r\n"
    health_req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"

    def ask(raw: bytes, s=None) -> tuple[socket.socket, bytes]:
        s = s or socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(raw)
        return s, s.recv(65536)

    socks = []
    try:
        for _ in range(4):  # four members, each idle after an authenticated scrape
            s, answer = ask(scrape_req)
            assert answer.startswith(b"HTTP/1.1 200")
            socks.append(s)
        _, answer = ask(scrape_req)  # nobody to evict: refused
        assert answer.startswith(b"HTTP/1.1 503") and server.stats.connections_refused == 1
        _, answer = ask(health_req)  # past the cap, /health is still answered
        assert answer.startswith(b"HTTP/1.1 200") and b'"ok": true' in answer
        for s in socks:  # the members are still served on their kept-alive connections
            assert ask(scrape_req, s)[1].startswith(b"HTTP/1.1 200")
        assert server.stats.evicted == 0
        socks.pop().close()
        stranger, answer = ask(health_req)  # a stranger kept alive after an open path
        socks.append(stranger)
        assert answer.startswith(b"HTTP/1.1 200")
        assert not pad or stranger.fileno() >= 1024
        time.sleep(EVICT_IDLE_S + 0.2)  # what makes it idle: silence for this long
        assert ask(scrape_req)[1].startswith(b"HTTP/1.1 200")  # a member's newcomer evicts it
        try:
            closed = stranger.recv(64) == b""
        except ConnectionResetError:
            closed = True
        assert closed and server.stats.evicted == 1
    finally:
        for s in socks:
            s.close()
        server.stop()
        for fd in pad:
            os.close(fd)
