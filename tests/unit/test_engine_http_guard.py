"""The embedded engine's HTTP hardening over real sockets (401, 413/431, deadlines, 400s)."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
import torch

from areal_like.net.http_guard import HttpLimits
from areal_like.settings.config import EngineConfig, ModelConfig
from rollout_server.engine import EmbeddedEngine

KEY = "k-0123456789"
LIMITS = HttpLimits(max_body_bytes=64 * 1024, header_timeout_s=2.0, body_timeout_s=2.0,
                    max_connections=64, max_inflight=32)
HTTP_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    e = EmbeddedEngine(ModelConfig(max_position_embeddings=128),
                       EngineConfig(max_running_requests=4),
                       api_key=KEY, limits=LIMITS).start()
    try:
        yield e
    finally:
        e.stop()


def call(engine, path: str, body: bytes | None = None, method: str = "POST",
         auth: str | None = f"Bearer {KEY}", headers: dict | None = None) -> tuple[int, str]:
    h = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {}),
         **(headers or {})}
    req = urllib.request.Request(engine.url + path, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def routes(engine) -> list[tuple[str, str]]:
    return sorted({(r.method, r.resource.canonical) for r in engine.http.app().router.routes()
                   if r.method != "HEAD"})


def test_every_endpoint_but_health_refuses_a_missing_or_wrong_key(engine):
    """/health is open (status, no body); every other endpoint gives 401, counted."""
    found = routes(engine)
    assert (len(found) == 24 and ("POST", "/update_weights_from_distributed") in found
            and ("GET", "/health") in found and ("GET", "/health_generate") in found)
    strangers = (None, "Bearer wrong", f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer ")
    before = engine.unauthorized
    for method, path in found:
        body = b"{}" if method in ("POST", "PUT") else None
        for auth in strangers:
            status, text = call(engine, path, body, method=method, auth=auth)
            assert status == (200 if path == "/health" else 401), (method, path, auth, status)
            assert KEY not in text and (path != "/health" or text == "")
    assert engine.unauthorized - before == (len(found) - 1) * len(strangers)
    assert call(engine, "/health", method="GET")[0] == 200
    status, text = call(engine, "/generate", json.dumps({"input_ids": [1, 5], "sampling_params": {
        "max_new_tokens": 2, "temperature": 0}}).encode())
    assert status == 200 and len(json.loads(text)["output_ids"]) == 2


def test_a_key_of_bytes_that_are_not_utf8_gets_401_not_500(engine):
    port = int(engine.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S) as sock:
        sock.sendall(b"GET /model_info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                     b"\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:80]


def test_a_body_or_header_over_the_limit_gets_413_or_431(engine):
    assert call(engine, "/health", method="GET", headers={"X-Big": "a" * 9000})[0] == 431
    many = {f"X-H{i}": "1" for i in range(80)}
    assert call(engine, "/health", method="GET", headers=many)[0] == 431
    big = json.dumps({"text": "1" * (64 * 1024)}).encode()
    assert call(engine, "/generate", big)[0] == 413
    # without Content-Length (chunked), refused as the bytes arrive
    def chunks():
        for _ in range(80):
            yield b"1" * 1024
    req = urllib.request.Request(engine.url + "/generate", data=chunks(), method="POST",
                                 headers={"Authorization": f"Bearer {KEY}",
                                          "Transfer-Encoding": "chunked"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S)
    assert e.value.code == 413


def drip(port: int, data: bytes, head: bytes = b"") -> tuple[int, bytes]:
    """Send head, then data a byte a second until the server closes: (bytes sent, answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S)
    closed, sent, answer = threading.Event(), [0], bytearray()

    def reader():
        try:
            while chunk := sock.recv(4096):
                answer.extend(chunk)
        except OSError:
            pass
        closed.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        sock.sendall(head)
        for byte in data:
            if closed.wait(1.0):  # one byte a second while the server keeps the socket open
                break
            sock.sendall(bytes([byte]))
            sent[0] += 1
    except OSError:  # reset by the server
        closed.wait(HTTP_TIMEOUT_S)
    t.join(HTTP_TIMEOUT_S)
    sock.close()
    return sent[0], bytes(answer)


def test_a_client_sending_its_header_one_byte_a_second_is_cut_off(engine):
    before = engine.http_stats.timed_out
    header = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 600
    sent, answer = drip(engine.port, header)
    # closed with no answer, long before the header could end
    assert sent < len(header) and answer == b""
    assert engine.http_stats.timed_out == before + 1
    assert call(engine, "/health", method="GET")[0] == 200  # nothing else was held up


def test_a_client_sending_its_body_one_byte_a_second_gets_408(engine):
    body = b"{" + b" " * 600 + b"}"
    head = (f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sent, answer = drip(engine.port, body, head=head)
    assert sent < len(body) and answer.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("body, why", [
    (b'{"text": "\xff\xfe\xfa"}', "utf-8"),  # msgspec's words: "invalid utf-8" before 0.23
    (b"[" * 30000 + b"]" * 30000, "Expected `object`"),  # refused at its first byte
    (b'{"input_ids": [1, ' + b"9" * 5000 + b"]}", "out of range - at `$.input_ids[1]`"),
    (json.dumps({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10**30}}).encode(),
     "out of range"),
    (json.dumps({"input_ids": [1, 2], "sampling_params": {"top_k": -(10**20)}}).encode(),
     "out of range"),
    (b'{"input_ids": [1, 2], "sampling_params": {"temperature": 1e400}}', "out of range"),
    (b'{"input_ids": [1, 2], "sampling_params": {"temperature": NaN}}', "malformed"),
    (json.dumps({"input_ids": [1, 2], "sampling_params": {"sampling_seed": -1}}).encode(),
     "sampling_seed"),
    (json.dumps({"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [10**12]}}).encode(),
     "vocabulary"),
    (json.dumps({"input_ids": [1, 2], "sampling_params": {"n": 10**6}}).encode(),
     "sequences in one request"),
])
def test_bad_input_gets_400_naming_the_problem(engine, body, why):
    status, text = call(engine, "/generate", body)
    assert status == 400 and why.lower() in text.lower(), (status, text)


def test_control_calls_get_through_while_generate_calls_fill_the_in_flight_cap(engine, wait_until):
    assert call(engine, "/pause_generation", b'{"mode": "abort"}')[0] == 200
    body = json.dumps({"input_ids": [1, 5],
                       "sampling_params": {"max_new_tokens": 1, "temperature": 0}}).encode()
    statuses: list[int] = []
    waiting = [threading.Thread(target=lambda: statuses.append(call(engine, "/generate", body)[0]))
               for _ in range(LIMITS.max_inflight)]
    for t in waiting:
        t.start()
    stats = engine.http_stats
    wait_until(lambda: stats.inflight == LIMITS.max_inflight, timeout_s=HTTP_TIMEOUT_S,
               what="every waiting /generate call to hold its in-flight slot")
    assert call(engine, "/generate", body)[0] == 429
    assert call(engine, "/continue_generation", b"{}")[0] == 200
    for t in waiting:
        t.join(HTTP_TIMEOUT_S)
    assert statuses == [200] * LIMITS.max_inflight
