"""Scoring responses in worker processes, so that a reward function cannot take the rollout server
down.

``task.reward_fn`` may name several functions: each has workers of its own, the score is their
sum weighted by ``task.reward_weights``, and each one's rewards come back by name
(``score_terms``). A function with a ``completions`` parameter is TRL's batched form
(``callables.is_batched``, which the worker's hello reports): one call per group with TRL's
keywords (``trl_batch``) and ``task.reward_timeout_s`` per completion; any other is called per
sample. A batched result that is not one number (or None) per completion scores the group 0.

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
import contextlib
import json
import logging
import os
import pickle
import reprlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from areal_like.net.answers import AnswerTooLarge, read_capped
from areal_like.net.auth import REWARD_AUTH_ENV
from areal_like.net.metrics import Metrics
from areal_like.net.ratelog import RateLimitedLog
from areal_like.settings.config import TaskConfig
from areal_like.tasks.callables import (
    import_function,
    is_batched,
    reward_paths,
    split_function_path,
)
from rollout_server.reward_worker import as_reward, plain_numbers, scrubbed_env, why_failed
from rollout_server.sandbox import (
    SandboxLimits,
    StartFailed,
    WorkerLost,
    WorkerPool,
    call_request,
)

__all__ = ["RewardFn", "RewardPool", "RewardPoolError", "Score", "load_problem", "reward_columns",
           "reward_names", "scrubbed_env", "trl_batch"]

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
                "sys.exit(probe(sys.argv[1], int(sys.argv[2]), *sys.argv[3:]))")


def load_problem(cfg: TaskConfig, columns: list[str] | None = None) -> str | None:
    """Why a function of ``task.reward_fn`` cannot be loaded where it will be (``REWARD_PROBE``
    in a child Python: the working directory first on sys.path, the workers' address-space limit
    and scrubbed environment, none with ``task.reward_workers=0``), in one line naming the key;
    None when each can (or a remote reward replaces them). A batched one must take the dataset's
    ``columns`` as keywords (None: not checked). What its module does at import time never
    happens in the caller."""
    if cfg.reward_url:
        return None
    for spec in reward_paths(cfg):
        if why := _probe(cfg, spec, columns):
            return why
    return None


def reward_columns(t: TaskConfig) -> list[str] | None:
    """The columns a batched reward gets as keywords (``rollout_server.reward_pool.trl_batch``):
    the answer's and the metadata's; None when the dataset cannot be read (other checks say
    why)."""
    if t.name != "dataset":
        return [t.answer_key] if t.answer_key else []
    from areal_like.tasks.datasets import load_table, task_columns

    try:
        _, answer, metadata = task_columns(t, list(load_table("task.dataset_path",
                                                              t.dataset_path).column_names),
                                           t.dataset_path)
    except Exception:  # noqa: BLE001 - check_dataset_columns says why
        return None
    return [c for c in (answer, *metadata) if c]


def _probe(cfg: TaskConfig, spec: str, columns: list[str] | None) -> str | None:
    inline = cfg.reward_workers == 0
    try:
        module = split_function_path(spec)[0]
    except ValueError as e:
        return f"task.reward_fn={e}"
    try:
        r = subprocess.run([sys.executable, "-c", REWARD_PROBE, spec,
                            str(0 if inline else cfg.reward_memory_mb),
                            *([] if columns is None else [",".join(columns)])],
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


@dataclass(kw_only=True)
class RewardFn:
    """One function of ``task.reward_fn`` and its workers (or itself, called in process)."""

    path: str
    name: str  # its metric's (``reward_names``)
    label: str  # what the log and errors call it
    weight: float
    workers: WorkerPool
    inline: Callable | None = None  # task.reward_workers=0: the function itself
    batched: bool | None = None  # TRL's form (``is_batched``); None until a worker said


def reward_names(paths: list[str]) -> list[str]:
    """Each reward function's name in metrics: its own (``score``), or its whole path when two
    share a name."""
    def attr(path: str) -> str:
        try:
            return split_function_path(path)[1]
        except ValueError:  # not a path: its worker says so at the first score
            return path

    attrs = [attr(p) for p in paths]
    return [a if attrs.count(a) == 1 else p for a, p in zip(attrs, paths, strict=True)]


def trl_batch(cfg: TaskConfig, responses: list[str], example) -> dict:
    """A batched reward's keywords for one group, TRL's way: ``prompts`` (the row's messages, or
    its text), ``completions`` (each ``[{"role": "assistant", "content": text}]`` for a chat row,
    else the text), and the answer and metadata columns under their names, one entry per
    completion."""
    n, messages = len(responses), getattr(example, "messages", None)
    prompt = [dict(m) for m in messages] if messages else example.prompt
    columns = {cfg.answer_key: example.answer} if cfg.answer_key else {}
    columns.update(getattr(example, "metadata", {}))  # synthetic examples carry none
    return {**{k: [v] * n for k, v in columns.items()}, "prompts": [prompt] * n,
            "completions": [[{"role": "assistant", "content": r}] if messages else r
                            for r in responses]}


class RewardPool:
    """Reward workers (or a remote reward) for one rollout server (module docstring)."""

    def __init__(self, cfg: TaskConfig, default_path: str, metrics: Metrics | None = None,
                 processes: int = 0):
        """``processes``: what one sample may start (``sandbox.SandboxLimits.processes``; a reward
        needs none)."""
        paths = reward_paths(cfg) or [default_path]
        self.cfg = cfg
        self.path = paths[0]
        # the per-function rewards of task.reward_fn are reported (the task's own: just its sum)
        self.reported = bool(cfg.reward_fn) and not cfg.reward_url
        self.timeout_s = cfg.reward_timeout_s
        self.limits = SandboxLimits(timeout_s=cfg.reward_timeout_s, memory_mb=cfg.reward_memory_mb,
                                    processes=processes, reply_bytes=cfg.worker_reply_mb * 2**20,
                                    network=cfg.worker_network)
        self.url, self.retries = cfg.reward_url, cfg.reward_retries
        self.name = ("task.reward_url" if self.url else
                     f"task.reward_fn={self.path!r}" if cfg.reward_fn
                     else f"the task's reward {self.path!r}")
        # answers as they are (no gzip, which inflates past what its limit counts)
        self.headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if auth := os.environ.get(REWARD_AUTH_ENV):  # the URL's credential (areal_like/net/auth.py)
            self.headers["Authorization"] = auth
        self.metrics = metrics or Metrics()  # None: counted nowhere
        self.warnings = RateLimitedLog(log, WARN_EVERY_S)  # one line per kind of failure
        weights = cfg.reward_weights or [1.0] * len(paths)
        self.fns = [RewardFn(path=p, name=name, weight=w, workers=WorkerPool(
                        p, self.limits, 0 if self.url else cfg.reward_workers, "reward"),
                             label=(f"task.reward_fn={p!r}" if cfg.reward_fn
                                    else f"the task's reward {p!r}"))
                    for p, name, w in zip(paths, reward_names(paths), weights, strict=True)]
        self._lock = threading.RLock()  # guards _error and _closed
        self._closed = False
        self._error: str | None = None  # set once: why the pool cannot score (RewardPoolError)
        for f in self.fns if not self.url else ():
            if cfg.reward_workers == 0:  # the reward itself, called here
                f.inline = self._load_inline(f)
                f.batched = is_batched(f.inline)
                continue
            # the workers import the reward: their ready replies are the check, not an import here
            for i in range(cfg.reward_workers):
                try:
                    f.workers.start(i)
                except OSError as e:
                    self.close()
                    raise self._cannot_start(e, f) from None

    @property
    def worker_pids(self) -> list[int]:
        return [pid for f in self.fns for pid in f.workers.worker_pids]

    async def score(self, prompt: str, response: str, example) -> Score:
        """``(reward, None)`` or ``(0.0, reason)`` for one response (module docstring for what
        raises)."""
        return (await self.score_group(prompt, [response], example))[0]

    async def score_group(self, prompt: str, responses: list[str], example) -> list[Score]:
        """One score per response, in order: the weighted sum of the reward functions
        (``score_terms``). Raises RewardPoolError when a reward cannot be loaded, RuntimeError
        once closed."""
        return (await self.score_terms(prompt, responses, example))[0]

    async def score_terms(self, prompt: str, responses: list[str], example
                          ) -> tuple[list[Score], dict[str, list[float | None]]]:
        """One score per response, in order, and each reported function's reward of each
        response by its name (empty for the task's own reward and a remote one). A score is the
        weighted sum of the functions' rewards; a function that failed on a sample adds 0 and
        its reason; one that answered None (TRL: "not mine to score") adds 0 and no reason."""
        if self._closed:
            raise RuntimeError("the reward pool is closed")
        self._raise_if_broken()
        if self.url:
            return await self._score_remote(prompt, responses, example), {}
        parts = await asyncio.gather(*(self._score_fn(f, responses, example) for f in self.fns))
        terms = {f.name: [r for r, _ in part] for f, part in zip(self.fns, parts, strict=True)}
        scores = []
        for j in range(len(responses)):
            total = sum(f.weight * (part[j][0] or 0.0) for f, part in zip(self.fns, parts,
                                                                          strict=True))
            whys = [(f.name, part[j][1]) for f, part in zip(self.fns, parts, strict=True)
                    if part[j][1] is not None]
            why = None if not whys else (whys[0][1] if len(self.fns) == 1 else
                                         "; ".join(f"{name}: {w}" for name, w in whys))
            scores.append((total, why))
        return scores, terms if self.reported else {}

    def close(self) -> None:
        """Kill every worker, wait for the pool's threads; later scoring raises RuntimeError."""
        self._closed = True
        for f in self.fns:
            f.workers.close()

    async def _score_fn(self, f: RewardFn, responses: list[str], example
                        ) -> list[tuple[float | None, str | None]]:
        """``f``'s reward of each response: per sample, the samples in parallel across its
        workers; batched, the group in one call (``trl_batch``)."""
        loop = asyncio.get_running_loop()
        if f.batched is None:
            await loop.run_in_executor(f.workers.threads, self._learn_kind, f)
        if f.batched:
            kwargs = trl_batch(self.cfg, responses, example)
            if f.inline is not None:
                return self._call_inline(f, (), kwargs, len(responses))
            return await loop.run_in_executor(f.workers.threads, self._score_batch_local, f,
                                              kwargs, len(responses))
        if f.inline is not None:
            return [self._call_inline(f, (r, example), {}, None)[0] for r in responses]
        # one call per worker: a thread handoff costs more than a sample
        k = min(len(responses), len(f.workers.workers)) or 1
        chunks = [responses[j * len(responses) // k:(j + 1) * len(responses) // k]
                  for j in range(k)]
        parts = await asyncio.gather(*(loop.run_in_executor(f.workers.threads,
                                                            self._score_local, f, c, example)
                                       for c in chunks))
        return [score for part in parts for score in part]

    def _learn_kind(self, f: RewardFn) -> None:
        """In a pool thread: whether ``f`` is batched, from a worker's hello; RewardPoolError
        when no worker can load it."""
        with self._starting(f):
            f.batched = bool(f.workers.hello().get("batched"))

    # ---------------------------------------------------------------- in process (reward_workers=0)
    def _load_inline(self, f: RewardFn) -> Callable:
        try:
            fn = import_function(f.path)
        except BaseException as e:  # noqa: BLE001
            # an exit() at import is the reward's failure, not the server's
            raise RewardPoolError(
                f"{f.label} cannot be loaded: {type(e).__name__}: {e}".splitlines()[0]) from None
        log.warning("%s is scored in the rollout server's own process (task.reward_workers=0): "
                    "no sandbox, no memory or time limit; only for a reward trusted to be quick "
                    "and safe", f.label)
        return fn

    def _call_inline(self, f: RewardFn, args: tuple, kwargs: dict, n: int | None
                     ) -> list[tuple[float | None, str | None]]:
        """``f`` called here: one sample's score (``n`` None) or a batch's ``n``."""
        t0 = time.monotonic()
        kind = "error"
        try:
            result = plain_numbers(f.inline(*args, **kwargs))
            scores = [as_reward(result)] if n is None else self._batch_scores(f, result, n)
        except MemoryError:
            scores, kind = [(0.0, "MemoryError")] * (n or 1), "memory"
        except BaseException as e:  # noqa: BLE001
            # SystemExit too, as in a worker (nothing is awaited here)
            scores = [(0.0, why_failed(e))] * (n or 1)
        self._observe(seconds := time.monotonic() - t0)
        if whys := [why for _, why in scores if why is not None]:
            self._failed(kind, whys[0], len(whys), f.label)
        if seconds > self.timeout_s * (n or 1):
            self.warnings.warning(
                "slow", "%s took %.1fs in this process, past task.reward_timeout_s=%.1fs per "
                "sample, which task.reward_workers=0 does not enforce: the server's loop "
                "(heartbeats included) waited meanwhile", f.label, seconds, self.timeout_s)
        return scores

    # ------------------------------------------------------------------ local
    def _score_local(self, f: RewardFn, responses: list[str], example) -> list[Score]:
        """``responses`` scored by one of ``f``'s workers, in this one pool thread
        (``WorkerPool.call_all``). Raises RewardPoolError when a worker could not start (or the
        pool broke meanwhile: that killed it). Samples left when the pool is closed meanwhile are
        not scored (nor a failure)."""
        try:
            requests = [call_request((r, example), self.timeout_s) for r in responses]
        except Exception as e:
            why = f"cannot send the example to a reward worker: {type(e).__name__}: {e}"
            return [self._score_reply(f, {"kind": "error", "reason": why}) for _ in responses]
        replies = self._call_all(f, requests, self.timeout_s)
        scores = [self._score_reply(f, reply) for reply in replies]
        return scores + [(0.0, "the reward pool was closed")] * (len(responses) - len(scores))

    def _score_batch_local(self, f: RewardFn, kwargs: dict, n: int
                           ) -> list[tuple[float | None, str | None]]:
        """The group in one call of ``f`` by one worker, in this pool thread: ``n`` times
        ``task.reward_timeout_s`` for it."""
        timeout_s = self.timeout_s * n
        try:
            request = pickle.dumps(((), kwargs, timeout_s))
        except Exception as e:
            return self._batch_failed(f, "error", f"cannot send the batch to a reward worker: "
                                                  f"{type(e).__name__}: {e}", n)
        replies = self._call_all(f, [request], timeout_s)
        if not replies:
            return [(0.0, "the reward pool was closed")] * n
        reply = replies[0]
        if isinstance(reply, WorkerLost):
            return self._batch_failed(f, reply.kind, reply.reason, n)
        if "result" not in reply:
            return self._batch_failed(f, reply["kind"], reply["reason"], n)
        scores = self._batch_scores(f, reply["result"], n)
        if whys := [why for _, why in scores if why is not None]:
            self._failed("error", whys[0], len(whys), f.label)
        return scores

    def _batch_scores(self, f: RewardFn, result: object, n: int
                      ) -> list[tuple[float | None, str | None]]:
        """A batched reward's result as ``n`` scores: one number (or None) per completion, else
        each scores 0 with the reason."""
        if not isinstance(result, (list, tuple)) or len(result) != n:
            got = (f"{len(result)} rewards" if isinstance(result, (list, tuple))
                   else reprlib.repr(result))
            why = (f"a batched reward returns one number per completion: {f.path} returned {got} "
                   f"for {n} completions")
            return [(0.0, why)] * n
        return [(None, None) if v is None else as_reward(v) for v in result]

    def _batch_failed(self, f: RewardFn, kind: str, why: str, n: int) -> list[Score]:
        self._failed(kind, why, n, f.label)
        return [(0.0, why)] * n

    def _call_all(self, f: RewardFn, requests: list[bytes], timeout_s: float
                  ) -> list[dict | WorkerLost]:
        """``f.workers.call_all``; RewardPoolError (the pool broken) when a worker cannot
        start."""
        replies: list[dict | WorkerLost] = []
        with self._starting(f):
            replies = f.workers.call_all(requests, timeout_s, self._observe)
        return replies

    @contextlib.contextmanager
    def _starting(self, f: RewardFn):
        """Around a call that may start ``f``'s workers: one that cannot start breaks the pool,
        and RewardPoolError leaves here."""
        try:
            yield
        except StartFailed as failed:
            if not self._closed:  # else close() killed it while it started
                self._break(f"{f.label} cannot be loaded in a reward worker: {failed}")
        except OSError as e:  # no process can be started (EAGAIN, out of file descriptors, ...)
            self._break(str(self._cannot_start(e, f)))
        self._raise_if_broken()

    def _score_reply(self, f: RewardFn, reply: dict | WorkerLost) -> Score:
        if isinstance(reply, WorkerLost):
            kind, why = reply.kind, reply.reason
        elif "result" in reply:
            kind, (reward, why) = "error", as_reward(reply["result"])
            if why is None:
                return reward, None
        else:
            kind, why = reply["kind"], reply["reason"]
        self._failed(kind, why, 1, f.label)
        return 0.0, why

    def _cannot_start(self, e: OSError, f: RewardFn) -> RewardPoolError:
        return RewardPoolError(f"cannot start a reward worker for {f.label}: "
                               f"{type(e).__name__}: {e}")

    def _break(self, why: str) -> None:
        """Make every scoring call raise RewardPoolError(why) from now on and kill every worker
        (the first reason stays)."""
        with self._lock:  # held until every worker is reaped: _raise_if_broken waits for that
            first = self._error is None
            if first:
                self._error = why
            for f in self.fns:  # a thread blocked on one wakes with EOF and raises the same error
                f.workers.stop()
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
                               "in a worker or in process, a batched reward's group, or a batch "
                               "POST)", buckets=SECONDS_BUCKETS).observe(seconds)

    def _failed(self, kind: str, reason: str, n: int = 1, label: str = "") -> None:
        """Count ``n`` samples scored 0 for ``kind``; warn at most once per WARN_EVERY_S for each
        kind."""
        if not n:
            return
        self.metrics.counter("rollout/reward_failures",
                             "samples scored 0 because their reward failed",
                             ("kind",)).labels(kind=kind).inc(n)
        self.warnings.warning(kind, "%s: %d sample(s) scored 0, reward failure (%s): %s",
                              label or self.name, n, kind, reason)

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

