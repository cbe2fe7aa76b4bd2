"""``python -m rollout_server.engine [--config-file PATH] [key=value ...] [--port N] [--host H]``

Runs one embedded engine as its own process (or, with ``rollout.engine.kind`` sglang or vllm, an
SGLang or vLLM server launched as a rollout server launches one: the job's teacher process on
``distill.teacher_engine``), prints ``ENGINE_URL http://host:port`` once
``/health`` would answer 200, and serves until SIGTERM/SIGINT (``--port 0``, the default, picks a
free port). Every request needs the job's engine API key (``areal_like.net.auth.engine_api_key``);
a job without one gets an unauthenticated engine (said in the log), on ``rollout.engine.host``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path


def main(argv: list[str]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from areal_like.daemon import setup_logging
    from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE, engine_api_key
    from areal_like.net.security import SecurityError
    from areal_like.settings.config import load_daemon_config
    from rollout_server.engine.embedded import EmbeddedEngine

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    log = setup_logging("engine")
    parser = argparse.ArgumentParser(prog="python -m rollout_server.engine", allow_abbrev=False)
    parser.add_argument("--port", type=int)
    parser.add_argument("--host")
    flags, rest = parser.parse_known_args(argv)  # the rest: --config-file and key=value overrides
    cfg = load_daemon_config(rest)
    given = {k: v for k, v in vars(flags).items() if v is not None}
    engine_cfg = replace(cfg.rollout.engine, **given)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        key = engine_api_key(cfg.run_dir)
    except SecurityError as e:  # its file readable by others
        log.error("%s", e)
        return 2
    if key is None:
        log.warning("no engine API key (%s unset, no %s): the engine's endpoints need none "
                    "(it listens on %s), and it can join no weight group", ENGINE_KEY_ENV,
                    Path(cfg.run_dir) / KEY_FILE, engine_cfg.host)
    if engine_cfg.kind in ("sglang", "vllm"):
        return serve_launched(cfg, engine_cfg, key, stop, log)
    engine = EmbeddedEngine(cfg.model, engine_cfg, seed=cfg.seed, api_key=key, group_key=key,
                            lora=cfg.trainer.lora).start()
    print(f"ENGINE_URL {engine.url}", flush=True)
    try:
        while not stop.wait(0.5):
            if not engine.scheduler.alive:
                log.error("engine scheduler stopped: %r", engine.scheduler.failure)
                return 1
    finally:
        engine.stop()
    return 0


def serve_launched(cfg, engine_cfg, key: str | None, stop: threading.Event, log) -> int:
    """An SGLang or vLLM server (``rollout.engine.kind``) launched as a rollout server launches
    one, at ``--host``/``--port``, until a signal or its exit (the job's teacher process on
    ``distill.teacher_engine``)."""
    from rollout_server.engine_process import StartAborted
    from rollout_server.launch_sglang import SGLangProcess
    from rollout_server.launch_vllm import VLLMProcess

    launcher = SGLangProcess if engine_cfg.kind == "sglang" else VLLMProcess
    # its own log, as a rollout server's engine has: the engine's start lines name its key
    log_path = Path(cfg.run_dir) / "logs" / f"{engine_cfg.kind}-teacher-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s writes its log to %s", launcher.NAME, log_path)
    proc = launcher(cfg.model, engine_cfg, str(log_path), api_key=key)
    try:
        proc.start(stop.is_set)
    except StartAborted:
        return 0
    print(f"ENGINE_URL {proc.url}", flush=True)
    try:
        while not stop.wait(0.5):
            if (code := proc.exit_code()) is not None:
                log.error("%s exited with code %s", launcher.NAME, code)
                return 1
    finally:
        proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
