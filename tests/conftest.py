"""Shared fixtures: ephemeral ports, temporary run directories, and tracked subprocesses.

Every process a test starts goes through ``spawn_python`` so teardown can stop it by PID
(SIGTERM, then SIGKILL after ``TERM_GRACE_S``), and its descendants after it, by PID as
well, also when the run itself is stopped with SIGTERM. Nothing here kills by name.
"""

from __future__ import annotations

import contextlib
import json
import os

# One thread per process on few shared cores and unbuffered output from the processes tests
# start, set here (before torch is imported) rather than by the shell: the README's test command
# in a plain shell runs as CI does. A shell's own value stays.
for _name, _value in (("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"),
                      ("TOKENIZERS_PARALLELISM", "false"), ("PYTHONUNBUFFERED", "1")):
    os.environ.setdefault(_name, _value)
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from areal_like.net import distributed

REPO_ROOT = Path(__file__).resolve().parent.parent
TERM_GRACE_S = 10.0  # a daemon's graceful stop (GRACEFUL_STOP_S) fits in this; then SIGKILL


def _stopped(signum, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the run without teardown
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_configure(config) -> None:
    # a run stopped with SIGTERM (a CI timeout, `kill PID`) ends as Ctrl-C ends it: every
    # fixture's teardown runs and stops the processes its test started
    signal.signal(signal.SIGTERM, _stopped)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for test subprocesses: one thread per process (2 shared cores), unbuffered
    output, the repository importable even without the editable install, and the Python stacks of
    every thread printed if a process dies of a fatal signal (a native crash, an abort)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONFAULTHANDLER="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env



def run_cli(*args: str, timeout: float = 600, cwd: Path = REPO_ROOT,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``areal-like ARGS`` in a subprocess (``child_env()`` unless ``env``), output captured as
    text. Past ``timeout`` it and every process it started are killed, by PID, before
    ``TimeoutExpired`` is raised, so a hung job leaves no process behind."""
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env or child_env())
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in _descendants(proc.pid) + [proc]:
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                p.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_json_worker(script: str, out: Path, timeout_s: float) -> dict:
    """Runs ``python SCRIPT OUT`` (a test file's worker half, in a process of its own) from the
    repository root with ``child_env()``; it must exit 0 (else its stderr's tail is shown). Returns
    the JSON it wrote to OUT."""
    proc = subprocess.run([sys.executable, script, str(out)], capture_output=True, text=True,
                          timeout=timeout_s, env=child_env(), cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Waits for each process to exit 0 (``timeout_s`` each); whatever the outcome, any of them
    still running afterwards is killed, by its PID, and reaped."""
    try:
        for p in procs:
            assert p.wait(timeout=timeout_s) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def live_children() -> set[int]:
    """The pids of this process's descendants now: a test that starts a job compares the set
    after it with the one before (nothing left running)."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def stop_process(proc: subprocess.Popen, grace_s: float = TERM_GRACE_S) -> int | None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL, all by PID; then the same for any of its
    descendants still alive (a daemon's own children must not outlive the test). Returns the
    exit code."""
    children = _descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
    alive = [c for c in children if c.is_running()]
    for child in alive:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


class Spawner:
    """Starts Python subprocesses and remembers them for teardown."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.procs: list[subprocess.Popen] = []

    def __call__(self, code_or_module: str, args: list[str] | tuple[str, ...] = (), *,
                 env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 capture: bool = True) -> subprocess.Popen:
        """Start ``python -m MODULE args`` (a dotted name) or ``python -c CODE args`` (anything
        else).

        stdout/stderr are pipes when ``capture`` (read them with ``proc.communicate``), else
        inherited. Text mode.
        """
        is_module = (code_or_module.replace(".", "").replace("_", "").isalnum()
                     and "\n" not in code_or_module)
        cmd = [sys.executable, "-m", code_or_module] if is_module else \
            [sys.executable, "-c", textwrap.dedent(code_or_module)]
        pipe = subprocess.PIPE if capture else None
        proc = subprocess.Popen([*cmd, *map(str, args)], env=child_env(env),
                                cwd=str(cwd or self.cwd),
                                stdout=pipe, stderr=pipe, text=True)
        self.procs.append(proc)
        return proc

    def one_and_two_ranks(self, code: str, script: str, out: Path, port: int,
                          timeout_s: float, env: dict | None = None) -> tuple[Path, Path]:
        """Run ``python -c code script DIR`` as one process (``out/one``) and as two torch ranks on
        ``port`` (``out/two``), with ``env`` added; both must exit 0. Returns the two
        directories."""
        one, two = out / "one", out / "two"
        one.mkdir()
        two.mkdir()
        ranks = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs = [self(code, [script, one], capture=False, env=env)]
        procs += [self(code, [script, two], capture=False,
                       env={**(env or {}), **ranks, "RANK": str(r), "LOCAL_RANK": str(r)})
                  for r in (0, 1)]
        assert [p.wait(timeout=timeout_s) for p in procs] == [0, 0, 0]
        return one, two

    def kill9(self, proc: subprocess.Popen) -> None:
        """Failure injection: SIGKILL by PID and reap."""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()`` -> an ephemeral TCP port on 127.0.0.1 (call it once per socket)."""
    return distributed.free_port


@pytest.fixture
def tmp_run_dir(tmp_path: Path) -> Path:
    """A fresh run directory (what ``RunConfig.run_dir`` points to)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_dir


@pytest.fixture
def spawn_python(tmp_path: Path) -> Iterator[Spawner]:
    """``spawn_python(code_or_module, args)`` -> Popen; every process is stopped at teardown."""
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.cleanup()


def port_free(port: int) -> bool:
    """Nothing listens on loopback ``port`` (a socket in TIME_WAIT is not a listener)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_until(predicate: Callable[[], object], timeout_s: float = 60.0, interval_s: float = 0.05,
               what: str = "condition") -> object:
    """Poll ``predicate`` until truthy; raise AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., object]:
    """The ``wait_until(predicate, timeout_s, interval_s, what)`` helper as a fixture."""
    return wait_until
