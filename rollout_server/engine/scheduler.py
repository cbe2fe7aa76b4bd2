"""Continuous-batching scheduler: one thread that owns the model, the slot KV cache and all requests
(ENGINE.md, Scheduling: the loop, burst gathering, admission).

Invariants:
- Only the scheduler thread touches the model, the KV cache and the request lists; other threads
  talk to it through ``submit`` / ``abort`` / ``hold`` / ``release`` / ``call`` (a command inbox).
- Commands run between two forward passes, so every forward pass sees exactly one weight version,
  and every output token records the version that produced it (``Request.output_versions``).
- No KV outlives its request (no prefix cache), so nothing computed under old weights is reused.
- Every request that entered the scheduler (``submit`` returned) gets exactly one ``on_finish``
  callback, also when the loop dies (an abort carrying status 500) or stops (503); every command
  posted runs, so no ``call`` Future is left pending.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from areal_like.weights.routing import recording
from rollout_server.engine import fastpath, padded
from rollout_server.engine.host import to_device
from rollout_server.engine.kv import SlotKV
from rollout_server.engine.mailbox import Mailbox
from rollout_server.engine.sampling import SamplingParams, prepare, sample, seeded_rng

log = logging.getLogger(__name__)

# an idle scheduler's wait for a burst's next submit, and in all
GATHER_GAP_S, GATHER_MAX_S = 0.001, 0.004
IDLE_WAIT_S = 0.05  # idle loop wake-up; bounds command latency when nothing runs
MAX_PREFILL_TOKENS = 8192  # padded tokens in one prefill batch (bounds activation memory)
ADMIT_FRACTION = 8  # admissions wait for max_running / 8 free slots (see Scheduler.admit_batch)


@dataclass(eq=False, kw_only=True)
class Request:
    """One sequence to generate. ``output_*`` grow by one entry per sampled token."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    on_finish: Callable[[Request], None]
    # streaming: after each token of an unfinished request
    on_token: Callable[[Request], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_versions: list[str] = field(default_factory=list)
    finish_reason: dict | None = None
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    rng: random.Random | None = None  # its own uniforms when seeded (sampling.py)
    log_metrics: bool = True  # False for health probes, as in SGLang
    cached: int = 0  # positions of this request whose KV sits in its slot
    # return_routed_experts: the experts each fed position was routed to, [rows, layers, k] blocks
    # in order (a prefill's, then one per decode step); None: not recorded
    routes: list[torch.Tensor] | None = None
    # logprob_start_len (max_new_tokens 0 only): the log-prob of each input token after this one
    # given the tokens before it, in ``input_logprobs`` when finished (None for this one: SGLang's)
    input_logprob_start: int | None = None
    input_logprobs: list[float | None] | None = None

    def __post_init__(self):
        if self.params.sampling_seed is not None and self.rng is None:
            self.rng = seeded_rng(self.params.sampling_seed)


def unservable(config) -> str:
    """Why the engine cannot serve a model of this Hugging Face ``config``; "" when it can."""
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if other := layer_types - padded.SERVED_LAYER_TYPES:
        return (f"layer types {sorted(other)}: the embedded engine serves full and "
                "sliding-window attention only")
    return ""


class Scheduler:
    def __init__(self, model, *, max_running: int, max_total_tokens: int, context_len: int,
                 weight_version: str, metrics=None, seed: int = 0,
                 gather_gap_s: float = GATHER_GAP_S,
                 gather_max_s: float = GATHER_MAX_S):
        cfg = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_running, self.max_total_tokens, self.context_len = (max_running, max_total_tokens,
                                                                     context_len)
        self.weight_version = weight_version
        self.metrics = metrics
        self.gather_gap_s, self.gather_max_s = gather_gap_s, gather_max_s
        self.shared_rng = random.Random(seed)  # the uniforms of requests without a seed
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv = SlotKV(cfg.num_hidden_layers, max_running, cfg.num_key_value_heads,
                         head_dim, context_len,
                         self.dtype, self.device)
        if why := unservable(cfg):
            raise NotImplementedError(why)
        # the module that runs prefill and decode passes: fastpath when the model's layout is one it
        # knows (same math, less overhead)
        self.path = fastpath if fastpath.supports(model) else padded
        self.running: list[Request] = []  # running[i] lives in KV slot i
        self.waiting: deque[Request] = deque()
        # Admit only when this many slots are free (or the queue is shorter): on CPU a forward pass
        # costs about the same for 1 or 16 rows, so one prefill of 4 requests beats 4 prefills of 1.
        self.admit_batch = max(1, max_running // ADMIT_FRACTION)
        self.held = False  # pause in_place / retract: no forward passes until release()
        self.failure: BaseException | None = None
        self.heartbeat = time.monotonic()
        self.prefills = 0  # prefill passes run
        self.prefill_tokens = 0  # tokens run through prefill passes (shared prompts count once)
        # on_finish callbacks' calls to event loops, sent once per step (mailbox.py)
        self.mail = Mailbox()
        self._inbox: list[Callable[[], None]] = []
        self._submits = 0  # submits among the inbox's commands
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop_guarded, name="engine-scheduler",
                                        daemon=True)

    # ---- thread-safe API
    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def submit(self, req: Request) -> None:
        self._post(lambda: self._enqueue(req), submit=True)

    def abort(self, rid: str = "", *, abort_all: bool = False, message: str = "Aborted") -> None:
        self._post(lambda: self._abort(rid, abort_all, message))

    def hold(self, retract: bool = False) -> Future:
        """Stop stepping (pause in_place), optionally moving running requests back to the queue."""
        return self.call(lambda _: self._hold(retract))

    def release(self) -> Future:
        return self.call(lambda s: setattr(s, "held", False))

    def call(self, fn: Callable[[Scheduler], object]) -> Future:
        """Run ``fn(self)`` on the scheduler thread between two steps; the Future holds its
        result."""
        fut: Future = Future()

        def run():
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self))
                except BaseException as e:  # handed to the caller, the loop goes on
                    fut.set_exception(e)
        self._post(run)
        return fut

    def load(self) -> dict:
        running = list(self.running)
        used = sum(r.cached for r in running)
        return {"num_running_reqs": len(running), "num_waiting_reqs": len(self.waiting),
                "num_used_tokens": used, "token_usage": used / self.max_total_tokens}

    def _post(self, cmd: Callable[[], None], submit: bool = False) -> None:
        with self._cv:
            if self._stopping or self.failure is not None:
                raise RuntimeError(f"engine scheduler is not running ({self.failure!r})")
            self._inbox.append(cmd)
            self._submits += submit
            self._cv.notify_all()

    # ---- the loop (scheduler thread only below this line)
    def _loop_guarded(self) -> None:
        reason = {"type": "abort", "message": "engine shutting down", "status_code": 503,
                  "err_type": "ServiceUnavailable"}
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as e:
            log.exception("engine scheduler died")
            with self._cv:
                self.failure = e
            reason = {"type": "abort", "message": f"engine failure: {e!r}", "status_code": 500,
                      "err_type": "InternalServerError"}
        finally:  # every request still here gets its one on_finish (module docstring)
            with self._cv:  # stopping or failed: _post accepts nothing after this
                inbox, self._inbox = self._inbox, []
            for cmd in inbox:  # answer pending callers instead of leaving them hanging
                try:
                    cmd()
                except BaseException:
                    pass
            for r in [*self.running, *self.waiting]:
                self._finish(r, reason)
            self.running, self.waiting = [], deque()
            self.mail.flush()

    def _loop(self) -> None:
        while True:
            self.mail.flush()  # what the last step finished, one wake-up per waiting loop
            with self._cv:
                if (not self._inbox and (self.held or not (self.running or self.waiting))
                        and not self._stopping):
                    self._cv.wait(timeout=IDLE_WAIT_S)
                if self._stopping:
                    break
                if (self._inbox and self._submits == len(self._inbox)
                        and not (self.held or self.running or self.waiting)):
                    self._gather()  # only submits came: wait for the rest of their burst
                    if self._stopping:
                        break
                inbox, self._inbox, self._submits = self._inbox, [], 0
            for i, cmd in enumerate(inbox):
                try:
                    cmd()
                except BaseException:  # the loop dies: the rest are answered with the inbox
                    with self._cv:
                        self._inbox[:0] = inbox[i + 1:]
                    raise
            self.heartbeat = time.monotonic()
            if self.held:
                continue
            new = self._admit()
            if new:
                self._prefill(new)
            if self.running:
                self._decode()
            if self.metrics:
                self.metrics.on_step(self.load())

    def _gather(self) -> None:
        """Wait (holding no lock: ``wait`` releases it) while submits keep coming (ENGINE.md)."""
        end = time.monotonic() + self.gather_max_s
        seen = self._submits
        while (left := end - time.monotonic()) > 0 and not self._stopping:
            self._cv.wait(timeout=min(self.gather_gap_s, left))
            # a pause, or another command: now
            if self._submits == seen or self._submits != len(self._inbox):
                return
            seen = self._submits

    def _enqueue(self, req: Request) -> None:
        if self.metrics and req.log_metrics:
            self.metrics.on_submit(req)
        if len(req.input_ids) + len(req.output_ids) >= self.context_len:  # would not fit a slot
            self._finish(req, {"type": "abort",
                               "message": f"The input ({len(req.input_ids)} tokens) is longer "
                                          f"than the context length ({self.context_len} tokens).",
                               "status_code": 400,
                               "err_type": "BadRequestError"})
        elif req.params.max_new_tokens == 0:
            if req.input_logprob_start is not None:
                req.input_logprobs = self._input_logprobs(req)
            self._finish(req, {"type": "length", "length": 0})
        else:
            self.waiting.append(req)

    @torch.no_grad()
    def _input_logprobs(self, req: Request) -> list[float | None]:
        """log_softmax(logits / temperature)[token] of each input token from
        ``input_logprob_start`` on, fp32 (the engine's convention, sampling.py: temperature 0 is
        1), from one plain forward of the whole input outside the KV slots; None for the first,
        as SGLang's (its log-prob is not computed there)."""
        ids = torch.tensor([req.input_ids], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        logp = torch.log_softmax(logits / (req.params.temperature or 1.0), dim=-1)
        values = logp.gather(-1, ids[0, 1:, None])[:, 0].tolist()
        return [None] + values[req.input_logprob_start:]

    def _admit(self) -> list[Request]:
        free = self.max_running - len(self.running)
        if self.running and free < min(len(self.waiting), self.admit_batch):
            # batch admissions: a prefill pass costs about a decode step, do fewer, larger ones
            return []
        new: list[Request] = []
        reserved = sum(self._reserve(r) for r in self.running)
        longest = 0
        while self.waiting and len(self.running) + len(new) < self.max_running:
            r = self.waiting[0]
            need = self._reserve(r)
            longest = max(longest, len(r.input_ids) + len(r.output_ids))
            busy = self.running or new
            if busy and (reserved + need > self.max_total_tokens
                         or longest * (len(new) + 1) > MAX_PREFILL_TOKENS):
                break
            new.append(self.waiting.popleft())
            reserved += need
        return new

    def _reserve(self, r: Request) -> int:
        return min(self.context_len, len(r.input_ids) + r.params.max_new_tokens)

    def _prefill(self, new: list[Request]) -> None:
        """Prefill ``new`` into slots ``[B, B + k)``; identical sequences in it are computed once
        and their KV copied (same weights, same pass, so nothing stale is shared)."""
        self.prefills += 1
        B = len(self.running)
        first: dict[tuple[int, ...], int] = {}
        src = [first.setdefault(tuple(r.input_ids + r.output_ids), i) for i, r in enumerate(new)]
        order = ([i for i in range(len(new)) if src[i] == i]
                 + [i for i in range(len(new)) if src[i] != i])
        new = [new[i] for i in order]  # distinct sequences first, in slots [B, B + u)
        # a retracted request re-prefills its outputs
        seqs = [r.input_ids + r.output_ids for r in new]
        u, longest = len(first), max(map(len, seqs))
        self.kv.ensure(longest + 1)
        # before the forward: if it raises, these are answered with the rest
        self.running.extend(new)
        batch = self._sampling(new)
        row = {orig: j for j, orig in enumerate(order)}  # original index -> position in `new`
        rows = [row[src[i]] for i in order]  # each request's distinct twin (a row of `logits`)
        twin_rows = to_device(rows, torch.long, self.device)
        with self._recording(new) as seen:
            logits = self.path.prefill(self.model, self.kv, seqs[:u], B)
        if seen:  # right-padded rows of the distinct sequences: [u * longest, layers, k]
            per_row = seen[0].view(u, -1, *seen[0].shape[1:])
            for j, r in enumerate(new):
                if r.routes is not None:  # a retracted request's are all recomputed here
                    r.routes = [per_row[rows[j], :len(seqs[j])]]
        self.prefill_tokens += sum(map(len, seqs[:u]))
        self.kv.move([B + rows[j] for j in range(u, len(new))],
                     list(range(B + u, B + len(new))), longest)
        for r, s in zip(new, seqs):
            r.cached = len(s)
        self._sample_and_retire(logits[twin_rows], list(range(B, B + len(new))), batch)

    def _decode(self) -> None:
        running = self.running
        kv_len = max(r.cached for r in running) + 1
        self.kv.ensure(kv_len)
        batch = self._sampling(running)
        # each row's last token and its position, in one copy queued before the forward
        last, start = to_device([[r.output_ids[-1] for r in running], [r.cached for r in running]],
                                torch.long, self.device)
        with self._recording(running) as seen:
            logits = self.path.decode(self.model, self.kv, last, start, kv_len)
        for i, r in enumerate(running):
            r.cached += 1
            if seen and r.routes is not None:
                r.routes.append(seen[0][i:i + 1])
        self._sample_and_retire(logits, list(range(len(running))), batch)

    def _recording(self, reqs: list[Request]) -> AbstractContextManager[list[torch.Tensor]]:
        """Records the routes of the forward inside when a request of ``reqs`` asked for them."""
        if any(r.routes is not None for r in reqs):
            return recording(self.model)
        return contextlib.nullcontext([])

    def _sampling(self, reqs: list[Request]):
        """The sampling inputs of ``reqs``, on the device before the forward pass is queued: one
        uniform per sampled row, from its request's own stream or the shared one (sampling.py)."""
        uniforms = [0.0 if r.params.greedy
                    else (r.rng if r.rng is not None else self.shared_rng).random() for r in reqs]
        return prepare([r.params for r in reqs], uniforms, self.device)

    def _sample_and_retire(self, logits: torch.Tensor, slots: list[int], batch) -> None:
        reqs = [self.running[s] for s in slots]
        tokens, logps = sample(logits, batch)
        # The step's one read of the device (ENGINE.md): tokens and logprobs in one copy; fp64
        # holds every token id and every fp32 logprob exactly.
        out_tokens, out_logps = torch.stack((tokens.double(), logps.double())).tolist()
        now = time.monotonic()
        done: list[tuple[int, dict]] = []
        for slot, r, tok, lp in zip(slots, reqs, map(int, out_tokens), out_logps):
            r.output_ids.append(tok)
            r.output_logprobs.append(lp)
            r.output_versions.append(self.weight_version)
            if r.first_token_at is None:
                r.first_token_at = now
            reason = self._finish_reason(r, tok)
            if reason is not None:
                done.append((slot, reason))
            elif r.on_token is not None:
                _notify(r.on_token, r)
        self._retire(done)
        if self.metrics:
            self.metrics.on_tokens(len(reqs))

    def _finish_reason(self, r: Request, tok: int) -> dict | None:
        if tok in r.stop_ids:
            return {"type": "stop", "matched": tok}
        if len(r.output_ids) >= r.params.max_new_tokens:
            return {"type": "length", "length": r.params.max_new_tokens}
        if len(r.input_ids) + len(r.output_ids) >= self.context_len:
            return {"type": "length", "length": len(r.output_ids)}
        return None

    def _retire(self, done: list[tuple[int, dict]]) -> None:
        """Remove finished slots (highest first), refilling each hole with the last running row; the
        KV rows move once, in one copy (``SlotKV.move``)."""
        running = self.running
        held = list(range(len(running)))  # held[i]: the slot whose KV row slot i is to hold
        finished = []
        for slot, reason in sorted(done, key=lambda x: -x[0]):
            finished.append((running[slot], reason))
            if slot != len(running) - 1:
                running[slot], held[slot] = running[-1], held[-1]
            running.pop()
            held.pop()
        moves = [(src, dst) for dst, src in enumerate(held) if src != dst]
        try:
            if moves:
                self.kv.move([s for s, _ in moves], [d for _, d in moves],
                             max(running[d].cached for _, d in moves))
        # out of the running list: finished here or never (a failed copy ends the loop, not them)
        finally:
            for r, reason in finished:
                self._finish(r, reason)

    def _finish(self, r: Request, reason: dict) -> None:
        # before finish_reason: readers on other threads test finish_reason
        r.finished_at = time.monotonic()
        r.finish_reason = reason
        r.cached = 0
        if self.metrics and r.log_metrics:
            self.metrics.on_finish(r)
        _notify(r.on_finish, r)

    def _abort(self, rid: str, abort_all: bool, message: str) -> None:
        reason = {"type": "abort", "message": message, "status_code": None, "err_type": None}
        keep: deque[Request] = deque()
        for r in self.waiting:
            if abort_all or r.rid == rid:
                self._finish(r, {**reason,
                                 "message": "Abort in waiting queue" if not abort_all else message})
            else:
                keep.append(r)
        self.waiting = keep
        self._retire([(i, reason) for i, r in enumerate(self.running) if abort_all or r.rid == rid])

    def _hold(self, retract: bool) -> int:
        self.held = True
        if retract:  # drop the KV; the requests re-prefill prompt + outputs after release()
            for r in reversed(self.running):
                r.cached = 0
                self.waiting.appendleft(r)
            self.running = []
        return len(self.running) + len(self.waiting)

    def flush(self) -> bool:
        """Release KV memory; refused (False) while requests run, or wait unless paused, as in
        SGLang 0.5.23 (``is_fully_idle(ignore_waiting=paused)``)."""
        if self.running or (self.waiting and not self.held):
            return False
        self.kv.flush()
        return True


def _notify(callback: Callable[[Request], None], r: Request) -> None:
    try:
        callback(r)
    except Exception:  # a broken callback must not take the scheduler down with it
        log.exception("callback of request %s failed", r.rid)
