"""Scoring responses in worker processes, so that a reward function cannot take the rollout server down.

``RewardPool`` runs the reward ``fn(response, example) -> float`` named by a dotted path
(``task.reward_fn``, else the task's own) in ``task.reward_workers`` worker processes
(``rollout_server/reward_worker.py``); a group's samples are scored in parallel across them. Or,
with ``task.reward_url`` set, it POSTs each group to that URL as one JSON batch.

What a worker is: a fresh interpreter (not a fork: the rollout server runs asyncio and threads)
under resource limits (address space ``task.reward_memory_mb``, CPU time, and the wall clock
``task.reward_timeout_s`` per sample, enforced by SIGKILL), with an environment scrubbed of every
variable that looks like a secret (``SECRET_NAME``; not even ``/proc/<pid>/environ`` shows them,
where multiprocessing's spawn would pass them on), in a process group of its own. It is NOT a
security sandbox: it runs as the same user with the same files and network, so files such as
``~/.netrc`` or the Hugging Face token file stay readable. It contains accidents (a hang, a leak,
a crash, an ``exit``), not malice. The rollout server never imports the reward itself: a
worker's ready reply is the check that it loads.

Invariants:

* a reward that cannot be loaded is fatal: when a worker's start fails (its ready reply says the
  import failed, or it dies, or is not ready within ``STARTUP_TIMEOUT_S``) or no worker process
  can be started, the pool kills every worker, logs the error, and every scoring call from then
  on raises ``RewardPoolError`` naming the path, e.g. ``task.reward_fn='x' cannot be loaded in a
  reward worker: ModuleNotFoundError: ...``: the rollout server stops with it instead of
  training on rewards of 0;
* otherwise scoring never raises and never hangs past ``task.reward_timeout_s`` per sample (per
  batch POST, remote): a sample whose running reward raises, times out, returns something that
  is not a finite number, runs out of memory or kills its worker scores ``(0.0, reason)``, e.g.
  ``"timeout after 5.0s"``, ``"MemoryError"``, ``"worker died: signal 9"``;
* such failures are logged too, each kind (below) at most once per ``WARN_EVERY_S`` with its
  latest reason and how many went unlogged since, so a reward failing on every sample shows in
  the log, not only in the metrics and ``metadata["reward_error"]``;
* a worker that timed out, died or ran out of memory is killed (SIGKILL to its process group:
  it and anything it started) and reaped, and a fresh one takes its place; the others go on;
* results come back in the order of the responses; ``close()`` leaves no worker behind.

Each call blocks one of the pool's own threads (as many as workers) on its worker's socket, so
the pool works from any event loop and ``close()`` needs none. Startup (a fresh interpreter
importing the reward's module) is not counted against the timeout: the first sample sent to a
new worker waits up to ``STARTUP_TIMEOUT_S`` for it to be ready.

Remote: ``{"items": [{"prompt", "response", "answer", "metadata"}, ...]}`` is answered by
``{"rewards": [float, ...]}`` of the same length. ``task.reward_timeout_s`` bounds each attempt
at the whole batch POST (connecting, sending, the remote scoring of every item, the answer), not
one item. A timeout, connection error, HTTP 5xx or 429 is retried ``task.reward_retries`` times
after a short backoff; any other HTTP error or a malformed answer is not (it would come back the
same). Then every item scores 0.0 with the reason.

Metrics (with the server's ``Metrics``): ``rollout/reward_failures{kind}``, kind one of
timeout | error | memory | died | remote, and ``rollout/reward_seconds``, the wall time of one
sample in a worker or of one batch POST.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import queue
import reprlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp

from areal_like.config import TaskConfig
from areal_like.metrics import Metrics
from rollout_server import reward_worker
from rollout_server.reward_worker import SECRET_NAME, as_reward, recv_frame, scrubbed_env, send_frame

__all__ = ["SECRET_NAME", "RewardPool", "RewardPoolError", "Score", "scrubbed_env"]

Score = tuple[float, str | None]

log = logging.getLogger(__name__)
WORKER_SCRIPT = str(Path(reward_worker.__file__).resolve())
STARTUP_TIMEOUT_S = 120.0  # a fresh worker imports the reward's module (sympy, torch, ...) on a busy machine
WARN_EVERY_S = 60.0  # a kind of reward failure is logged at most this often
REMOTE_BACKOFF_S = 0.2  # before the first retry; doubled each time, at most REMOTE_BACKOFF_MAX_S
REMOTE_BACKOFF_MAX_S = 2.0
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60)


class RewardPoolError(RuntimeError):
    """The pool cannot score at all: its reward cannot be loaded in a worker, or no worker starts."""


class _StartFailed(Exception):
    """A worker never became ready; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _WorkerLost(Exception):
    """A ready worker cannot answer any more (timeout, death); ``kind`` and ``reason`` as scored."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class _RemoteError(Exception):
    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class _Worker:
    """One worker process and the pool's end of its socket; used by one thread at a time."""

    def __init__(self, path: str, memory_mb: int):
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", WORKER_SCRIPT, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                env=scrubbed_env(), stdin=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock, self.ready = ours, False
        try:
            send_frame(ours, pickle.dumps({"path": path, "sys_path": list(sys.path), "memory_mb": memory_mb}))
        except OSError:  # it died at once: its first call says how
            pass

    def call(self, request: bytes, timeout_s: float) -> dict:
        """The worker's reply to one pickled request; raises _StartFailed (before it was ready) or _WorkerLost."""
        if not self.ready:
            self._wait_ready()
        try:
            send_frame(self.sock, request)
        except OSError:
            raise _WorkerLost("died", self._death()) from None
        return self._reply(timeout_s, f"timeout after {timeout_s}s")

    def _wait_ready(self) -> None:
        try:
            reply = self._reply(STARTUP_TIMEOUT_S, f"not ready after {STARTUP_TIMEOUT_S}s")
        except _WorkerLost as lost:
            self.kill()
            raise _StartFailed(lost.reason) from None
        if reply.get("ready") is not True:
            self.kill()  # it exits after saying why; reaped here
            raise _StartFailed(reply.get("reason", f"bad hello: {reprlib.repr(reply)}"))
        self.ready = True

    def _reply(self, timeout_s: float, timeout_reason: str) -> dict:
        try:
            frame = recv_frame(self.sock, time.monotonic() + timeout_s)
        except TimeoutError:
            raise _WorkerLost("timeout", timeout_reason) from None
        except (EOFError, OSError):
            frame = None
        if frame is None:
            raise _WorkerLost("died", self._death())
        try:
            return json.loads(frame)
        except ValueError:
            raise _WorkerLost("error", f"unreadable reply from the worker: {frame[:100]!r}") from None

    def _death(self) -> str:
        self.kill()
        code = self.proc.returncode
        return f"worker died: signal {-code}" if code < 0 else f"worker died: exit code {code}"

    def kill(self) -> None:
        """SIGKILL the worker's process group and reap the worker (idempotent)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone (the worker died, and nothing it started lives)
            pass
        self.proc.wait()
        self.sock.close()


class RewardPool:
    """Reward workers (or a remote reward) for one rollout server (module docstring)."""

    def __init__(self, cfg: TaskConfig, default_path: str, metrics: Metrics | None = None):
        self.path = cfg.reward_fn or default_path
        self.name = f"task.reward_fn={self.path!r}" if cfg.reward_fn else f"the task's reward {self.path!r}"
        self.timeout_s, self.memory_mb = cfg.reward_timeout_s, cfg.reward_memory_mb
        self.url, self.retries = cfg.reward_url, cfg.reward_retries
        self.metrics = metrics
        self.clock: Callable[[], float] = time.monotonic  # paces the failure warnings
        self._lock = threading.Lock()  # guards _workers, _error, _closed and _warned across the pool's threads
        self._closed = False
        self._error: str | None = None  # set once: why the pool cannot score (RewardPoolError)
        self._warned: dict[str, tuple[float, int]] = {}  # kind -> (when last logged, failures unlogged since)
        self._workers: list[_Worker] = []
        self._idle: queue.SimpleQueue[int] = queue.SimpleQueue()  # indices of workers no thread is using
        self._threads = ThreadPoolExecutor(max_workers=cfg.reward_workers, thread_name_prefix="reward")
        if not self.url:  # the workers import the reward: their ready replies are the check, not an import here
            try:
                for i in range(cfg.reward_workers):
                    self._workers.append(self._new_worker())
                    self._idle.put(i)
            except RewardPoolError:
                self.close()
                raise

    @property
    def worker_pids(self) -> list[int]:
        """PIDs of the current workers (for tests and debugging)."""
        with self._lock:
            return [w.proc.pid for w in self._workers]

    async def score(self, prompt: str, response: str, example) -> Score:
        """``(reward, None)`` or ``(0.0, reason)`` for one response (module docstring for what raises)."""
        return (await self.score_group(prompt, [response], example))[0]

    async def score_group(self, prompt: str, responses: list[str], example) -> list[Score]:
        """One score per response, in order; the samples are scored in parallel across workers.
        Raises RewardPoolError when the reward cannot be loaded, RuntimeError once closed."""
        if self._closed:
            raise RuntimeError("the reward pool is closed")
        if self._error is not None:
            raise RewardPoolError(self._error)
        if self.url:
            return await self._score_remote(prompt, responses, example)
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self._threads, self._score_local, r, example)
                                           for r in responses)))

    def close(self) -> None:
        """Kill every worker, wait for the pool's threads; later scoring raises RuntimeError."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        self._threads.shutdown(wait=False, cancel_futures=True)
        for w in workers:  # a thread blocked on a worker's socket wakes with EOF
            w.kill()
        self._threads.shutdown(wait=True)

    # ------------------------------------------------------------------ local
    def _score_local(self, response: str, example) -> Score:
        i = self._idle.get()  # never waits long: there are as many threads as workers
        t0 = time.monotonic()
        try:
            kind, result = self._call(i, response, example)
        finally:
            self._idle.put(i)
        self._observe(time.monotonic() - t0)
        if kind is None:
            return result, None
        self._failed(kind, result)
        return 0.0, result

    def _call(self, i: int, response: str, example) -> tuple[str | None, float | str]:
        """``(None, reward)`` or ``(kind, reason)``; replaces worker ``i`` when it is lost; raises
        RewardPoolError when it could not start (or the pool broke meanwhile: that killed it)."""
        if self._error is not None:
            raise RewardPoolError(self._error)
        try:
            request = pickle.dumps((response, example, self.timeout_s))
        except Exception as e:
            return "error", f"cannot send the example to a reward worker: {type(e).__name__}: {e}"
        try:
            reply = self._workers[i].call(request, self.timeout_s)
        except _StartFailed as failed:
            if self._closed:  # close() killed it while it started
                return "died", failed.reason
            raise self._break(f"{self.name} cannot be loaded in a reward worker: {failed.reason}") from None
        except _WorkerLost as lost:
            if self._error is not None:
                raise RewardPoolError(self._error) from None
            self._replace(i)
            return lost.kind, lost.reason
        if "reward" in reply:
            return None, reply["reward"]
        if reply["kind"] == "memory":  # what failed to allocate may have left the process half-done
            self._replace(i)
        return reply["kind"], reply["reason"]

    def _new_worker(self) -> _Worker:
        try:
            return _Worker(self.path, self.memory_mb)
        except OSError as e:  # no process can be started (EAGAIN, out of file descriptors, ...)
            raise RewardPoolError(f"cannot start a reward worker for {self.name}: {type(e).__name__}: {e}") from None

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        with self._lock:
            if self._closed or self._error is not None:
                return
            try:
                self._workers[i] = self._new_worker()
                return
            except RewardPoolError as e:
                why = str(e)
        raise self._break(why)

    def _break(self, why: str) -> RewardPoolError:
        """Make every scoring call raise RewardPoolError(why) from now on and kill every worker
        (the first reason stays); returns the error to raise."""
        with self._lock:
            first = self._error is None
            if first:
                self._error = why
            workers = list(self._workers)
        for w in workers:  # a thread blocked on one wakes with EOF and raises the same error
            w.kill()
        if first:
            log.error("%s", why)
        return RewardPoolError(self._error)

    def _observe(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.histogram("rollout/reward_seconds", "wall time of one reward call (a sample in a worker, "
                                   "or a batch POST)", buckets=SECONDS_BUCKETS).observe(seconds)

    def _failed(self, kind: str, reason: str, n: int = 1) -> None:
        """Count ``n`` samples scored 0 for ``kind``; warn at most once per WARN_EVERY_S for each kind."""
        if not n:
            return
        if self.metrics is not None:
            self.metrics.counter("rollout/reward_failures", "samples scored 0 because their reward failed",
                                 ("kind",)).labels(kind=kind).inc(n)
        now = self.clock()
        with self._lock:
            last, unlogged = self._warned.get(kind, (None, 0))
            if last is not None and now - last < WARN_EVERY_S:
                self._warned[kind] = (last, unlogged + n)
                return
            self._warned[kind] = (now, 0)
        since = f"; {unlogged} more since the last warning" if unlogged else ""
        log.warning("%s: %d sample(s) scored 0, reward failure (%s): %s%s (logged at most every %.0fs per kind)",
                    self.name, n, kind, reason, since, WARN_EVERY_S)

    # ------------------------------------------------------------------ remote
    async def _score_remote(self, prompt: str, responses: list[str], example) -> list[Score]:
        """The group as one batch POST; ``task.reward_timeout_s`` bounds each attempt at the whole
        POST (every item scored remotely), retried as the module docstring says."""
        metadata = getattr(example, "metadata", {})  # synthetic examples carry none
        body = json.dumps({"items": [{"prompt": prompt, "response": r, "answer": example.answer,
                                      "metadata": metadata} for r in responses]}, default=str)
        t0, reason = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(REMOTE_BACKOFF_S * 2 ** (attempt - 1), REMOTE_BACKOFF_MAX_S))
            try:
                rewards = await self._post(body, len(responses))
            except _RemoteError as e:
                reason = f"remote reward: {e} (attempt {attempt + 1} of {self.retries + 1})"
                if e.retry:
                    continue
                break
            self._observe(time.monotonic() - t0)
            scores = [as_reward(v) for v in rewards]
            whys = [why for _, why in scores if why is not None]
            if whys:
                self._failed("remote", f"remote reward: {whys[-1]}", len(whys))
            return [(r, None if why is None else f"remote reward: {why}") for r, why in scores]
        self._observe(time.monotonic() - t0)
        self._failed("remote", reason, len(responses))
        return [(0.0, reason)] * len(responses)

    async def _post(self, body: str, n: int) -> list:
        """The answer's ``rewards`` list; raises _RemoteError."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
                async with session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    if resp.status >= 400:
                        raise _RemoteError(f"HTTP {resp.status}", retry=resp.status >= 500 or resp.status == 429)
                    payload = await resp.json(content_type=None)
        except asyncio.TimeoutError:
            raise _RemoteError(f"timeout after {self.timeout_s}s", retry=True) from None
        except aiohttp.ClientError as e:
            raise _RemoteError(f"{type(e).__name__}: {e}", retry=True) from None
        except ValueError as e:  # not JSON
            raise _RemoteError(f"answer is not JSON: {e}", retry=False) from None
        rewards = payload.get("rewards") if isinstance(payload, dict) else None
        if not isinstance(rewards, list) or len(rewards) != n:
            got = f"{len(rewards)} rewards" if isinstance(rewards, list) else reprlib.repr(payload)
            raise _RemoteError(f"expected {{'rewards': [{n} numbers]}}, got {got}", retry=False)
        return rewards

