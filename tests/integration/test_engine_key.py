"""A rollout server and its trainer agree on the job's engine key without the environment.

Every daemon finds it with auth.engine_api_key (the variable, else <run_dir>/secrets/): a real
RolloutServer's engine passes the trainer's probe_engine with TrainerFacts' key; a wrong key is
counted in areal_refused_total{port="engine"}.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from areal_like.engines.client import EngineError
from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE, engine_api_key, ensure_key_file
from areal_like.settings.config import load_config
from rollout_server.server import RolloutServer
from trainer.facts import TrainerFacts
from trainer.logprob_guard import probe_engine

SMALL = ["rollout.engine.max_running_requests=2", "rollout.engine.max_total_tokens=1024",
         "task.reward_workers=0", "security.curve=false"]


def test_a_server_without_the_variable_serves_the_trainers_probe_with_the_jobs_key(tmp_run_dir,
                                                                                   monkeypatch):
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    key = ensure_key_file(tmp_run_dir)  # what `areal-like run` (launch/job.py prepare) writes
    cfg = load_config([f"run_dir={tmp_run_dir}", *SMALL])
    server = RolloutServer.from_run(cfg)
    server.start()
    try:
        trainer_key = TrainerFacts.from_run(cfg).engine_key
        assert trainer_key == key and server.api_key == key  # one key, found the same way by both
        probe = probe_engine("rollout-0", server.engine_url, [1, 2, 3], 1.0, api_key=trainer_key)
        assert probe.output_ids and len(probe.engine_logp) == len(probe.output_ids)
        with pytest.raises(EngineError, match="401"):  # the engine does require it
            probe_engine("rollout-0", server.engine_url, [1, 2, 3], 1.0, api_key="not-the-key")
        # the stranger is counted in the server's metrics (areal_like/SECURITY.md, "Ports")
        refused = server.metrics.registry.get_sample_value("areal_refused_total",
                                                           {"port": "engine"})
        assert refused == 1
    finally:
        server.stop()


def test_a_job_without_a_key_gets_one_made_by_its_first_process_and_shared_by_all(
        tmp_run_dir, monkeypatch):
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    ask = ("import sys; from areal_like.net.auth import engine_api_key; "
           "print(engine_api_key(sys.argv[1], make=True))")  # as each daemon's start asks
    askers = [subprocess.Popen([sys.executable, "-c", ask, str(tmp_run_dir)],
                               stdout=subprocess.PIPE, text=True) for _ in range(6)]
    keys = {p.communicate(timeout=120)[0].strip() for p in askers}
    assert all(p.returncode == 0 for p in askers)
    assert len(keys) == 1 and keys == {engine_api_key(tmp_run_dir)}, keys
    assert (tmp_run_dir / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_run_dir / KEY_FILE).parent.iterdir()] == [Path(KEY_FILE).name]
    cfg = load_config([f"run_dir={tmp_run_dir}", *SMALL])
    assert RolloutServer.from_run(cfg).facts.engine_key == TrainerFacts.from_run(cfg).engine_key \
        == keys.pop()


class _KeyedEngine(http.server.BaseHTTPRequestHandler):
    """SGLang started with another ``--api-key``: /health open, every other call 401."""

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_an_attached_engine_refusing_the_jobs_key_is_one_line_naming_the_key(
        tmp_run_dir, monkeypatch, caplog):
    monkeypatch.setenv(ENGINE_KEY_ENV, "the-jobs-key")
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KeyedEngine) as engine:
        threading.Thread(target=engine.serve_forever, daemon=True).start()
        try:
            cfg = load_config([f"run_dir={tmp_run_dir}", *SMALL, "rollout.engine.kind=url",
                               f"rollout.engine.url=http://127.0.0.1:{engine.server_port}"])
            cfg.rollout.metrics_port = -1  # no /metrics server (as above)
            assert RolloutServer.from_run(cfg).serve() == 2
        finally:
            engine.shutdown()
    refused = [r.getMessage() for r in caplog.records if "refused the job's" in r.getMessage()]
    assert len(refused) == 1 and ENGINE_KEY_ENV in refused[0] and "--api-key" in refused[0]
    assert "Traceback" not in caplog.text
