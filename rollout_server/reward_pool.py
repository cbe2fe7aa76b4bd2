"""Scoring responses in worker processes, so that a reward function cannot take the rollout server
down.

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
  once per ``WARN_EVERY_S`` with how many such lines went unlogged since;
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
import os
import reprlib
import subprocess
import sys
import time
from collections.abc import Callable

import aiohttp

from areal_like.net.answers import AnswerTooLarge, read_capped
from areal_like.net.auth import REWARD_AUTH_ENV
from areal_like.net.metrics import Metrics
from areal_like.net.ratelog import RateLimitedLog
from areal_like.settings.config import TaskConfig
from areal_like.tasks.callables import import_function, split_function_path
from rollout_server.reward_worker import as_reward, scrubbed_env, why_failed
from rollout_server.sandbox import SandboxLimits, StartFailed, WorkerLost, WorkerPool, call_request

__all__ = ["RewardPool", "RewardPoolError", "Score", "load_problem", "scrubbed_env"]

Score = tuple[float, str | None]

log = logging.getLogger(__name__)
WARN_EVERY_S = 60.0  # a kind of reward failure is logged at most this often
REMOTE_BACKOFF_S = 0.2  # before the first retry; doubled each time, at most REMOTE_BACKOFF_MAX_S
REMOTE_BACKOFF_MAX_S = 2.0
# a remote reward's answer, {"rewards": [n numbers]}, is read up to this (areal_like/net/answers.py)
REMOTE_ANSWER_BASE_BYTES = 64 << 10
REMOTE_ANSWER_BYTES_PER_REWARD = 1 << 10
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60)
REWARD_IMPORT_TIMEOUT_S = 120.0  # a reward module importing a big library on a loaded machine
# Run as `python -c`: the working directory is first on sys.path, as for `python -m
# rollout_server`. The reward worker's own loader (address-space limit, then import): it prints
# the reason and exits 1 when the reward cannot be loaded.
REWARD_PROBE = ("import sys; from rollout_server.reward_worker import probe; "
                "sys.exit(probe(sys.argv[1], int(sys.argv[2])))")


def load_problem(cfg: TaskConfig) -> str | None:
    """Why ``task.reward_fn`` cannot be loaded where it will be (``REWARD_PROBE`` in a child
    Python: the working directory first on sys.path, the workers' address-space limit and
    scrubbed environment, none with ``task.reward_workers=0``), in one line naming the key; None
    when it can (or a remote reward replaces it). What its module does at import time never
    happens in the caller."""
    spec, inline = cfg.reward_fn, cfg.reward_workers == 0
    if not spec or cfg.reward_url:
        return None
    try:
        module = split_function_path(spec)[0]
    except ValueError as e:
        return f"task.reward_fn={e}"
    try:
        r = subprocess.run([sys.executable, "-c", REWARD_PROBE, spec,
                            str(0 if inline else cfg.reward_memory_mb)],
                           capture_output=True, text=True, timeout=REWARD_IMPORT_TIMEOUT_S,
                           stdin=subprocess.DEVNULL, env=None if inline else scrubbed_env())
    except subprocess.TimeoutExpired:
        return f"task.reward_fn={spec!r}: importing it took over {REWARD_IMPORT_TIMEOUT_S:.0f}s"
    if r.returncode == 0:
        return None
    lines = r.stdout.strip().splitlines()
    reason = (lines[-1] if lines
              else f"importing it ended the interpreter with status {r.returncode}")
    parts = module.split(".")
    if reason in {f"ModuleNotFoundError: No module named {'.'.join(parts[:i])!r}"
                  for i in range(1, len(parts) + 1)}:  # the reward's own module: where from?
        reason += f" (imported from the working directory, {os.getcwd()}, then PYTHONPATH)"
    where = "in the rollout server (task.reward_workers=0)" if inline else "in a reward worker"
    return f"task.reward_fn={spec!r} cannot be loaded {where}: {reason}"


class RewardPoolError(RuntimeError):
    """The pool cannot score at all: its reward cannot be loaded in a worker, or no worker
    starts."""


class _RemoteError(Exception):
    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class RewardPool:
    """Reward workers (or a remote reward) for one rollout server (module docstring)."""

    def __init__(self, cfg: TaskConfig, default_path: str, metrics: Metrics | None = None,
                 processes: int = 0):
        """``processes``: what one sample may start (``sandbox.SandboxLimits.processes``; a reward
        needs none)."""
        self.path = cfg.reward_fn or default_path
        self.name = (f"task.reward_fn={self.path!r}" if cfg.reward_fn
                     else f"the task's reward {self.path!r}")
        self.timeout_s = cfg.reward_timeout_s
        self.limits = SandboxLimits(timeout_s=cfg.reward_timeout_s, memory_mb=cfg.reward_memory_mb,
                                    processes=processes, reply_bytes=cfg.worker_reply_mb * 2**20,
                                    network=cfg.worker_network)
        self.url, self.retries = cfg.reward_url, cfg.reward_retries
        # answers as they are (no gzip, which inflates past what its limit counts)
        self.headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if auth := os.environ.get(REWARD_AUTH_ENV):  # the URL's credential (areal_like/net/auth.py)
            self.headers["Authorization"] = auth
        self.metrics = metrics or Metrics()  # None: counted nowhere
        self.warnings = RateLimitedLog(log, WARN_EVERY_S)  # one line per kind of failure
        self._workers = WorkerPool(self.path, self.limits, cfg.reward_workers, "reward")
        self._lock = self._workers.lock  # also guards _error and _closed
        self._closed = False
        self._error: str | None = None  # set once: why the pool cannot score (RewardPoolError)
        # task.reward_workers=0: the reward itself, called here
        self._inline: Callable | None = None
        if not self.url and cfg.reward_workers == 0:
            self._inline = self._load_inline()
        elif not self.url:
            # the workers import the reward: their ready replies are the check, not an import here
            for i in range(cfg.reward_workers):
                try:
                    self._workers.start(i)
                except OSError as e:
                    self.close()
                    raise self._cannot_start(e) from None

    @property
    def worker_pids(self) -> list[int]:
        return self._workers.worker_pids

    async def score(self, prompt: str, response: str, example) -> Score:
        """``(reward, None)`` or ``(0.0, reason)`` for one response (module docstring for what
        raises)."""
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
        # one call per worker: a thread handoff costs more than a sample
        k = min(len(responses), len(self._workers.workers)) or 1
        chunks = [responses[j * len(responses) // k:(j + 1) * len(responses) // k]
                  for j in range(k)]
        parts = await asyncio.gather(*(loop.run_in_executor(self._workers.threads,
                                                            self._score_local, c, example)
                                       for c in chunks))
        return [score for part in parts for score in part]

    def close(self) -> None:
        """Kill every worker, wait for the pool's threads; later scoring raises RuntimeError."""
        self._closed = True
        self._workers.close()

    # ---------------------------------------------------------------- in process (reward_workers=0)
    def _load_inline(self) -> Callable:
        try:
            fn = import_function(self.path)
        except BaseException as e:  # noqa: BLE001
            # an exit() at import is the reward's failure, not the server's
            raise RewardPoolError(
                f"{self.name} cannot be loaded: {type(e).__name__}: {e}".splitlines()[0]) from None
        log.warning("%s is scored in the rollout server's own process (task.reward_workers=0): "
                    "no sandbox, no memory or time limit; only for a reward trusted to be quick "
                    "and safe", self.name)
        return fn

    def _call_inline(self, response: str, example) -> Score:
        t0 = time.monotonic()
        kind = "error"
        try:
            reward, why = as_reward(self._inline(response, example))
        except MemoryError:
            reward, why, kind = 0.0, "MemoryError", "memory"
        except BaseException as e:  # noqa: BLE001
            # SystemExit too, as in a worker (nothing is awaited here)
            reward, why = 0.0, why_failed(e)
        self._observe(seconds := time.monotonic() - t0)
        if why is not None:
            self._failed(kind, why)
        if seconds > self.timeout_s:
            self.warnings.warning(
                "slow", "%s took %.1fs in this process, past task.reward_timeout_s=%.1fs, which "
                "task.reward_workers=0 does not enforce: the server's loop (heartbeats included) "
                "waited meanwhile", self.name, seconds, self.timeout_s)
        return reward, why

    # ------------------------------------------------------------------ local
    def _score_local(self, responses: list[str], example) -> list[Score]:
        """``responses`` scored by one worker, in this one pool thread (``WorkerPool.call_all``).
        Raises RewardPoolError when a worker could not start (or the pool broke meanwhile: that
        killed it). Samples left when the pool is closed meanwhile are not scored (nor a
        failure)."""
        try:
            requests = [call_request((r, example), self.timeout_s) for r in responses]
        except Exception as e:
            why = f"cannot send the example to a reward worker: {type(e).__name__}: {e}"
            return [self._score_reply({"kind": "error", "reason": why}) for _ in responses]
        replies: list[dict | WorkerLost] = []
        try:
            replies = self._workers.call_all(requests, self.timeout_s, self._observe)
        except StartFailed as failed:
            if not self._closed:  # else close() killed it while it started
                self._break(f"{self.name} cannot be loaded in a reward worker: {failed}")
        except OSError as e:  # no process can be started (EAGAIN, out of file descriptors, ...)
            self._break(str(self._cannot_start(e)))
        self._raise_if_broken()
        scores = [self._score_reply(reply) for reply in replies]
        return scores + [(0.0, "the reward pool was closed")] * (len(responses) - len(scores))

    def _score_reply(self, reply: dict | WorkerLost) -> Score:
        if isinstance(reply, WorkerLost):
            kind, why = reply.kind, reply.reason
        elif "result" in reply:
            kind, (reward, why) = "error", as_reward(reply["result"])
            if why is None:
                return reward, None
        else:
            kind, why = reply["kind"], reply["reason"]
        self._failed(kind, why)
        return 0.0, why

    def _cannot_start(self, e: OSError) -> RewardPoolError:
        return RewardPoolError(f"cannot start a reward worker for {self.name}: "
                               f"{type(e).__name__}: {e}")

    def _break(self, why: str) -> None:
        """Make every scoring call raise RewardPoolError(why) from now on and kill every worker
        (the first reason stays)."""
        with self._lock:  # held until every worker is reaped: _raise_if_broken waits for that
            first = self._error is None
            if first:
                self._error = why
            self._workers.stop()  # a thread blocked on one wakes with EOF and raises the same error
        if first:
            log.error("%s", why)

    def _raise_if_broken(self) -> None:
        """Raise the pool's error, if it broke, once _break has killed and reaped every worker (so a
        caller that sees the error never finds a worker of this pool still alive)."""
        if self._error is not None:
            with self._lock:
                pass
            raise RewardPoolError(self._error)

    def _observe(self, seconds: float) -> None:
        self.metrics.histogram("rollout/reward_seconds", "wall time of one reward call (a sample "
                               "in a worker or in process, or a batch POST)",
                               buckets=SECONDS_BUCKETS).observe(seconds)

    def _failed(self, kind: str, reason: str, n: int = 1) -> None:
        """Count ``n`` samples scored 0 for ``kind``; warn at most once per WARN_EVERY_S for each
        kind."""
        if not n:
            return
        self.metrics.counter("rollout/reward_failures",
                             "samples scored 0 because their reward failed",
                             ("kind",)).labels(kind=kind).inc(n)
        self.warnings.warning(kind, "%s: %d sample(s) scored 0, reward failure (%s): %s",
                              self.name, n, kind, reason)

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
                await asyncio.sleep(min(REMOTE_BACKOFF_S * 2 ** (attempt - 1),
                                        REMOTE_BACKOFF_MAX_S))
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
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                    auto_decompress=False) as session:
                async with session.post(self.url, data=body, headers=self.headers) as resp:
                    if resp.status >= 400:
                        raise _RemoteError(f"HTTP {resp.status}",
                                           retry=resp.status >= 500 or resp.status == 429)
                    limit = REMOTE_ANSWER_BASE_BYTES + n * REMOTE_ANSWER_BYTES_PER_REWARD
                    payload = json.loads(await read_capped(resp, self.url, limit, "reward"))
        except AnswerTooLarge as e:
            raise _RemoteError(str(e), retry=False) from None
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

