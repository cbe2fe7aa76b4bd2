"""Local supervisor: one command starts, watches and stops every daemon of a job on this machine.

``Supervisor(specs, run_dir).run()`` starts the ``ProcSpec``s stage by stage, each in its own
session, and waits for every ``/health``; streams each one's output, prefixed with its name, to
the console and to ``<run_dir>/logs/<name>.log`` (rotated: at most ``(log_backups + 1) x
log_max_bytes`` per process); restarts a process that exits (but not one that exits 2: it refused
its settings or inputs, so the job fails; "refused to start" when it had not logged ``STARTED``,
and ``run()`` returns 2 too, else "stopped with exit 2") after a doubling back-off, at most
``restarts`` within a sliding ``restart_window_s`` (``RestartBudget``); the *main* process (the
trainer) exiting 0 completes the job. On completion, failure, Ctrl-C, SIGTERM or SIGHUP (not
under ``nohup``) it stops everything in reverse start order: SIGTERM to the group, wait, SIGKILL;
from then on daemon output goes to the logs only. A stop a signal asked for returns 128 + the
signal, whatever the phase it came in. While it runs, ``add``, ``remove`` and ``restart_as``
resize a pool (``areal-like scale``: launch/scale.py, from ``on_tick``): a process removed is
stopped as ``stop_all`` stops it.

Invariants:
* no process is left behind: the kernel sends SIGTERM to every child when the supervisor dies
  (``PR_SET_PDEATHSIG``, ``areal_like/daemon.py``), and since torchrun puts each rank in a session
  of its own, the descendants of every process are recorded on each poll (PID + create time, so a
  recycled PID is never hit) and the survivors killed by PID after the group is gone; what is
  left in a process's group is killed as soon as its exit is seen (before a restart forgets the
  group; its number is signalled only then, never later, when another group may have it);
* every process inherits ``inherit_fds`` (the run directory's job lock, ``launch/rundir.py``), so
  the lock is held until the last daemon of the job is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from logging.handlers import RotatingFileHandler
from pathlib import Path

import psutil

from areal_like.daemon import GRACEFUL_STOP_S, STARTED, popen_tied

POLL_S = 0.5  # how often exits are noticed; a restart within a second is plenty for daemons
STOP_GRACE_S = GRACEFUL_STOP_S + 5.0  # SIGTERM -> SIGKILL, with room for a clean stop to finish
HEALTH_PROBE_S = 2.0  # one /health request; a daemon answering slower than this is not healthy
# first wait between a crash and its restart, so a crash loop does not spin the CPU
RESTART_BACKOFF_S = 1.0
REFUSED_EXIT = 2  # it refused what it was given (areal_like/daemon.py StartRefused): no restart
LOG_MAX_BYTES = 100 << 20  # a daemon's log file rotates past this (launch.log_max_mb)
LOG_BACKUPS = 3  # rotated files kept per log (launch.log_backups)


def rotating_file(path: Path, max_bytes: int = LOG_MAX_BYTES,
                  backups: int = LOG_BACKUPS) -> RotatingFileHandler:
    """Lines (``write_line``) into ``path``, rotated into ``path.1`` ... ``path.<backups>``."""
    handler = RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8",
                                  errors="replace", delay=True)  # opened at the first line
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def write_line(handler: RotatingFileHandler, line: str) -> None:
    handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))


class RestartBudget:
    """Restarts of one process in a sliding window: ``allow(now)`` records one if fewer than
    ``limit`` happened in the last ``window_s`` seconds; ``backoff(now)`` is the wait before it,
    ``base_s`` doubled for each restart already in the window, at most ``max_s``."""

    def __init__(self, limit: int, window_s: float = 3600.0, base_s: float = RESTART_BACKOFF_S,
                 max_s: float = 60.0):
        self.limit, self.window_s, self.base_s, self.max_s = limit, window_s, base_s, max_s
        self.times: deque[float] = deque()

    def recent(self, now: float) -> int:
        while self.times and now - self.times[0] >= self.window_s:
            self.times.popleft()
        return len(self.times)

    def backoff(self, now: float) -> float:
        return min(self.max_s, self.base_s * 2 ** self.recent(now))

    def allow(self, now: float) -> bool:
        if self.recent(now) >= self.limit:
            return False
        self.times.append(now)
        return True


@dataclass(kw_only=True)
class ProcSpec:
    """A process the supervisor owns. ``argv`` may be a function (fresh ports on each start)."""

    name: str
    argv: list[str] | Callable[[], list[str]]
    env: dict[str, str] = field(default_factory=dict)  # added to the supervisor's environment
    health_url: str | None = None  # GET -> 200 when ready; None = ready once started
    stage: int = 0  # lower stages start (and become healthy) first
    # its own start-up allowance, when longer than the supervisor's
    health_timeout_s: float | None = None
    main: bool = False  # exiting 0 completes the job (the trainer)
    cpus: tuple[int, ...] | None = None  # pinned cores (taskset)


@dataclass
class _Proc:
    spec: ProcSpec
    budget: RestartBudget
    popen: subprocess.Popen | None = None
    restarts: int = 0  # in the whole job (the budget counts those in its window)
    restart_at: float | None = None  # exited: started again at this monotonic time
    descendants: dict[int, psutil.Process] = field(default_factory=dict)  # by PID
    pump: threading.Thread | None = None
    started: bool = False  # this start logged ``STARTED`` (areal_like/daemon.py)


class JobFailed(RuntimeError):
    """The job cannot go on; ``daemon`` names the process that failed it (None: not one process),
    ``code`` is the job's exit status (``REFUSED_EXIT``: that process refused to start)."""

    def __init__(self, message: str, daemon: str | None = None, code: int = 1):
        super().__init__(message)
        self.daemon, self.code = daemon, code


class Supervisor:
    def __init__(self, specs: list[ProcSpec], run_dir: str | Path, restarts: int = 3,
                 health_timeout_s: float = 300.0, stop_grace_s: float = STOP_GRACE_S,
                 restart_window_s: float = 3600.0, restart_backoff_s: float = RESTART_BACKOFF_S,
                 restart_backoff_max_s: float = 60.0,
                 echo: Callable[[str], None] | None = None,
                 on_tick: Callable[[Supervisor], None] | None = None,
                 on_change: Callable[[Supervisor], None] | None = None,
                 inherit_fds: tuple[int, ...] = (), log_max_bytes: int = LOG_MAX_BYTES,
                 log_backups: int = LOG_BACKUPS):
        # each process's restart budget, also of one added while the job runs (``add``)
        self.budget = (restarts, restart_window_s, restart_backoff_s, restart_backoff_max_s)
        self.procs = [_Proc(s, RestartBudget(*self.budget))
                      for s in sorted(specs, key=lambda s: s.stage)]
        self.run_dir = Path(run_dir)
        self.log_dir = self.run_dir / "logs"
        self.health_timeout_s = health_timeout_s
        self.stop_grace_s = stop_grace_s
        self.echo = echo if echo is not None else _stderr_echo
        self.on_tick = on_tick
        # called after any (re)start: e.g. rewrite ports.json with the new PIDs
        self.on_change = on_change
        # after the main process completed, before anything is stopped (tests inspect the finished
        # job's live daemons here)
        self.on_complete: Callable[[Supervisor], None] | None = None
        self.inherit_fds = inherit_fds  # open in every process it starts (the run_dir lock)
        self.log_max_bytes, self.log_backups = log_max_bytes, log_backups
        # one per process name, kept across its restarts
        self.logs: dict[str, RotatingFileHandler] = {}
        self.stop_event = threading.Event()
        self.stopping = threading.Event()  # stop_all began: daemon output to the logs only
        # the signal that asked for the stop (before stop_all): ``run()`` returns 128 + it
        self.stop_signal: int | None = None
        self.outcome = ""
        # the process that failed the job (see error_tail for its log)
        self.failed: str | None = None

    # ---- public
    def request_stop(self, signum: int | None = None, _frame=None) -> None:
        """Stop the job; ``signum``: the signal that asks it (a signal handler's first argument),
        which makes ``run()`` return 128 + it unless the job was already stopping."""
        if signum is not None and self.stop_signal is None and not self.stopping.is_set():
            self.stop_signal = signum
        self.stop_event.set()

    def hang_up(self, *_args) -> None:
        """SIGHUP: the console is gone (``console_gone``); then the job stops as on Ctrl-C."""
        console_gone()
        self.request_stop(signal.SIGHUP)

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # nohup: the user asked to outlive the terminal
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
            signal.signal(signal.SIGHUP, self.hang_up)

    def pids(self) -> dict[str, int | None]:
        return {p.spec.name: (p.popen.pid if p.popen and p.popen.poll() is None else None)
                for p in self.procs}

    def proc(self, name: str) -> _Proc:
        return next(p for p in self.procs if p.spec.name == name)

    def run(self) -> int:
        """Start, supervise, stop. Returns 0 when the main process completed, ``REFUSED_EXIT``
        when a process refused to start (exit 2 before it logged ``STARTED``), 128 + the signal
        when one asked for the stop (``request_stop``), in whichever phase (start-up, running, the
        final evaluation ``on_complete`` waits for), 1 otherwise."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.start_all()
            code = self.watch()
            if code == 0 and self.on_complete is not None:
                self.on_complete(self)
        except JobFailed as e:
            self.outcome = f"failed: {e}"
            self.failed = e.daemon
            code = e.code
        finally:
            self.stop_all()
            for handler in self.logs.values():
                handler.close()
        if self.stop_signal is not None:
            code, self.outcome = 128 + self.stop_signal, "stopped on request"
        self.echo(f"[supervisor] {self.outcome}")
        return code

    def start_all(self) -> None:
        for stage in sorted({p.spec.stage for p in self.procs}):
            batch = [p for p in self.procs if p.spec.stage == stage]
            for p in batch:
                self._start(p)
            for p in batch:
                self._wait_healthy(p)
            if self.stop_event.is_set():
                raise JobFailed("stop requested during start-up")
        self.echo(f"[supervisor] all {len(self.procs)} processes healthy")

    def watch(self) -> int:
        while not self.stop_event.is_set():
            tree = process_tree()  # one walk of the process table a tick, for every daemon
            for p in self.procs:
                # waiting out its back-off; the others are still watched
                if p.restart_at is not None:
                    if time.monotonic() >= p.restart_at:
                        p.restart_at = None
                        self._start(p)
                    continue
                self._record_descendants(p, tree)
                rc = p.popen.poll() if p.popen else None
                if rc is None:
                    continue
                # its group's survivors, now: the number is free for reuse once they are gone
                _signal_group(p.popen.pid, signal.SIGKILL)
                if p.spec.main and rc == 0:
                    self.outcome = f"{p.spec.name} completed"
                    return 0
                self._kill_leftovers(p)
                if rc == REFUSED_EXIT:  # its settings or inputs: a restart is refused the same way
                    raise self._refused(p)
                self._schedule_restart(p, rc)
            if self.on_tick is not None:
                self.on_tick(self)
            self.stop_event.wait(POLL_S)
        self.outcome = "stopped on request"
        return 1

    def _refused(self, p: _Proc) -> JobFailed:
        """What fails the job when ``p`` exited 2: "refused to start" (the job's exit is 2 too)
        unless it had logged ``STARTED`` ("stopped with exit 2": it ran)."""
        p.pump.join(timeout=5)  # its last lines read: did it start?
        if p.started:
            return JobFailed(f"{p.spec.name} stopped with exit {REFUSED_EXIT}", p.spec.name)
        return JobFailed(f"{p.spec.name} refused to start (exit {REFUSED_EXIT})", p.spec.name,
                         code=REFUSED_EXIT)

    def _schedule_restart(self, p: _Proc, rc: int) -> None:
        now, budget = time.monotonic(), p.budget
        wait = budget.backoff(now)
        if not budget.allow(now):
            raise JobFailed(f"{p.spec.name} exited with {rc} and has no restarts left "
                            f"({budget.limit} within {budget.window_s:.0f}s)", p.spec.name)
        p.restarts += 1
        p.restart_at = now + wait
        self.echo(f"[supervisor] {p.spec.name} exited with {rc}; restart {budget.recent(now)}/"
                  f"{budget.limit} in the last {budget.window_s:.0f}s ({p.restarts} in all) after "
                  f"{wait:.1f}s")

    def stop_all(self) -> None:
        self.stopping.set()
        for p in reversed(self.procs):
            self._stop(p)

    # ---- pools resized while the job runs (launch/scale.py, from ``on_tick``)
    def add(self, spec: ProcSpec) -> None:
        """Start one more process; it is supervised (restarted, stopped) as the others, and stopped
        before those of a lower stage."""
        p = _Proc(spec, RestartBudget(*self.budget))
        at = next((i for i, q in enumerate(self.procs) if q.spec.stage > spec.stage),
                  len(self.procs))
        self.procs.insert(at, p)
        self._start(p)

    def remove(self, name: str, grace_s: float | None = None) -> None:
        """Stop process ``name`` as ``stop_all`` does (SIGTERM: a daemon's graceful stop; SIGKILL
        after ``grace_s``, default ``stop_grace_s``) and supervise it no more."""
        p = self.proc(name)
        p.restart_at = None
        self._stop(p, grace_s)
        self.procs.remove(p)
        self.echo(f"[supervisor] removed {name}")

    def restart_as(self, name: str, spec: ProcSpec, grace_s: float | None = None) -> None:
        """Stop process ``name`` as ``remove`` does, then start it again as ``spec``."""
        p = self.proc(name)
        p.restart_at = None
        self._stop(p, grace_s)
        p.spec = spec
        self._start(p)

    # ---- one process
    def _start(self, p: _Proc) -> None:
        argv = p.spec.argv() if callable(p.spec.argv) else list(p.spec.argv)
        if p.spec.cpus is not None:
            argv = _pin(argv, p.spec.cpus)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **p.spec.env}
        log = self.logs.get(p.spec.name)
        if log is None:
            log = self.logs[p.spec.name] = rotating_file(self.log_dir / f"{p.spec.name}.log",
                                                         self.log_max_bytes, self.log_backups)
        write_line(log, f"{LOG_START}{time.strftime('%H:%M:%S')}: {' '.join(argv)}")
        p.popen = popen_tied(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             pass_fds=self.inherit_fds)
        p.descendants, p.started = {}, False
        p.pump = threading.Thread(target=self._pump, args=(p, p.popen, log), daemon=True,
                                  name=f"log-{p.spec.name}")
        p.pump.start()
        self.echo(f"[supervisor] started {p.spec.name} pid={p.popen.pid}")
        if self.on_change is not None:
            self.on_change(self)

    def _pump(self, p: _Proc, popen: subprocess.Popen, log: RotatingFileHandler) -> None:
        name = p.spec.name
        for raw in iter(popen.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            write_line(log, line)
            p.started = p.started or line.endswith(f": {STARTED}")
            if not self.stopping.is_set():
                self.echo(f"{name:>10} | {line.rstrip()}")
        popen.stdout.close()

    def _wait_healthy(self, p: _Proc) -> None:
        timeout_s = max(self.health_timeout_s, p.spec.health_timeout_s or 0.0)
        deadline = time.monotonic() + timeout_s
        while p.spec.health_url and not self.stop_event.is_set():
            if p.popen.poll() is not None:
                _signal_group(p.popen.pid, signal.SIGKILL)  # as ``watch`` does
                if p.spec.main and p.popen.returncode == 0:
                    return  # it completed before it was seen healthy (a short job): watch() says so
                if p.popen.returncode == REFUSED_EXIT:
                    raise self._refused(p)
                raise JobFailed(f"{p.spec.name} exited with {p.popen.returncode} "
                                "before it was healthy "
                                f"(see {self.log_dir / (p.spec.name + '.log')})", p.spec.name)
            if probe(p.spec.health_url):
                return
            if time.monotonic() > deadline:
                raise JobFailed(f"{p.spec.name} not healthy at {p.spec.health_url} "
                                f"after {timeout_s:.0f}s",
                                p.spec.name)
            time.sleep(0.2)

    def _record_descendants(self, p: _Proc, tree: dict[int, list[int]]) -> None:
        if p.popen is None or p.popen.poll() is not None:
            return
        stack = list(tree.get(p.popen.pid, ()))
        while stack:
            pid = stack.pop()
            stack.extend(tree.get(pid, ()))
            if pid not in p.descendants:
                with contextlib.suppress(psutil.Error):  # exited since the walk: nothing to stop
                    p.descendants[pid] = psutil.Process(pid)  # holds its create time

    def _stop(self, p: _Proc, grace_s: float | None = None) -> None:
        running = p.popen is not None and p.popen.poll() is None
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        if running:
            self._record_descendants(p, process_tree())
            _signal_group(p.popen.pid, signal.SIGTERM)
            try:
                p.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.echo(f"[supervisor] {p.spec.name} ignored SIGTERM for "
                          f"{grace_s:.0f}s; SIGKILL")
                _signal_group(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        if running:  # children that outlived their leader (one that exited before: ``watch``)
            _signal_group(p.popen.pid, signal.SIGKILL)
        self._kill_leftovers(p)
        if p.pump is not None:
            p.pump.join(timeout=5)

    def _kill_leftovers(self, p: _Proc) -> None:
        kill_survivors(p.descendants.values())
        p.descendants = {}


def kill_survivors(procs) -> None:
    """SIGTERM, then SIGKILL, each recorded ``psutil.Process`` still alive: psutil checks its create
    time, so a recycled PID is never signalled."""
    still = [proc for proc in procs if proc.is_running()]
    for send in (psutil.Process.terminate, psutil.Process.kill):
        for proc in still:
            with contextlib.suppress(psutil.Error):
                send(proc)
        _, still = psutil.wait_procs(still, timeout=5)


LOG_START = "---- start "  # the line _start writes before each (re)start of a process
TRACEBACK = "Traceback (most recent call last):"


def error_tail(log: Path, max_lines: int = 20) -> list[str]:
    """Why a process failed, from its log: within its last start, the last Python traceback up to
    its exception line (torchrun's own ChildFailedError traceback is skipped: it only says that a
    rank failed, the rank's traceback is above it), shortened to ``max_lines``; without a traceback,
    the last ``max_lines`` lines. Empty when there is no log."""
    lines = _last_start(log)
    blocks = []
    for i, line in enumerate(lines):
        if TRACEBACK not in line:
            continue
        end = i + 1
        while end < len(lines) and _body(lines[end])[:1] in (" ", "\t"):
            end += 1  # frames are indented; the first unindented line is the exception
        blocks.append(lines[i:end + 1])
    blocks = [b for b in blocks if "ChildFailedError" not in b[-1]]
    if not blocks:
        return lines[-max_lines:]
    block = blocks[-1]
    return block if len(block) <= max_lines else [block[0], "  ...", *block[-(max_lines - 2):]]


# a daemon's log line at ERROR level (areal_like/daemon.py ``setup_logging``): its message
_ERROR_LINE = re.compile(r"\d\d:\d\d:\d\d ERROR \[[^\]]*\] [^:]+: (.+)")


def refusal(log: Path) -> str | None:
    """What a process that exited 2 logged as its refusal (``StartRefused``, logged in one line
    at ERROR level): the message of the last ERROR line of its last start; None when there is none
    (not a daemon's log)."""
    found = [m[1] for line in _last_start(log) if (m := _ERROR_LINE.fullmatch(_body(line)))]
    return found[-1] if found else None


def _last_start(log: Path) -> list[str]:
    """The lines of ``log`` since its last ``LOG_START`` (all of them without one; none without
    the file)."""
    if not log.is_file():
        return []
    lines = log.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(LOG_START)]
    return lines[starts[-1] + 1:] if starts else lines


def _body(line: str) -> str:
    """A log line without torchrun's ``[rank0]: `` prefix (newer torch versions add one)."""
    if line.startswith("[rank") and "]: " in line[:16]:
        return line.split("]: ", 1)[1]
    return line


def console_gone() -> None:
    """After SIGHUP: output to the terminal or a pipe (``| tee``) would fail from now on, so it
    goes to /dev/null (a file keeps its output)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if os.isatty(fd) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.dup2(devnull, fd)
    os.close(devnull)


def probe(url: str, timeout_s: float = HEALTH_PROBE_S) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except Exception:  # refused, timeout, 503: all mean "not healthy yet"
        return False


def alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        return pid is not None and pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_tree() -> dict[int, list[int]]:
    """Child PIDs by parent PID, from one walk of the process table: once a tick for every daemon
    (``Process.children(recursive=True)`` walks all of it per call). Reads ``/proc/PID/stat``
    directly (psutil's ``process_iter`` costs 4x more a walk); the launcher runs on Linux (its
    daemons die with it: ``PR_SET_PDEATHSIG``)."""
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                # "pid (comm) state ppid ...": comm may hold ")"
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split(None, 2)[1])
            except (OSError, ValueError, IndexError):  # exited during the walk
                continue
            tree.setdefault(ppid, []).append(int(name))
    return tree


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _pin(argv: list[str], cpus: tuple[int, ...]) -> list[str]:
    taskset = shutil.which("taskset")
    if taskset is None:
        raise JobFailed("launch.pin_cpus=true needs `taskset` (util-linux)")
    return [taskset, "-c", ",".join(map(str, cpus)), *argv]


_echo_lock = threading.Lock()


def _stderr_echo(line: str) -> None:
    with _echo_lock:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def write_atomic(path: Path, data: str | bytes) -> None:
    """``path`` replaced by a file holding ``data``: a reader sees the old file or the new one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; {} where there is none (no file, not JSON, not an object)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
