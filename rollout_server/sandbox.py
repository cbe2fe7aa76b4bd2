"""Sandboxed calls: user code (reward functions, and the tools an agent calls) in worker processes.

``Worker`` is one worker process (``reward_worker.py`` runs in it) and the caller's end of its
socket; the reward pool and the tool pool keep several alive (``WorkerPool``), each calling
``fn(*args)`` for ``"pkg.module:function"``.

A worker is a fresh ``python -I`` (not a fork: the server runs asyncio and threads) in a session
of its own, with an environment without anything that looks like a secret (``SECRET_NAME``), the
limits ``reward_worker.py`` sets itself, and a wall-clock deadline per call (``limits.timeout_s``)
enforced by the caller with SIGKILL to its process group, by PID, then reaped. Root's workers
start in namespaces of their own, as a uid and gid of their own, with a private ``/tmp`` and
``/dev/shm``, every other mount read-only and (unless ``SandboxLimits.network``) no network;
``hide`` (called by the rollout server at start) names the directories covered there too, where
the job's secrets lie (``setup_script``; what is and is not covered: areal_like/SECURITY.md,
"Reward and tool code").

Failure kinds (``WorkerLost.kind``, a reply's ``kind``): ``timeout`` | ``memory`` | ``died`` |
``error`` (the call raised, or its result is not JSON) | ``oversize`` (a reply past
``SandboxLimits.reply_bytes``, refused unread); ``StartFailed``: the function could not be
loaded.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import queue
import reprlib
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rollout_server import reward_worker
from rollout_server.reward_worker import FrameTooLarge, recv_frame, send_frame, worker_env

WORKER_SCRIPT = str(Path(reward_worker.__file__).resolve())
PROJECT_DIR = str(Path(WORKER_SCRIPT).parents[1])
# requests queued on a worker ahead of its answers: far below a socket's buffer
PIPELINE_BYTES = 32 * 1024
# a fresh worker imports the function's module (sympy, torch, ...) on a busy machine
STARTUP_TIMEOUT_S = 120.0
# root's workers: namespaces of their own (``--net`` too unless ``SandboxLimits.network``), set up
# by their PID 1, a shell running ``setup_script`` (then the worker as its child, not exec'd: a
# PID 1 ignores the signals it has no handler for; it exits with the worker's status, 128 + N when
# killed by N)
NAMESPACES = ("--pid", "--fork", "--kill-child", "--mount-proc")
# every mount read-only but the worker's own /tmp and /dev/shm (a path no longer there was under a
# cover: nothing reaches it)
READ_ONLY_REST = ('for m in $(awk \'{print $5}\' /proc/self/mountinfo); do case "$m" in '
                  '/tmp|/dev/shm) continue;; esac; mount -o remount,bind,ro "$m" 2>/dev/null '
                  '|| [ ! -e "$m" ] || { echo "sandbox: cannot make $m read-only" >&2; '
                  'exit 126; }; done')
log = logging.getLogger(__name__)
_hidden: tuple[str, ...] = ()  # directories covered in root's workers (hide())
_isolating: bool | None = None  # root's workers start in namespaces (None: not checked yet)
_warned: set[str] = set()  # code directories a worker cannot read, said once


def isolating() -> bool:
    """Whether workers start in namespaces of their own (root, with util-linux ``unshare``)."""
    global _isolating
    if _isolating is None:
        unshare = shutil.which("unshare")
        _isolating = os.geteuid() == 0 and unshare is not None and subprocess.run(
            [unshare, *NAMESPACES, "--net", "true"], stdin=subprocess.DEVNULL,
            capture_output=True).returncode == 0
    return _isolating


def hide(paths) -> bool:
    """From now on, start workers where the directories ``paths`` cannot be read (module
    docstring); False, with a warning, where this process cannot (not root, or no ``unshare``).
    ``None``: hide none again."""
    global _hidden
    if paths is None:
        _hidden = ()
        return False
    dirs = tuple(str(Path(p).resolve()) for p in paths if Path(p).is_dir())
    if not isolating() and os.geteuid() == 0:
        log.warning("reward and tool workers get no namespaces of their own (util-linux unshare "
                    "is missing or refused): they run as a uid of their own but share the host's "
                    "/tmp, network and processes, and read what others may of %s "
                    "(areal_like/SECURITY.md)", ", ".join(dirs) or "the job's files")
    elif not isolating():
        log.warning("reward and tool workers run as this job's user: they can read %s and signal "
                    "its processes (hiding them needs root and util-linux unshare; "
                    "areal_like/SECURITY.md)", ", ".join(dirs) or "its files")
    _hidden = dirs if isolating() else ()
    return isolating()


def code_dirs(sys_path: list[str]) -> list[str]:
    """What a worker reads code from: ``sys_path`` (the pool's, absolute), the Python
    environment and this project, each resolved."""
    found = {os.path.realpath(p) for p in (*sys_path, sys.prefix, sys.base_prefix,
                                           sys.exec_prefix, PROJECT_DIR) if os.path.exists(p)}
    for d in found - _warned:
        if os.path.isdir(d) and os.stat(d).st_mode & 0o005 != 0o005:
            _warned.add(d)
            log.warning("%s (on sys.path) is not readable by others: root's reward, tool and "
                        "agent workers run as a uid of their own and cannot import from it "
                        "(chmod o+rx; areal_like/SECURITY.md)", d)
    return sorted(found - {"/", "/tmp"})


def covers(dirs: list[str]) -> dict[str, list[str]]:
    """``{cover: dirs under it}``: a worker's own /tmp, and each top-most directory others may
    not enter (a root-only home holding the interpreter), replaced in its mount namespace by a
    directory holding only ``dirs`` (bound read-only at their own paths): the worker's uid can
    reach them, and nothing else there. A directory inside another is carried by it."""
    out: dict[str, list[str]] = {}
    for d in dirs:
        parts = Path(d).parts
        for i in range(2, len(parts)):
            top = str(Path(*parts[:i]))
            if top == "/tmp" or not os.stat(top).st_mode & stat.S_IXOTH:
                out.setdefault(top, []).append(d)
                break
        else:
            if d.startswith("/tmp/"):  # no cover met before the directory itself
                out.setdefault("/tmp", []).append(d)
    return {top: [d for d in ds if not any(d.startswith(o + "/") for o in ds)]
            for top, ds in out.items()}


def setup_script(cwd: str, code: list[str], hidden: tuple[str, ...], size_mb: int) -> str:
    """What PID 1 of a root worker's namespaces runs (as root) before the worker: a private
    ``/dev/shm`` and ``/tmp`` (tmpfs of ``size_mb``; 0: the kernel's default), each cover of
    ``covers(code)`` built beside and moved into place, each ``hidden`` directory covered by an
    empty tmpfs nobody may enter, every other mount read-only (``/proc``, ``/sys`` and ``/dev``
    too), then the worker started in ``cwd`` (re-entered: the old one may lie under a cover)."""
    q, size = shlex.quote, f",size={size_mb}m" if size_mb else ""
    lines = ["set -e", f"mount -t tmpfs -o nosuid,nodev,mode=1777{size} areal-shm /dev/shm"]
    plan = covers(code)
    plan.setdefault("/tmp", [])
    for i, (top, dirs) in enumerate(sorted(plan.items())):
        stage = f"/dev/shm/.areal-cover{i}"
        mode, room = ("1777", size) if top == "/tmp" else ("755", ",size=1m")
        lines += [f"mkdir {stage}", f"mount -t tmpfs -o nosuid,nodev,mode={mode}{room} "
                                    f"areal-cover {stage}"]
        for d in dirs:
            at = q(stage + d[len(top):])
            lines.append(f"mkdir -p {at}" if os.path.isdir(d)
                         else f"mkdir -p {q(os.path.dirname(stage + d[len(top):]))}; : > {at}")
            lines.append(f"mount --bind {q(d)} {at}; mount -o remount,bind,ro {at}")
        lines += [f"mount --move {stage} {q(top)}", f"rmdir {stage}"]
    lines += [f"if [ -d {q(h)} ]; then mount -t tmpfs -o ro,mode=000,size=4k areal-hidden {q(h)}; "
              "fi" for h in hidden]
    lines += [READ_ONLY_REST, "set +e", f"cd {q(cwd)} 2>/dev/null || cd /", '"$@"']
    return "\n".join(lines)


def _argv(fd: int, limits: SandboxLimits, sys_path: list[str]) -> list[str]:
    worker = [sys.executable, "-I", WORKER_SCRIPT, str(fd)]
    if not isolating():
        return worker
    seen = code_dirs(sys_path) + ([os.path.dirname(limits.endpoint)] if limits.endpoint else [])
    script = setup_script(os.getcwd(), seen, _hidden, limits.memory_mb)
    return [shutil.which("unshare") or "unshare", *NAMESPACES,
            *(() if limits.network else ("--net",)), "/bin/sh", "-c", script, "sh", *worker]


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock of one call; the worker is killed past it
    memory_mb: int = 2048  # address space of the worker; 0 = none
    # processes or threads one call may start (RLIMIT_NPROC above the worker itself)
    processes: int = 0
    # the longest reply read from the worker; a longer one is refused (kind "oversize") and the
    # worker replaced (task.worker_reply_mb)
    reply_bytes: int = 16 * 2**20
    # root's workers: keep the host's network (else a namespace of their own, without any)
    network: bool = False
    # without it: a Forwarder's Unix socket, whose directory the worker sees, its loopback up to
    # relay one endpoint there (an agent's: agent_worker.py)
    endpoint: str = ""


def call_request(args: tuple | list, timeout_s: float) -> bytes:
    """One call of ``fn(*args)`` as a worker reads it (``reward_worker.call_one``)."""
    return pickle.dumps((tuple(args), timeout_s))


class Forwarder:
    """A Unix socket in a directory of its own (``path``) piped to the host's TCP ``target``
    (``forward_to``, once known): what root's agent workers, in network namespaces of their own,
    reach their endpoint through (``SandboxLimits.endpoint``). Anyone may connect to it, as to
    the endpoint's own port."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="areal-endpoint-")
        os.chmod(self.dir, 0o711)  # others may pass, not list
        self.path = os.path.join(self.dir, "endpoint.sock")
        self.target: tuple[str, int] | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o666)  # the workers' uids connect
        self.listener.listen(64)
        threading.Thread(target=reward_worker.relay, args=(self.listener, self._connect),
                         name="endpoint-forwarder", daemon=True).start()

    def forward_to(self, host: str, port: int) -> None:
        self.target = ("127.0.0.1" if host in ("", "0.0.0.0") else host, port)

    def _connect(self) -> socket.socket:
        if self.target is None:
            raise ConnectionRefusedError("no endpoint yet")
        upstream = socket.create_connection(self.target, timeout=10)
        upstream.settimeout(None)
        return upstream

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class StartFailed(Exception):
    """A worker never became ready; its message says why."""


class WorkerLost(Exception):
    """A ready worker cannot answer any more (timeout, death); ``kind`` and ``reason`` as
    reported."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class Worker:
    """One worker process and the caller's end of its socket; used by one thread at a time."""

    def __init__(self, path: str, limits: SandboxLimits):
        ours, theirs = socket.socketpair()
        self.reply_bytes = limits.reply_bytes
        sys_path = [os.path.abspath(p) for p in sys.path]
        try:
            self.proc = subprocess.Popen(_argv(theirs.fileno(), limits, sys_path),
                                         pass_fds=(theirs.fileno(),),
                                         env=worker_env(limits.processes),
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            self.wrapped = isolating()  # its exit status is the shell's (setup_script)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock, self.ready = ours, False
        with contextlib.suppress(OSError):  # it died at once: its first call says how
            # its own uid from its host pid (its own pid may be 2, in a PID namespace of its own)
            send_frame(ours, pickle.dumps({
                "path": path, "sys_path": sys_path,
                "memory_mb": limits.memory_mb, "processes": limits.processes,
                "loopback": bool(limits.endpoint) and isolating() and not limits.network,
                "uid": reward_worker.ISOLATED_UID_BASE + self.proc.pid}))

    def send(self, request: bytes) -> None:
        """Queue one call (a blocking write: the caller queues no more than the socket holds). A
        worker found gone here is reported by the next ``reply``, after the answers it did send."""
        self.wait_ready()
        with contextlib.suppress(OSError):
            self.sock.settimeout(None)  # not the last reply's leftover deadline
            send_frame(self.sock, request)

    def reply(self, timeout_s: float, timeout_reason: str = "") -> dict:
        """The reply to the oldest unanswered call, within ``timeout_s`` from now (a queued call
        starts when the one before it is answered)."""
        try:
            frame = recv_frame(self.sock, time.monotonic() + timeout_s, self.reply_bytes)
        except TimeoutError:
            raise WorkerLost("timeout", timeout_reason or f"timeout after {timeout_s}s") from None
        except FrameTooLarge as e:
            raise WorkerLost("oversize", f"a reply of {e.size} bytes was refused: past the "
                             f"{e.max_bytes} bytes a worker may send (task.worker_reply_mb)"
                             ) from None
        except (EOFError, OSError):
            frame = None
        if frame is None:
            raise WorkerLost("died", self._death())
        try:
            return json.loads(frame)
        except ValueError:
            raise WorkerLost("error",
                             f"unreadable reply from the worker: {frame[:100]!r}") from None

    def wait_ready(self) -> None:
        """Block until the worker has loaded its function; StartFailed if it did not in time."""
        if self.ready:
            return
        try:
            reply = self.reply(STARTUP_TIMEOUT_S, f"not ready after {STARTUP_TIMEOUT_S}s")
        except WorkerLost as lost:
            self.kill()
            raise StartFailed(lost.reason) from None
        if reply.get("ready") is not True:
            self.kill()  # it exits after saying why; reaped here
            raise StartFailed(reply.get("reason", f"bad hello: {reprlib.repr(reply)}"))
        self.ready, self.hello = True, reply

    def _death(self) -> str:
        self.kill()
        code = self.proc.returncode
        if self.wrapped and code > 128:
            code = 128 - code  # the shell's way of saying the worker was killed by a signal
        return f"worker died: signal {-code}" if code < 0 else f"worker died: exit code {code}"

    def kill(self) -> None:
        """SIGKILL the worker's process group and reap the worker (idempotent)."""
        # once reaped, its pid (the group's id) may belong to another process
        if self.proc.returncode is None:
            # ProcessLookupError: the group is gone (the worker died, nothing it started lives)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.sock.close()


class WorkerPool:
    """``size`` workers of the function at ``path`` (the reward pool's, the tool pool's), each used
    by one of the pool's own ``threads`` at a time (``call_all``); a worker's startup never counts
    against a call's timeout. Once ``stop()`` or ``close()`` ran (``dead``), none is started."""

    def __init__(self, path: str, limits: SandboxLimits, size: int, name: str):
        self.path, self.limits = path, limits
        self.workers: list[Worker | None] = [None] * size  # None or killed: started when next used
        self.threads = ThreadPoolExecutor(max(1, size), thread_name_prefix=name)
        self.lock = threading.RLock()  # guards workers and dead across the pool's threads
        self.dead = False
        self._idle: queue.SimpleQueue[int] = queue.SimpleQueue()  # slots no thread is using
        for i in range(size):
            self._idle.put(i)

    @property
    def worker_pids(self) -> list[int]:
        with self.lock:
            return [w.proc.pid for w in self.workers if w is not None]

    def worker(self, i: int) -> Worker:
        """Slot ``i``'s worker, started if there is none or it was killed (its start failed)."""
        worker = self.workers[i]
        return self.start(i) if worker is None or worker.proc.returncode is not None else worker

    def start(self, i: int) -> Worker:
        """A fresh worker in slot ``i``, the old one killed; OSError when no process can be
        started, StartFailed once the pool is dead."""
        if (old := self.workers[i]) is not None:
            old.kill()
        worker = Worker(self.path, self.limits)
        with self.lock:
            if not self.dead:
                self.workers[i] = worker
                return worker
        worker.kill()
        raise StartFailed("the pool was stopped")

    def stop(self) -> None:
        """Kill every worker (reaped when this returns: a thread blocked on one wakes with EOF) and
        start none from now on."""
        with self.lock:
            self.dead = True
            for w in self.workers:
                if w is not None:
                    w.kill()

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        self.stop()
        self.threads.shutdown(wait=True)

    def warm(self) -> None:
        """In a pool thread: start a slot's worker and wait until it is ready (one that fails is
        killed: its slot's next call starts another and says why)."""
        i = self._idle.get()
        try:
            with contextlib.suppress(StartFailed):
                self.worker(i).wait_ready()
        finally:
            self._idle.put(i)

    def hello(self) -> dict:
        """In a pool thread: a ready worker's hello (what it says of its function), a slot's
        worker started if need be. Raises StartFailed, or OSError (no process starts)."""
        i = self._idle.get()
        try:
            worker = self.worker(i)
            worker.wait_ready()
            return worker.hello
        finally:
            self._idle.put(i)

    def call_all(self, requests: list[bytes], timeout_s: float,
                 observe: Callable[[float], None]) -> list[dict | WorkerLost]:
        """In a pool thread: the reply (or ``WorkerLost``) to each request, in order, by one worker.
        Requests are queued on it within ``PIPELINE_BYTES`` (one at least) ahead of its answers, so
        a send never waits on a busy worker; each is answered within ``timeout_s`` from the answer
        before it, its seconds given to ``observe``. A lost worker, or one out of memory (it may be
        left half-done), costs the request it was on and is replaced at once. Fewer replies than
        requests: the pool died meanwhile. Raises StartFailed, or OSError (no process starts)."""
        i = self._idle.get()  # never waits long: there are as many threads as slots
        try:
            return self._call_all(i, requests, timeout_s, observe)
        finally:
            self._idle.put(i)

    def _call_all(self, i: int, requests: list[bytes], timeout_s: float,
                  observe: Callable[[float], None]) -> list[dict | WorkerLost]:
        replies: list[dict | WorkerLost] = []
        while len(replies) < len(requests) and not self.dead:
            worker, sent, queued = self.worker(i), len(replies), 0
            worker.wait_ready()  # its startup is not the request's time (StartFailed escapes)
            t0 = time.monotonic()
            try:
                while len(replies) < len(requests):
                    while sent < len(requests) and (sent == len(replies) or
                                                    queued + len(requests[sent]) <= PIPELINE_BYTES):
                        worker.send(requests[sent])
                        queued, sent = queued + len(requests[sent]), sent + 1
                    replies.append(worker.reply(timeout_s))
                    queued -= len(requests[len(replies) - 1])
                    # a request's time: from the answer before it (or the first send)
                    now = time.monotonic()
                    observe(now - t0)
                    t0 = now
                    if replies[-1].get("kind") == "memory":
                        self.start(i)
                        break
            except WorkerLost as lost:
                observe(time.monotonic() - t0)
                if not self.dead:  # else stop() killed it: not the request's failure
                    self.start(i)
                    replies.append(lost)
        return replies
