"""Scoring responses in worker processes, so that a reward function cannot take the rollout server down.

The three modes (sandbox workers, one batch POST to ``task.reward_url``, in process with
``task.reward_workers=0``), what each guarantees and costs, its threads and its metrics:
rollout_server/ROLLOUT.md, "Rewards".

Invariants:
* a reward that cannot be loaded is fatal: when a worker's start fails (its ready reply says why,
  it dies, or is not ready within ``STARTUP_TIMEOUT_S``) or no worker can be started, the pool
  kills every worker, logs it, and every scoring call raises ``RewardPoolError`` naming the path;
* otherwise scoring never raises and never hangs past ``task.reward_timeout_s`` per sample (per
  batch POST, remote): a sample whose reward raises, times out, returns no finite number, runs out
  of memory or kills its worker scores ``(0.0, reason)``; each kind of failure is logged at most
  once per ``WARN_EVERY_S`` with how many went unlogged since;
* a worker that timed out, died or ran out of memory is killed with its process group and
  replaced; the others go on;
* results come back in the order of the responses; ``close()`` leaves no worker behind;
* remote: a timeout, connection error, 5xx or 429 is retried ``task.reward_retries`` times; any
  other HTTP error or a malformed answer is not (it would come back the same).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import reprlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp

from areal_like.net.metrics import Metrics
from areal_like.settings.config import TaskConfig
from areal_like.tasks.callables import import_function
from rollout_server.reward_worker import as_reward, scrubbed_env
from rollout_server.sandbox import SandboxLimits, StartFailed, Worker, WorkerLost, call_request

__all__ = ["RewardPool", "RewardPoolError", "Score", "scrubbed_env"]

Score = tuple[float, str | None]

log = logging.getLogger(__name__)
WARN_EVERY_S = 60.0  # a kind of reward failure is logged at most this often
REMOTE_BACKOFF_S = 0.2  # before the first retry; doubled each time, at most REMOTE_BACKOFF_MAX_S
REMOTE_BACKOFF_MAX_S = 2.0
PIPELINE_BYTES = 32 * 1024  # requests queued on a worker ahead of its answers: far below a socket's buffer
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60)


class RewardPoolError(RuntimeError):
    """The pool cannot score at all: its reward cannot be loaded in a worker, or no worker starts."""


class _RemoteError(Exception):
    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class RewardPool:
    """Reward workers (or a remote reward) for one rollout server (module docstring)."""

    def __init__(self, cfg: TaskConfig, default_path: str, metrics: Metrics | None = None, processes: int = 0):
        """``processes``: what one sample may start (``sandbox.SandboxLimits.processes``; a reward needs none)."""
        self.path = cfg.reward_fn or default_path
        self.name = f"task.reward_fn={self.path!r}" if cfg.reward_fn else f"the task's reward {self.path!r}"
        self.timeout_s, self.memory_mb = cfg.reward_timeout_s, cfg.reward_memory_mb
        self.limits = SandboxLimits(timeout_s=cfg.reward_timeout_s, memory_mb=cfg.reward_memory_mb, processes=processes)
        self.url, self.retries = cfg.reward_url, cfg.reward_retries
        self.metrics = metrics
        self.clock: Callable[[], float] = time.monotonic  # paces the failure warnings
        self._lock = threading.Lock()  # guards _workers, _error, _closed and _warned across the pool's threads
        self._closed = False
        self._error: str | None = None  # set once: why the pool cannot score (RewardPoolError)
        self._warned: dict[str, tuple[float, int]] = {}  # kind -> (when last logged, failures unlogged since)
        self._workers: list[Worker] = []
        self._idle: queue.SimpleQueue[int] = queue.SimpleQueue()  # indices of workers no thread is using
        self._threads = ThreadPoolExecutor(max_workers=max(1, cfg.reward_workers), thread_name_prefix="reward")
        self._inline: Callable | None = None  # task.reward_workers=0: the reward itself, called here
        if not self.url and cfg.reward_workers == 0:
            self._inline = self._load_inline()
        elif not self.url:  # the workers import the reward: their ready replies are the check, not an import here
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
        self._raise_if_broken()
        if self.url:
            return await self._score_remote(prompt, responses, example)
        if self._inline is not None:
            return [self._call_inline(r, example) for r in responses]
        loop = asyncio.get_running_loop()
        k = min(len(responses), len(self._workers)) or 1  # one call per worker: a thread handoff costs more than a sample
        chunks = [responses[j * len(responses) // k:(j + 1) * len(responses) // k] for j in range(k)]
        parts = await asyncio.gather(*(loop.run_in_executor(self._threads, self._score_local, c, example)
                                       for c in chunks))
        return [score for part in parts for score in part]

    def close(self) -> None:
        """Kill every worker, wait for the pool's threads; later scoring raises RuntimeError."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        self._threads.shutdown(wait=False, cancel_futures=True)
        for w in workers:  # a thread blocked on a worker's socket wakes with EOF
            w.kill()
        self._threads.shutdown(wait=True)

    # ------------------------------------------------------------------ in process (reward_workers=0)
    def _load_inline(self) -> Callable:
        try:
            fn = import_function(self.path)
        except BaseException as e:  # noqa: BLE001 - an exit() at import is the reward's failure, not the server's
            raise RewardPoolError(f"{self.name} cannot be loaded: {type(e).__name__}: {e}".splitlines()[0]) from None
        log.warning("%s is scored in the rollout server's own process (task.reward_workers=0): no sandbox, "
                    "no memory or time limit; only for a reward trusted to be quick and safe", self.name)
        return fn

    def _call_inline(self, response: str, example) -> Score:
        t0 = time.monotonic()
        kind = "error"
        try:
            reward, why = as_reward(self._inline(response, example))
        except MemoryError:
            reward, why, kind = 0.0, "MemoryError", "memory"
        except BaseException as e:  # noqa: BLE001 - SystemExit too, as in a worker (nothing is awaited here)
            reward, why = 0.0, f"{type(e).__name__}: {e}"
        self._observe(seconds := time.monotonic() - t0)
        if why is not None:
            self._failed(kind, why)
        if seconds > self.timeout_s and self._due("slow") is not None:
            log.warning("%s took %.1fs in this process, past task.reward_timeout_s=%.1fs, which task.reward_workers=0 "
                        "does not enforce: the server's loop (heartbeats included) waited meanwhile "
                        "(logged at most every %.0fs)", self.name, seconds, self.timeout_s, WARN_EVERY_S)
        return reward, why

    # ------------------------------------------------------------------ local
    def _score_local(self, responses: list[str], example) -> list[Score]:
        """``responses`` scored by one worker, in this one pool thread."""
        i = self._idle.get()  # never waits long: there are as many threads as workers
        try:
            results = self._call_all(i, responses, example)
        finally:
            self._idle.put(i)
        for kind, result in results:
            if kind not in (None, "closed"):  # closing is not the reward's failure
                self._failed(kind, result)
        return [(result, None) if kind is None else (0.0, result) for kind, result in results]

    def _call_all(self, i: int, responses: list[str], example) -> list[tuple[str | None, float | str]]:
        """``(None, reward)`` or ``(kind, reason)`` per response, all by worker ``i``: requests are queued
        on it ahead of its answers while their bytes stay within ``PIPELINE_BYTES`` (one at least), so
        a send never waits on a busy worker, and answered in order, each within the timeout from the
        answer before it (a round trip per response would cost a wake-up of each side per sample). A
        lost worker costs the sample it was on; it is replaced and the rest go to the new one. Raises
        RewardPoolError when a worker could not start (or the pool broke meanwhile: that killed it).
        Samples left when the pool is closed meanwhile come back as ``("closed", reason)``."""
        try:
            requests = [call_request((r, example), self.timeout_s) for r in responses]
        except Exception as e:
            return [("error", f"cannot send the example to a reward worker: {type(e).__name__}: {e}")] * len(responses)
        results: list[tuple[str | None, float | str]] = []
        while len(results) < len(requests):
            if self._closed:  # close() killed the worker mid-share: what is left is not scored (nor a failure)
                return results + [("closed", "the reward pool was closed")] * (len(requests) - len(results))
            self._raise_if_broken()
            worker, sent, queued = self._workers[i], len(results), 0
            t0 = time.monotonic()
            try:
                while len(results) < len(requests):
                    while sent < len(requests) and (sent == len(results) or
                                                    queued + len(requests[sent]) <= PIPELINE_BYTES):
                        worker.send(requests[sent])
                        queued, sent = queued + len(requests[sent]), sent + 1
                    reply = worker.reply(self.timeout_s)
                    queued -= len(requests[len(results)])
                    now = time.monotonic()  # a sample's time: from the answer before it (or the first send)
                    self._observe(now - t0)
                    t0 = now
                    if "result" in reply:
                        reward, why = as_reward(reply["result"])
                        results.append((None, reward) if why is None else ("error", why))
                        continue
                    results.append((reply["kind"], reply["reason"]))
                    if reply["kind"] == "memory":  # what failed to allocate may have left the process half-done
                        self._replace(i)
                        break
            except StartFailed as failed:
                if self._closed:  # close() killed it while it started
                    continue
                raise self._break(f"{self.name} cannot be loaded in a reward worker: {failed.reason}") from None
            except WorkerLost as lost:
                self._observe(time.monotonic() - t0)
                if self._closed:  # close() killed it: not the sample's failure
                    continue
                self._raise_if_broken()
                self._replace(i)
                results.append((lost.kind, lost.reason))
        return results

    def _new_worker(self) -> Worker:
        try:
            return Worker(self.path, self.limits)
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
        with self._lock:  # held until every worker is reaped: _raise_if_broken waits for that
            first = self._error is None
            if first:
                self._error = why
            for w in self._workers:  # a thread blocked on one wakes with EOF and raises the same error
                w.kill()
        if first:
            log.error("%s", why)
        return RewardPoolError(self._error)

    def _raise_if_broken(self) -> None:
        """Raise the pool's error, if it broke, once _break has killed and reaped every worker (so a
        caller that sees the error never finds a worker of this pool still alive)."""
        if self._error is not None:
            with self._lock:
                pass
            raise RewardPoolError(self._error)

    def _observe(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.histogram("rollout/reward_seconds", "wall time of one reward call (a sample in a worker "
                                   "or in process, or a batch POST)", buckets=SECONDS_BUCKETS).observe(seconds)

    def _failed(self, kind: str, reason: str, n: int = 1) -> None:
        """Count ``n`` samples scored 0 for ``kind``; warn at most once per WARN_EVERY_S for each kind."""
        if not n:
            return
        if self.metrics is not None:
            self.metrics.counter("rollout/reward_failures", "samples scored 0 because their reward failed",
                                 ("kind",)).labels(kind=kind).inc(n)
        if (unlogged := self._due(kind, n)) is None:
            return
        since = f"; {unlogged} more since the last warning" if unlogged else ""
        log.warning("%s: %d sample(s) scored 0, reward failure (%s): %s%s (logged at most every %.0fs per kind)",
                    self.name, n, kind, reason, since, WARN_EVERY_S)

    def _due(self, kind: str, n: int = 0) -> int | None:
        """A warning of ``kind`` may be logged now (at most once per WARN_EVERY_S): how many events of
        that kind went unlogged since the last one; None: not yet (these ``n`` are added to them)."""
        now = self.clock()
        with self._lock:
            last, unlogged = self._warned.get(kind, (None, 0))
            if last is not None and now - last < WARN_EVERY_S:
                self._warned[kind] = (last, unlogged + n)
                return None
            self._warned[kind] = (now, 0)
        return unlogged

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

