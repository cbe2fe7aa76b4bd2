"""No secret reaches a command line: ``/proc/PID/cmdline`` is readable by every local user (``ps``).

Real processes on loopback with CURVE on: the buffer daemon, a rollout server with its embedded
engine, and a rollout server with ``rollout.engine.kind=sglang`` whose real launcher
(``rollout_server/launch_sglang.py``) starts the SGLang stand-in (``sglang_standin``; kept as the
engine's parent, ``AREAL_LIKE_STANDIN_EXIT_LAG_S``, so its own argv is the one SGLang would have).
Once all serve (a rollout server is healthy only once its engine answered it with the job's key),
no process they started has on its argv the job's engine API key or a CURVE secret key.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import psutil

from launch.local import probe

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STANDIN = HERE / "sglang_standin"
STARTUP_S = 180.0


def _curve_secrets(keys_dir: Path) -> list[str]:
    return [m.group(1) for f in keys_dir.rglob("*.key_secret")
            for m in re.finditer(r'secret-key = "(.+)"', f.read_text())]


def test_no_secret_is_on_the_argv_of_any_process_a_job_starts(tmp_path, spawn_python, free_port,
                                                              wait_until):
    from areal_like.net.auth import ensure_key_file
    from areal_like.net.security import make_keys
    from areal_like.settings.config import load_config, to_yaml
    from areal_like.weights.hf import build_model

    build_model(load_config([]).model).save_pretrained(tmp_path / "model")
    cfg = load_config([f"run_dir={tmp_path}", "security.curve=true",
                       f"model.path={tmp_path / 'model'}",
                       f"buffer.address=tcp://127.0.0.1:{free_port()}",
                       f"buffer.pub_address=tcp://127.0.0.1:{free_port()}",
                       "rollout.engine.max_running_requests=4",
                       "rollout.engine.max_total_tokens=2048",
                       "rollout.engine.startup_timeout_s=120", "buffer.heartbeat_timeout_s=120"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    make_keys(cfg.resolve_path(cfg.security.keys_dir))  # as `areal-like run` makes them
    key = ensure_key_file(tmp_path)
    secrets = [key, *_curve_secrets(Path(cfg.resolve_path(cfg.security.keys_dir)))]
    assert len(secrets) >= 3  # the engine key, the server's and the clients' CURVE secrets

    buffer = spawn_python("buffer", ["--config-file", path], capture=False)
    ports = {}
    for server_id, kind in (("rollout-0", "sglang"), ("rollout-1", "embedded")):
        ports[server_id] = free_port()
        env = {"PYTHONPATH": f"{STANDIN}{os.pathsep}{REPO}",
               "AREAL_LIKE_STANDIN_CONFIG": str(path), "AREAL_LIKE_STANDIN_EXIT_LAG_S": "0.5",
               "AREAL_LIKE_STANDIN_PIDS": str(tmp_path / "engine.pids")}
        spawn_python("rollout_server", ["--config-file", path, f"rollout.server_id={server_id}",
                                        f"rollout.engine.kind={kind}",
                                        f"rollout.metrics_port={ports[server_id]}"],
                     env=env, capture=False)
    for server_id, port in ports.items():
        wait_until(lambda port=port: probe(f"http://127.0.0.1:{port}/health"), STARTUP_S, 0.5,
                   f"{server_id}'s /health")

    argvs = {}
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a short-lived child gone meanwhile
            argvs[p.pid] = p.cmdline()
    names = {" ".join(argv[1:4]) for argv in argvs.values()}
    assert any("sglang.launch_server" in n for n in names), names  # the stand-in, as launched
    assert buffer.poll() is None
    leaks = [(pid, argv[:4]) for pid, argv in argvs.items() for s in secrets
             if s in "\0".join(argv)]
    assert not leaks, f"a secret is on the command line of {leaks}"
