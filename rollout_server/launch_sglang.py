"""Launch and stop a real SGLang server (``python -m sglang.launch_server``) for one rollout server.

Pass-through, not a wrapper, so every SGLang option works under its own name and nothing here has
to change when SGLang adds one: every key of ``rollout.engine.sglang`` becomes
``--key-with-dashes value`` verbatim (``true`` -> a bare flag, ``false``/``null`` -> omitted,
a list -> several values). The rollout server adds only what it must own: model path, host,
port, ``--tp-size`` from ``rollout.engine.tp_size`` (the one source of truth: the launcher gives
the server that many GPUs, so ``rollout.engine.sglang.tp_size`` is refused by the schema) and
``--weight-version 0`` unless configured (our versions are integers, SGLang's default
``"default"`` is not).

The server runs in its own session (process group) because SGLang forks scheduler and
detokenizer processes; ``stop()`` signals that group through the PID we started (SIGTERM,
then SIGKILL after ``STOP_GRACE_S``). Nothing is killed by name.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

from areal_like.config import EngineConfig, ModelConfig
from areal_like.distributed import free_port

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0  # SGLang frees GPU memory and joins its subprocesses on SIGTERM; give it time
HEALTH_POLL_S = 1.0


def sglang_command(model: ModelConfig, engine: EngineConfig, port: int) -> list[str]:
    """The argv that starts SGLang for ``model`` with ``engine.sglang`` passed through."""
    if not model.path:
        raise ValueError("rollout.engine.kind=sglang needs model.path (a local HF model directory)")
    opts = {"model_path": model.path, "host": engine.host, "port": port, "weight_version": "0",
            "tp_size": engine.tp_size}
    opts.update(engine.sglang)
    argv = [sys.executable, "-m", "sglang.launch_server"]
    for key, value in opts.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


class SGLangProcess:
    """One SGLang server subprocess: ``start()`` -> base URL once ``/health`` answers 200."""

    def __init__(self, model: ModelConfig, engine: EngineConfig, log_path: str | None = None):
        self.model, self.engine = model, engine
        self.port = engine.port or free_port(engine.host if engine.host != "0.0.0.0" else "127.0.0.1")
        self.url = f"http://{engine.host}:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def engine_ranks(self) -> int:
        return self.engine.tp_size

    def start(self) -> SGLangProcess:
        argv = sglang_command(self.model, self.engine, self.port)
        log.info("starting SGLang: %s", " ".join(argv))
        out = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     start_new_session=True)
        deadline = time.monotonic() + self.engine.startup_timeout_s
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"SGLang exited with code {self.proc.returncode} during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"SGLang not healthy within {self.engine.startup_timeout_s:.0f}s")
            time.sleep(HEALTH_POLL_S)
        log.info("SGLang healthy at %s (pid %d)", self.url, self.proc.pid)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the PID we started
        for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived their parent in the group
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
