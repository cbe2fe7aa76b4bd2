"""Launch and stop an engine server (SGLang: rollout_server/launch_sglang.py, vLLM:
rollout_server/launch_vllm.py) for one rollout server, or as a job's teacher
(rollout_server/engine/__main__.py). ``EngineProcess.start`` checks the release, launches, and
waits until ``/health`` answers; the subclass gives the release check, the environment and the
argv.

Invariants:
* the engine never outlives the rollout server, also when the server is SIGKILLed: it runs in a
  session of its own, tied to the thread that started it (``PR_SET_PDEATHSIG``; ``start()`` runs
  on the server's main thread), and ``stop()`` signals that group by the PID we started (SIGTERM,
  SIGKILL after ``STOP_GRACE_S``), never by name;
* what it leaves in ``/dev/shm``, and its temporary directory (``TMPDIR``, one per engine, where
  SGLang makes its IPC sockets), are removed by a reaper process that outlives the server on
  purpose (``rollout_server/engine_reaper.py``);
* no secret is on its command line (SGLang reads its key from a file, vLLM from its environment);
  a file of secrets is owner-only in that private ``TMPDIR``, removed once the engine is healthy;
* a start that fails says why: the exit code and the engine's last exception line from its log
  (``start_failure``); exit code 2 (its argument parser refusing a pass-through flag) is a refused
  start (``StartRefused``), not a machine fault.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from areal_like.daemon import StartRefused, popen_tied
from areal_like.net.auth import redact_argv
from areal_like.net.distributed import free_port
from areal_like.net.store_gate import listen_on
from areal_like.settings.config import EngineConfig, LoraConfig, ModelConfig
from rollout_server.engine_reaper import GONE_TIMEOUT_S, shm_files

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0  # SGLang frees GPU memory and joins its subprocesses on SIGTERM; give it time
# while the engine starts: how often to ask its /health (a local GET: an engine that became
# healthy waits no more than this) and to tell the reaper its /dev/shm files (reads /proc)
HEALTH_POLL_S = 0.2
SHM_TRACK_S = 1.0
# the last line of a Python traceback: ``AssertionError: ...``, ``torch.OutOfMemoryError: ...``
EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception)(: |$)")


def spawn_tied(argv: list[str], stdout=None, stderr=None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``argv`` in a session of its own, killed by the kernel when this process dies."""
    return popen_tied(argv, signal.SIGKILL, stdout=stdout, stderr=stderr, env=env,
                      start_new_session=True)


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it after ``grace_s``, then every member
    that outlived the leader, also when the leader exited before (its callers stop it soon after
    they see that exit; while a member lives, the group's number is not reused)."""
    pgid = proc.pid  # start_new_session: the group id is the PID we started
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
        os.killpg(pgid, signal.SIGKILL)


def as_flags(opts: dict) -> list[str]:
    """``opts`` (a pass-through table such as ``rollout.engine.sglang``) as command-line words:
    ``--key-with-dashes value``; ``true`` a bare flag, ``false``/``null`` omitted, a list several
    values."""
    argv = []
    for key, value in opts.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif str(value).startswith("-"):  # a separate word would parse as a flag
            argv.append(f"{flag}={value}")
        else:
            argv += [flag, str(value)]
    return argv


class StartAborted(RuntimeError):
    """``EngineProcess.start`` gave up because a stop was requested (what it started is stopped)."""


class EngineProcess(abc.ABC):
    """One engine server subprocess (``NAME``: SGLang, vLLM): ``start()`` -> base URL once
    ``/health`` answers 200. A subclass gives ``check_version``, ``environment`` and ``command``."""

    def __init__(self, model: ModelConfig, engine: EngineConfig, log_path: str | None = None,
                 api_key: str | None = None, lora: LoraConfig | None = None,
                 routed_experts: bool = False):
        self.model, self.engine, self.api_key = model, engine, api_key
        self.lora = lora if lora is not None and lora.enabled else None  # serve its adapters
        self.routed_experts = routed_experts  # return each token's experts (routing replay)
        self.port = engine.port or free_port(engine.host if engine.host != "0.0.0.0"
                                             else "127.0.0.1")
        self.url = f"http://{engine.host}:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.reaper: subprocess.Popen | None = None  # engine_reaper.py: outlives us to clean up
        self.shm: set[str] = set()  # the /dev/shm files the engine made (told to the reaper)
        self.tmpdir: str | None = None  # the engine's TMPDIR, removed by the reaper
        self.log_from = 0  # the size of log_path when this start opened it

    NAME = "engine"  # in messages, and its TMPDIR's prefix

    @property
    def engine_ranks(self) -> int:
        return self.engine.tp_size

    @abc.abstractmethod
    def check_version(self) -> None:
        """Refuse (before anything starts) an engine release this launch was not checked with."""

    @abc.abstractmethod
    def environment(self) -> dict[str, str]:
        """The engine's environment (``TMPDIR`` is added to it)."""

    @abc.abstractmethod
    def command(self, tmpdir: str, env: dict[str, str]) -> tuple[list[str], str | None]:
        """The argv, and the file of secrets it names (removed once healthy), if any; ``env`` is
        the engine's environment (an engine may take its secrets from there)."""

    def start(self, stop_requested: Callable[[], bool] = lambda: False,
              meanwhile: Callable[[], object] | None = None) -> EngineProcess:
        """Launch and wait until healthy; gives up (stopping what it started) at the startup
        timeout or as soon as ``stop_requested()``. ``meanwhile`` runs once here while the engine
        loads (the rollout server's tokenizer); what it raises stops the engine."""
        self.check_version()
        env = self.environment()
        try:  # a port taken: the engine fails only after loading the model, its /health another's
            listen_on(self.engine.host, self.port).close()
        except OSError as e:
            raise RuntimeError(f"{self.engine.host}:{self.port} (rollout.engine.port) is in use "
                               f"({e.strerror}): {self.NAME} cannot listen there; free it or "
                               "leave rollout.engine.port at 0 (a free port)") from None
        # short: a socket path has 107 bytes
        self.tmpdir = tempfile.mkdtemp(prefix=self.NAME.lower() + "-")
        argv, secrets_file = self.command(self.tmpdir, env)
        log.info("starting %s: %s", self.NAME, " ".join(redact_argv(argv)))
        # an engine may print its arguments, the API key among them: its log is readable by this
        # user only
        out = (os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                         "ab") if self.log_path else None)
        if out is not None:
            os.fchmod(out.fileno(), 0o600)  # also a log an earlier run left readable
            self.log_from = os.fstat(out.fileno()).st_size  # where this start's lines begin
        self.proc = spawn_tied(argv, stdout=out, stderr=subprocess.STDOUT if out else None,
                               env={**env, "TMPDIR": self.tmpdir})
        reaper = [sys.executable, "-m", "rollout_server.engine_reaper", str(self.proc.pid),
                  self.tmpdir]
        self.reaper = subprocess.Popen(reaper, stdin=subprocess.PIPE, text=True,
                                       start_new_session=True,
                                       env={**os.environ, "PYTHONPATH": project_path()})
        deadline = time.monotonic() + self.engine.startup_timeout_s
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                self.stop()
                raise
        tracked = 0.0
        while not healthy(self.url):
            if time.monotonic() - tracked >= SHM_TRACK_S:
                # also while it starts: one that fails or is stopped then leaves them
                self.track_shm()
                tracked = time.monotonic()
            if self.proc.poll() is not None:
                self.stop()
                raise self.start_failure()
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.NAME} not healthy within "
                                   f"{self.engine.startup_timeout_s:.0f}s")
            if stop_requested():
                self.stop()
                raise StartAborted(f"stop requested while {self.NAME} was starting")
            time.sleep(HEALTH_POLL_S)
        log.info("%s healthy at %s (pid %d)", self.NAME, self.url, self.proc.pid)
        if secrets_file:  # read at its start; the reaper removes TMPDIR in any case
            os.unlink(secrets_file)
        self.track_shm()
        return self

    def start_failure(self) -> RuntimeError:
        """Why the engine exited during startup: its exit code and, from what this start wrote to
        its log, the last exception a traceback ended with (SGLang's scheduler's, before the lines
        of its parent killing the rest), else the last line (an argument parser names the flag it
        refused there), with the engine API key as ``***`` (SGLang logs its server_args
        unredacted); exit code 2, that parser refusing a flag (``rollout.engine.<kind>.*``), is a
        ``StartRefused``: the settings, not the machine."""
        code = self.proc.returncode
        last = ""
        with contextlib.suppress(OSError, TypeError):  # no log file: SGLang wrote to our stdout
            with open(self.log_path, "rb") as f:  # appended to by every start: read this one's
                f.seek(max(self.log_from, os.fstat(f.fileno()).st_size - 65536))
                lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
            lines = [ln for ln in lines if ln]
            last = next((ln for ln in reversed(lines) if EXCEPTION_LINE.match(ln)),
                        lines[-1] if lines else "")
        if self.api_key:
            last = last.replace(self.api_key, "***")
        why = f": {last} (in {self.log_path})" if last else ""
        return (StartRefused if code == 2 else RuntimeError)(
            f"{self.NAME} exited with code {code} during startup{why}")

    def track_shm(self) -> None:
        """Tell the reaper the /dev/shm files the engine's processes hold now (it unlinks them)."""
        new = shm_files(self.proc.pid) - self.shm
        if new and self.reaper is not None and self.reaper.poll() is None:
            self.reaper.stdin.write("".join(f + "\n" for f in sorted(new)))
            self.reaper.stdin.flush()
            self.shm |= new

    def exit_code(self, wait_s: float = 0.0) -> int | None:
        """None while the engine's main process runs (after waiting up to ``wait_s`` for its exit);
        then its exit code (negative: the signal)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(wait_s) if wait_s > 0 else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Stop the engine's group, then let the reaper remove its files and TMPDIR (waiting for it,
        bounded)."""
        if self.proc is not None:
            stop_group(self.proc)
        if self.reaper is not None:
            self.reaper.stdin.close()  # end of file: the reaper kills what is left and unlinks
            try:
                self.reaper.wait(timeout=GONE_TIMEOUT_S + 5)
            except subprocess.TimeoutExpired:
                log.error("the engine reaper (pid %d) did not finish", self.reaper.pid)
            self.reaper = None


def healthy(url: str) -> bool:
    """Whether the engine at ``url`` answers ``GET /health`` 200. Without the API key: SGLang and
    vLLM leave /health open, and whatever holds the port while the engine starts gets no key from
    this poll."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def project_path() -> str:
    """PYTHONPATH for a child importing this project: where it is imported from, then the rest."""
    here = str(Path(__file__).resolve().parents[1])
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    return os.pathsep.join([here, *rest])
