"""An engine that stops answering during a failed weight sync is restarted (rollout server of kind
sglang on sglang_standin, under with_restarts.sh); one killed by kill -9 under load is named dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path

import psutil
import pytest
from weight_sync_harness import start_pusher

from areal_like.engines.sglang import SGLangClient
from areal_like.net.auth import engine_api_key, ensure_key_file
from areal_like.net.dealer import Client
from areal_like.net.metrics import scrape
from areal_like.settings.config import load_config, to_yaml
from areal_like.weights.hf import build_model
from areal_like.wire.protocol import RosterRequest
from rollout_server.engine_process import healthy

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STANDIN = HERE / "sglang_standin"
DEADLINE_S = 6.0  # the sync deadline: short, the failure is the point
STARTUP_S = 180.0
EXIT_LAG_S = 0.5  # within rollout_server/server.py's ENGINE_EXIT_GRACE_S
# Spawner starts python only: become bash, stdout and stderr appended to the file argv[1]
EXEC_BASH = ("import os, sys; "
             "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600); "
             "os.dup2(fd, 1); os.dup2(fd, 2); os.execvp('bash', ['bash', *sys.argv[2:]])")


def _pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _start(tmp_path: Path, spawn_python, free_port, wait_until, extra: tuple[str, ...] = (),
           standin: dict[str, str] | None = None):
    base = load_config([])
    build_model(base.model).save_pretrained(tmp_path / "model")
    metrics = free_port()
    cfg = load_config([f"run_dir={tmp_path}", "security.curve=false", "rollout.engine.kind=sglang",
                       f"model.path={tmp_path / 'model'}",
                       f"buffer.address=tcp://127.0.0.1:{free_port()}",
                       f"buffer.pub_address=tcp://127.0.0.1:{free_port()}",
                       "rollout.engine.max_running_requests=4",
                       "rollout.engine.max_total_tokens=2048",
                       f"trainer.weight_sync.deadline_s={DEADLINE_S}",
                       "rollout.engine.startup_timeout_s=120", "buffer.heartbeat_timeout_s=120",
                       *extra])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    ensure_key_file(tmp_path)  # the job's engine key, as `areal-like run` writes it
    spawn_python("buffer", ["--config-file", path], capture=False)
    env = {"PYTHONPATH": f"{STANDIN}{os.pathsep}{REPO}", "AREAL_LIKE_STANDIN_CONFIG": str(path),
           "AREAL_LIKE_STANDIN_PIDS": str(tmp_path / "engine.pids"), "RESTART_BACKOFF_S": "0",
           **(standin or {})}
    server = spawn_python(EXEC_BASH, [tmp_path / "server.log",
                                      REPO / "launch/slurm/with_restarts.sh", "1",
                                      sys.executable, "-m",
                                      "rollout_server", "--config-file", path,
                                      "rollout.server_id=rollout-0",
                                      f"rollout.metrics_port={metrics}"], env=env, capture=False)
    metrics_url = f"http://127.0.0.1:{metrics}"
    wait_until(lambda: healthy(metrics_url), STARTUP_S, 0.5, "the rollout server's /health")
    return cfg, path, server, metrics_url


def _member(cfg):
    """The roster's one member (a ``RosterEntry``), or None before it registered."""
    client = Client(cfg.buffer.address, timeout_s=10)
    try:
        members = client.request(RosterRequest()).members
    finally:
        client.close()
    return members[0] if members else None


def _roster_url(cfg) -> str | None:
    return (m := _member(cfg)) and m.engine_url


def _report(tmp_path: Path, version: int) -> dict | None:
    f = tmp_path / f"v{version}.json"
    return json.loads(f.read_text()) if f.exists() else None


@pytest.mark.timeout(720)  # ~90 s alone: a 6 s deadline, a 30 s call unanswered, two engine starts
def test_an_engine_that_stops_answering_during_a_failed_sync_is_restarted(
        tmp_path, spawn_python, free_port, wait_until):
    cfg, path, server, metrics_url = _start(tmp_path, spawn_python, free_port, wait_until)
    (frozen,) = _pids(tmp_path / "engine.pids")
    old_url = wait_until(lambda: _roster_url(cfg), 60, 0.2, "the server's registration")
    assert _member(cfg).policy_version == 0
    os.kill(frozen, signal.SIGSTOP)  # up, answering nothing: a wedged SGLang
    try:
        start_pusher(spawn_python, path, tmp_path, [{"version": 1, "members": 1}])
        report = wait_until(lambda: _report(tmp_path, 1), DEADLINE_S + 120, 0.2,
                            "the v1 push's report")
        assert report["dropped"] == ["rollout-0"], report  # the sync failed
        # the probe finds no answer, the server exits 1 and kills the frozen engine;
        # the wrapper restarts it
        wait_until(lambda: len(_pids(tmp_path / "engine.pids")) == 2, 180, 0.2, "a second engine")
        wait_until(lambda: (not psutil.pid_exists(frozen)
                            or psutil.Process(frozen).status() == psutil.STATUS_ZOMBIE),
                   60, 0.2, "the frozen engine to be gone")
        fresh = _pids(tmp_path / "engine.pids")[1]
        wait_until(lambda: healthy(metrics_url), STARTUP_S, 0.5, "the restarted server's /health")
        new_url = wait_until(lambda: (u := _roster_url(cfg)) != old_url and u, 60, 0.2,
                             "a new registration")
        assert psutil.Process(fresh).status() != psutil.STATUS_STOPPED and new_url != old_url
        assert server.poll() is None  # the wrapper runs the restarted server
        log = (tmp_path / "server.log").read_text()
        # the first call the frozen engine did not answer: the probe, or (the sync abandoned by
        # the trainer, whose begin found no drain) the end of its session
        assert re.search(r"failed /(health_generate|end_weight_update) after the failed weight "
                         r"sync v1: 'TimeoutError: no answer within 30s'", log), log[-3000:]
        assert "restart 1/1" in log
        _relabelled_by_another(cfg, tmp_path, new_url, wait_until)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGKILL)  # by PID: never leave a stopped process behind


def _requests_in_engine(url: str, key: str) -> float:
    page = scrape(f"{url}/metrics", 5.0, token=key)
    return sum(v for k, v in page.items()
               if k.startswith(("sglang:num_running_reqs", "sglang:num_queue_reqs")))


@pytest.mark.timeout(720)
def test_an_engine_killed_under_many_groups_stops_the_server_naming_the_engine(
        tmp_path, spawn_python, free_port, wait_until):
    cfg, *_ = _start(tmp_path, spawn_python, free_port, wait_until,
                     ("task.group_size=2", "task.max_new_tokens=400",
                      "rollout.max_concurrent_groups=8"),
                     {"AREAL_LIKE_STANDIN_EXIT_LAG_S": str(EXIT_LAG_S)})
    (engine,) = _pids(tmp_path / "engine.pids")
    url = wait_until(lambda: _roster_url(cfg), 60, 0.2, "the server's registration")
    wait_until(lambda: _requests_in_engine(url, engine_api_key(tmp_path)) >= 12, 120, 0.1,
               "six groups or more in the engine")
    os.kill(engine, signal.SIGKILL)
    wait_until(lambda: len(_pids(tmp_path / "engine.pids")) == 2, 180, 0.2, "a second engine")
    log = (tmp_path / "server.log").read_text()
    assert re.search(r"its SGLang engine \(pid \d+\) exited with code -9", log), log[-3000:]
    assert "episodes failed in a row" not in log, log[-3000:]


def _relabelled_by_another(cfg, tmp_path: Path, url: str, wait_until) -> None:
    """A version loaded by someone else reaches the roster via the next heartbeat."""
    async def relabel() -> None:
        client = SGLangClient(url, api_key=engine_api_key(tmp_path))
        try:
            await client.update_weights_from_disk(str(tmp_path / "model"), weight_version="7")
        finally:
            await client.close()

    asyncio.run(relabel())
    wait_until(lambda: _member(cfg).policy_version == 7, 60, 0.2, "version 7 in the roster")
