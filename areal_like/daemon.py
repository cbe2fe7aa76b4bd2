"""Lifecycle skeleton shared by every daemon: ``serve()`` installs SIGTERM/SIGINT handlers that
request a graceful stop, starts ``/metrics`` and ``/health``, calls ``start()``, then ``run()``
(``run_once()`` in a loop) until a stop is requested, and always ``stop()``.

Invariant: a daemon is never left half alive: a part that fails while it runs sets ``failure``,
the loop raises it (``raise_if_component_stopped``) and the daemon exits non-zero with one line.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from areal_like.net.auth import http_bind_host, metrics_token
from areal_like.net.metrics import Metrics, MetricsServer
from areal_like.net.security import SecurityError

GRACEFUL_STOP_S = 10.0  # after SIGTERM, how long stop() may take before the launcher's kill


# Every daemon's environment (a user's own value wins): glibc keeps freed blocks up to 32 MiB
# (per arena) instead of handing each group's frames back to the kernel and faulting them in again
# (~100 us per 400 KB group on each side: benchmarks/bench_transport.py).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(32 << 20)}


class LockHeld(Exception):
    """Another process holds a ``pid_lock``; ``holder`` is the PID it wrote ("?" if none)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def pid_lock(path: Path, mode: int, flags: int = os.O_CLOEXEC) -> int:
    """An exclusive ``flock`` on ``path`` (created with ``mode``) with ``"<pid> <create_time>"`` of
    this process written in it (psutil's create_time: a reader on this machine tells the holder from
    a later process that reuses its PID), held until its descriptor (returned) is closed; LockHeld
    at once if another has it, OSError from ``flock`` (a file system without locks)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = (os.pread(fd, 64, 0).decode(errors="replace").split() or ["?"])[0]
        os.close(fd)
        raise LockHeld(holder) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {psutil.Process().create_time()!r}\n".encode(), 0)
    return fd


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` durable (a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TIED = str(Path(__file__).with_name("tied.py"))


def popen_tied(argv: list[str], sig: int = signal.SIGTERM, **popen) -> subprocess.Popen:
    """``subprocess.Popen(argv, **popen)`` whose process the kernel sends ``sig`` when the calling
    thread's process dies, also by ``kill -9`` (``PR_SET_PDEATHSIG``, set by ``tied.py`` before
    it execs ``argv``; a child whose parent died before that exits 1). FileNotFoundError, as from
    Popen, when ``argv[0]`` is not found on the ``PATH`` it will run with. Linux only."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError("a tied child needs Linux (prctl PR_SET_PDEATHSIG)")
    path = (popen.get("env") or os.environ).get("PATH", os.defpath)
    program = shutil.which(argv[0], path=path)
    if program is None:
        raise FileNotFoundError(errno.ENOENT, "no such program", argv[0])
    return subprocess.Popen([sys.executable, "-I", "-S", TIED, str(os.getpid()), str(int(sig)),
                             os.path.abspath(program), *argv], **popen)


def setup_logging(name: str, level: str | None = None) -> logging.Logger:
    """Structured, single-line logs tagged with the daemon name and PID."""
    given = level or os.environ.get("AREAL_LIKE_LOG_LEVEL") or "INFO"
    level = given.upper()
    unknown = not isinstance(logging.getLevelName(level), int)  # a typo does not stop the daemon
    root = logging.getLogger()
    if not getattr(root, "_areal_like_configured", False):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s [{name} pid={os.getpid()}] %(name)s: %(message)s",
            "%H:%M:%S"))
        root.handlers[:] = [handler]
        root.setLevel("INFO" if unknown else level)
        root._areal_like_configured = True  # type: ignore[attr-defined]
        if unknown:
            root.warning("AREAL_LIKE_LOG_LEVEL=%r is not a logging level (DEBUG, INFO, WARNING, "
                         "ERROR): logging at INFO", given)
    return logging.getLogger(name)


def exit_process(code: int) -> None:
    """Flush and exit without the interpreter's teardown (seconds over torch's objects)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ComponentStopped(RuntimeError):
    """A supervised background task ended while the daemon was running."""


STARTED = "started"  # logged once start() returned: launch/local.py tells a refusal to start by it


class StartRefused(RuntimeError):
    """What the daemon was given cannot be served by this build: one line and exit status 2."""


class Daemon:
    name = "daemon"

    def __init__(self, metrics_port: int = 0):
        self.log = logging.getLogger(self.name)
        self.metrics = Metrics()
        self.metrics_port = metrics_port
        self.metrics_host = http_bind_host()
        self.metrics_server: MetricsServer | None = None
        self.stop_requested = threading.Event()
        self.failure: BaseException | None = None

    def start(self) -> None:
        """Open sockets, load state. Called once before run()."""

    def run_once(self) -> None:
        """One iteration of the daemon loop; must return within about a second."""
        raise NotImplementedError(f"{type(self).__name__} must implement run_once() or run()")

    def run(self) -> None:
        while not self.stop_requested.is_set():
            self.raise_if_component_stopped()
            self.run_once()

    def stop(self) -> None:
        """Release resources. Called once, also after a failure."""

    def health(self) -> tuple[bool, dict]:
        return self.failure is None, {"name": self.name, **self.failed()}

    def failed(self) -> dict:
        """``{"error": kind}`` once a failure is recorded (the daemon is on its way out: `areal-like
        status` says DOWN, not starting); only the kind, the reason is in the log."""
        return {} if self.failure is None else {"error": type(self.failure).__name__}

    def raise_if_component_stopped(self) -> None:
        """Raise the failure a part of the daemon recorded in ``failure`` (the daemon exits 1)."""
        if self.failure is not None:
            raise ComponentStopped(f"{self.name}: {type(self.failure).__name__}: {self.failure}")

    def request_stop(self, *_args) -> None:
        if not self.stop_requested.is_set():
            self.log.info("stop requested")
        self.stop_requested.set()

    def start_metrics(self) -> None:
        if self.metrics_server is None and self.metrics_port is not None and self.metrics_port >= 0:
            token = metrics_token()
            try:
                self.metrics_server = MetricsServer(self.metrics, self.metrics_port,
                                                    self.metrics_host, health=self.health,
                                                    token=token)
            except OSError as e:  # a fixed port another process holds, a host not of this machine
                raise StartRefused(f"{self.name}.metrics_port={self.metrics_port}: cannot listen "
                                   f"on {self.metrics_host}: {e.strerror or e}") from None
            self.log.info("metrics on http://%s:%d/metrics (%s)", self.metrics_host,
                          self.metrics_server.port,
                          "bearer token required" if token else "no token")

    def serve(self) -> int:
        """Run the daemon to completion; returns the process exit code."""
        if not logging.getLogger().handlers:  # a bare process (not under pytest / an embedding app)
            setup_logging(self.name)
        previous_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous_handlers[sig] = signal.signal(sig, self.request_stop)
        code = 0
        try:
            self.start_metrics()
            self.start()
            self.log.info(STARTED)
            self.run()
            self.raise_if_component_stopped()
        except ComponentStopped as e:
            self.log.error("%s", e)
            code = 1
        # a key, socket directory or file mode it was given (areal_like/SECURITY.md)
        except (StartRefused, SecurityError) as e:
            self.log.error("%s", e)
            self.failure = self.failure or e  # /health says so while stop() runs
            code = 2
        except Exception as e:
            self.log.exception("%s crashed", self.name)
            self.failure = self.failure or e
            code = 1
        finally:
            self.stop_requested.set()
            try:
                self.stop()
            except Exception:
                self.log.exception("error while stopping")
                code = code or 1
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.log.info("stopped (exit %d)", code)
            # serve() run in-process (tests) leaves no trace
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        return code
