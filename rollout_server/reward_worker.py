"""A sandbox worker: one process that imports one function (a reward, a tool) and calls it, one call
at a time.

``rollout_server/sandbox.py`` starts it as ``python -I reward_worker.py FD`` (run as a script: its
module level needs only the standard library) and talks to it over the socket ``FD``. Frames are
an 8-byte big-endian length and a body:

* pool -> worker, pickled: first ``{"path", "sys_path", "memory_mb", "processes", "uid"}``, then
  one ``(args, timeout_s)`` per call of ``fn(*args)``;
* worker -> pool, JSON (the pool never unpickles what user code produced): first
  ``{"ready": true}`` or ``{"kind": "error" | "memory", "reason"}`` (then it exits), then one
  ``{"result": value}`` or ``{"kind", "reason"}`` per call; the pool reads no reply longer than
  its ``SandboxLimits.reply_bytes`` (``FrameTooLarge``).

Limits the worker sets itself, in this order: capabilities and groups dropped and a uid and gid
of its own (root only, before anything of the user's is imported: ``drop_privileges``),
``RLIMIT_AS`` before the function's module is imported (``load_reward``; the launcher's preflight
runs the same through ``probe``, so a reward passes preflight exactly when a worker can load it),
``RLIMIT_NPROC`` once it is loaded (its imports may start thread pools), ``RLIMIT_CPU`` before each
call, past what the call could burn until its timeout. It exits when the pool's end of the socket
closes.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import inspect
import json
import math
import numbers
import os
import pickle
import re
import reprlib
import resource
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping

HEADER = struct.Struct("!Q")
ISOLATED_UID_BASE = 1_000_000_000  # + pid: a uid no other process has (pids stay below 2**22)
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 4, 24, 28  # <linux/prctl.h>
# NOROOT, NO_SETUID_FIXUP and KEEP_CAPS off, each locked (<linux/securebits.h>)
SECUREBITS_LOCKED_NOROOT = 0x2F
CAPABILITY_VERSION_3 = 0x20080522
CPU_GRACE_S = 3  # RLIMIT_CPU: CPU seconds past the most a sample could use before its timeout
# WANDB_API_KEY, HF_TOKEN, ...
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
# The thread pools that numpy (OpenBLAS), torch (OpenMP) and MKL start at import or first use,
# sized from these (else one thread per core). A pool past the worker's RLIMIT_NPROC fails to
# start: OpenBLAS then interrupts the call.
THREAD_POOL_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def scrubbed_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``environ`` without the variables whose names look like secrets (``SECRET_NAME``)."""
    return {k: v for k, v in environ.items() if not SECRET_NAME.search(k)}


def worker_env(processes: int, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """A worker's environment: ``scrubbed_env`` with each thread pool (``THREAD_POOL_VARS``) at most
    the threads the worker may have, itself and ``processes`` more (``confine``); a smaller count
    the job set stays."""
    env = scrubbed_env(environ)
    allowed = 1 + processes
    for name in THREAD_POOL_VARS:
        asked = env.get(name, "")
        if not (asked.isdigit() and 0 < int(asked) <= allowed):
            env[name] = str(allowed)
    return env


def load_reward(path: str, memory_mb: int) -> Callable:
    """The reward at ``path``, imported under an address-space limit of ``memory_mb`` MiB (0: none)
    set on this whole process first; raises whatever the import raises, and TypeError for an
    ``async def``."""
    _limit_memory(memory_mb)
    from areal_like.tasks.callables import import_function  # on the sys.path of the pool

    fn = import_function(path)
    if inspect.iscoroutinefunction(fn):  # its calls would return coroutines, never numbers
        raise TypeError(f"{path} is an async def: a reward is a plain def fn(response, "
                        "example) -> float (await inside it with asyncio.run)")
    return fn


def load_failure(e: BaseException, memory_mb: int) -> dict:
    """The worker's reply (and the preflight probe's line) when ``load_reward`` raised ``e``."""
    if isinstance(e, MemoryError):
        why = f"MemoryError: {e}" if str(e) else "MemoryError"
        if memory_mb > 0:
            why += f" (task.reward_memory_mb={memory_mb} limits the address space)"
        return {"kind": "memory", "reason": why}
    return {"kind": "error", "reason": why_failed(e).splitlines()[0]}


def why_failed(e: BaseException) -> str:
    """``Type: message`` of ``e``, raised by user code: its ``__str__`` may raise too."""
    try:
        return f"{type(e).__name__}: {e}"
    except BaseException:  # noqa: BLE001
        return f"{type(e).__name__} (its message raised)"


def probe(path: str, memory_mb: int, columns: str | None = None) -> int:
    """Load the reward as a worker does (what the launcher's preflight runs in a child Python):
    0 when it loads and takes ``(response, example)``, or, batched (``is_batched``), TRL's
    keywords with the dataset's ``columns`` (comma-separated; None: not checked); else 1 after
    printing one line saying why."""
    try:
        fn = load_reward(path, memory_mb)
    except BaseException as e:  # noqa: BLE001 - SystemExit at import too: the reward cannot be used
        print(load_failure(e, memory_mb)["reason"], flush=True)
        return 1
    from areal_like.tasks.callables import is_batched

    try:  # every sample would score 0 with a TypeError, once a minute in the log
        if not is_batched(fn):
            inspect.signature(fn).bind("response", {})
        elif columns is not None:
            names = [c for c in columns.split(",") if c]
            inspect.signature(fn).bind(prompts=[], completions=[], **dict.fromkeys(names, []))
    except TypeError as e:
        if not is_batched(fn):
            print(f"it cannot be called as fn(response, example): TypeError: {e}", flush=True)
        else:
            shown = ", ".join(names) or "none"
            print(f"it is a batched reward (it has a completions parameter) and cannot be called "
                  f"with prompts, completions and the dataset's columns ({shown}): TypeError: "
                  f"{e}", flush=True)
        return 1
    except ValueError:  # no signature to read (a builtin): its calls will tell
        pass
    return 0


def as_reward(value: object) -> tuple[float, str | None]:
    """``(float(value), None)`` for a finite real number (bools count as 0/1), else
    ``(0.0, why)``."""
    if not isinstance(value, numbers.Real):
        return 0.0, f"reward is not a number: {reprlib.repr(value)}"
    try:
        value = float(value)
    except OverflowError:  # an int past a double's range
        return 0.0, f"reward is not finite: {reprlib.repr(value)}"
    if not math.isfinite(value):
        return 0.0, f"reward is not finite: {value}"
    return value, None


def send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(HEADER.pack(len(body)) + body)


class FrameTooLarge(Exception):
    """A frame's header announced more than the reader takes (``recv_frame``'s ``max_bytes``)."""

    def __init__(self, size: int, max_bytes: int):
        super().__init__(f"a {size}-byte frame, past the {max_bytes} taken")
        self.size, self.max_bytes = size, max_bytes


def recv_frame(sock: socket.socket, deadline: float | None = None,
               max_bytes: int | None = None) -> bytes | None:
    """One frame's body; None when the peer closed between frames. Raises TimeoutError past
    ``deadline`` (``time.monotonic()``; None waits forever), EOFError when the peer closed
    inside a frame, and FrameTooLarge, before reading its body, for a frame past ``max_bytes``
    (None: any)."""
    header = _recv_exact(sock, HEADER.size, deadline)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if max_bytes is not None and size > max_bytes:
        raise FrameTooLarge(size, max_bytes)
    body = _recv_exact(sock, size, deadline) if size else b""
    if body is None:
        raise EOFError("peer closed inside a frame")
    return body


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise EOFError("peer closed inside a frame")
            return None
        buf += chunk
    return bytes(buf)


def relay(listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
    """Until ``listener`` is closed: pipe each connection it accepts to a fresh ``connect()`` (two
    threads a connection; one that cannot be piped is closed). An agent worker's loopback reaches
    its endpoint so, and the endpoint's Unix socket the host's loopback (sandbox.Forwarder)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # closed
            return
        try:
            upstream = connect()
        except OSError:
            conn.close()
            continue
        ended = [0]
        try:
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_copy, args=(src, dst, ended), daemon=True).start()
        except RuntimeError:  # no thread to spare (RLIMIT_NPROC)
            conn.close()
            upstream.close()


def _copy(src: socket.socket, dst: socket.socket, ended: list[int]) -> None:
    with contextlib.suppress(OSError):
        while chunk := src.recv(1 << 16):
            dst.sendall(chunk)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)  # the other direction may still carry an answer
    ended.append(1)
    if len(ended) == 3:  # both directions: [0, 1, 1]
        src.close()
        dst.close()


def loopback_up() -> None:
    """Bring this network namespace's loopback up (root, before ``drop_privileges``)."""
    flags = 0x1 | 0x8 | 0x40  # IFF_UP | IFF_LOOPBACK | IFF_RUNNING
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags))  # SIOCSIFFLAGS


def _send_json(sock: socket.socket, message: dict) -> None:
    send_frame(sock, json.dumps(message).encode())


def _limit_memory(memory_mb: int) -> None:
    if memory_mb > 0:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _limit_cpu(timeout_s: float) -> None:
    """The CPU-time backstop for one call: what all our CPUs could burn until the timeout, plus a
    grace, so it never ends a call the pool would not."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime
                     + timeout_s * len(os.sched_getaffinity(0))) + CPU_GRACE_S
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU,
                       (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def call_one(fn: Callable, frame: bytes) -> dict:
    """The reply for one pickled ``(args, timeout_s)`` or ``(args, kwargs, timeout_s)``; never
    raises."""
    try:
        *call, timeout_s = pickle.loads(frame)
        args, kwargs = call if len(call) == 2 else (call[0], {})
        _limit_cpu(timeout_s)
        result = plain_numbers(fn(*args, **kwargs))
        try:
            json.dumps(result)
        except (TypeError, ValueError):
            return {"kind": "error", "reason": f"result is not JSON: {reprlib.repr(result)}"}
    except MemoryError:
        return {"kind": "memory", "reason": "MemoryError"}
    except BaseException as e:  # noqa: BLE001
        # SystemExit too: a call's failure is its own, not the worker's
        return {"kind": "error", "reason": why_failed(e)}
    return {"result": result}


def plain_numbers(result: object) -> object:
    """``result`` with numpy/torch numbers as floats: a number, or a batched reward's list (an
    array's ``tolist()``)."""
    if not isinstance(result, (list, tuple, str, bytes, dict)) and hasattr(result, "tolist"):
        result = result.tolist()  # a numpy array or scalar, a torch tensor
    if isinstance(result, (list, tuple)):
        return [float(v) if isinstance(v, numbers.Real) and not isinstance(v, (bool, int))
                else v for v in result]
    if isinstance(result, numbers.Real) and not isinstance(result, (bool, int, float)):
        return float(result)
    return result


def drop_privileges(uid: int | None = None) -> bool:
    """As root, before any user code is imported: give up every capability for good (bounding
    set emptied, securebits locked), every supplementary group, and become ``uid`` (default: from
    this pid), a uid and gid no other process has, real, effective and saved alike: no file or
    host-wide control guarded by mode for root (``/proc/sysrq-trigger``, ``/proc/sys``, sysfs) is
    its own, the hiding mounts stay (sandbox.py) and RLIMIT_NPROC binds. The code it still needs
    is readable at its own paths in its mount namespace (sandbox.py, ``exposure``). False when not
    root."""
    if os.geteuid() != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    _lock_capabilities(libc)
    uid = uid or ISOLATED_UID_BASE + os.getpid()
    os.setgroups([])  # each needs CAP_SETGID or CAP_SETUID: before setresuid and capset
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _libc_call(libc, "capset", ctypes.byref(_CapHeader(CAPABILITY_VERSION_3, 0)), (_CapData * 2)())
    # the uid change made it undumpable: its own /proc/self would stay root's (environ, fd)
    _libc_call(libc, "prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)
    return True


def confine(processes: int, dropped: bool) -> None:
    """Allow ``processes`` more processes (threads count) from now on. RLIMIT_NPROC counts the
    real uid's: a worker that ``dropped`` its privileges has a uid of its own, so it counts this
    worker alone; otherwise the user's current count plus the allowance (a backstop)."""
    if dropped:
        limit = 1 + processes
    else:
        limit = _tasks_of(os.getuid()) + processes
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        # a hard limit cannot be raised
        limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _lock_capabilities(libc) -> None:
    """Empty the bounding set and lock securebits: no capabilities from uid 0 or an exec, ever."""
    cap = 0
    # EINVAL past the kernel's last capability
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    _libc_call(libc, "prctl", PR_SET_SECUREBITS, SECUREBITS_LOCKED_NOROOT, 0, 0, 0)


def _libc_call(libc, name: str, *args) -> None:
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _tasks_of(uid: int) -> int:
    """Processes and threads of ``uid`` now (what RLIMIT_NPROC counts)."""
    count = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, ValueError, KeyError):  # not a process, or it just ended
            continue
    return count


def main(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    init = recv_frame(sock)
    if init is None:
        return 0
    config = pickle.loads(init)
    sys.path[:] = config["sys_path"]  # what the pool's process can import, this one can
    try:
        if config.get("loopback"):  # an agent's: its endpoint is relayed there (agent_worker.py)
            loopback_up()
        dropped = drop_privileges(config.get("uid"))
        try:
            fn = load_reward(config["path"], config["memory_mb"])
        except BaseException as e:  # noqa: BLE001
            # reported to the pool, which cannot go on without the reward
            _send_json(sock, load_failure(e, config["memory_mb"]))
            return 1
        confine(config["processes"], dropped)
    except OSError as e:  # a worker that cannot be confined does not run user code
        _send_json(sock, {"kind": "error",
                          "reason": f"cannot confine the worker: {type(e).__name__}: {e}"})
        return 1
    # ConnectionError, EOFError: the pool's process is gone (or reset the socket): so are we
    with contextlib.suppress(ConnectionError, EOFError):
        from areal_like.tasks.callables import is_batched

        # the pool sends a batched reward one call per group (TRL's form), others one per sample
        _send_json(sock, {"ready": True, "batched": is_batched(fn)})
        while (frame := recv_frame(sock)) is not None:
            _send_json(sock, call_one(fn, frame))
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
