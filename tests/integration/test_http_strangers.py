"""Strangers on HTTP ports (a buffer's /metrics, an engine with its key) cannot fake a daemon's
death or lock clients out (silent ones hold a slot until the header deadline:
areal_like/SECURITY.md)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from areal_like.net import security
from areal_like.net.auth import ENGINE_KEY_ENV, METRICS_TOKEN_ENV
from areal_like.net.distributed import free_port
from areal_like.net.metrics import scrape
from areal_like.settings.config import BufferConfig, RunConfig, TaskConfig, to_yaml
from launch.local import probe
from tests.integration.test_engine_http_load import engine_url

TOKEN = "metrics-token-for-the-test"
KEY = "engine-key-for-the-test"
EOF_WITHIN_S = 5.0  # a 401 ends its connection at once; this is the slack of a loaded machine


def stranger_401(port: int, path: str, method: str = "GET", status: bytes = b"401"):
    """A connection asking path with no token, reading the answer (status), socket kept."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 " + status), head[:64]
    return s


def closed_by_server(s: socket.socket, within_s: float) -> bool:
    """Whether the server closes ``s`` (EOF or reset) within ``within_s``."""
    s.settimeout(within_s)
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def counted(port: int, token: str) -> dict:
    """The daemon's scraped series, or {} while it answers 503 (its slots still taken)."""
    try:
        return scrape(f"http://127.0.0.1:{port}/metrics", token=token)
    except urllib.error.HTTPError as e:
        if e.code != 503:
            raise
        return {}


@pytest.mark.parametrize("token", [TOKEN, None])
def test_strangers_on_a_metrics_port_cannot_make_health_answer_503(token, tmp_run_dir,
                                                                   spawn_python, wait_until):
    port = free_port()
    cfg = RunConfig(run_dir=str(tmp_run_dir), task=TaskConfig(num_prompts=10),
                    buffer=BufferConfig(address=f"tcp://127.0.0.1:{free_port()}",
                                        pub_address=f"tcp://127.0.0.1:{free_port()}",
                                        metrics_port=port))
    (tmp_run_dir / "config.yaml").write_text(to_yaml(cfg))
    security.make_keys(tmp_run_dir / "keys")
    spawn_python("buffer", ["--config-file", tmp_run_dir / "config.yaml"],
                 env={METRICS_TOKEN_ENV: token or ""}, capture=False)
    health = f"http://127.0.0.1:{port}/health"
    wait_until(lambda: probe(health), 120, what="the buffer's /health")
    socks = []
    try:
        # without a token /metrics is open: those 64 stay kept alive after their answer
        socks += [stranger_401(port, "/metrics", status=b"401" if token else b"200")
                  for _ in range(64)]
        socks += [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(64)]
        assert probe(health), "a healthy buffer's /health did not answer 200 beside 128 strangers"
        body = json.loads(urllib.request.urlopen(health, timeout=5).read())
        assert body["ok"] is True and body["name"] == "buffer"  # the daemon's own state
        if token:
            assert all(closed_by_server(s, EOF_WITHIN_S) for s in socks[:64]), "a 401 kept it"
            for s in socks[64:]:  # the silent ones hold every slot: a scrape would get 503
                s.close()
            scraped = wait_until(lambda: counted(port, token), 30,
                                 what="a scrape once the silent connections are gone")
            assert scraped['areal_refused_total{port="metrics"}'] == 64  # each one counted
    finally:
        for s in socks:
            s.close()


def test_keyless_connections_cannot_lock_clients_out_of_an_engine(spawn_python):
    proc = spawn_python("rollout_server.engine",
                        ["--port", "0", "model.max_position_embeddings=128"],
                        env={ENGINE_KEY_ENV: KEY})
    url = engine_url(proc)
    port = int(url.rsplit(":", 1)[1])
    socks = []
    try:
        socks += [stranger_401(port, "/generate", "POST") for _ in range(520)]
        req = urllib.request.Request(url + "/model_info",
                                     headers={"Authorization": f"Bearer {KEY}"})
        assert urllib.request.urlopen(req, timeout=10).status == 200  # the key still gets in
        assert all(closed_by_server(s, EOF_WITHIN_S) for s in socks), "a 401 kept its connection"
    finally:
        for s in socks:
            s.close()
