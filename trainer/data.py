"""Batches from the buffer: rank 0 asks, every rank gets the same padded tensors.

Invariants:
- Every rank leaves ``next_batch`` with the same outcome (a batch, a stop, or the same error);
  each attempt is bounded far below the process-group timeout.
- The trainer never dies on data: a group ``content_problem`` refuses (an empty prompt, an
  out-of-vocabulary token, a trajectory longer than the context, ...) is dropped and logged
  (``dropped_groups``); an empty batch is retried forever, a silent buffer for
  ``buffer_timeout_s`` is ``BufferUnavailable``. Staleness is the buffer's to enforce. A batch
  whose step raises anyway is quarantined (``Quarantine``): skipped on every rank, recorded, and
  acknowledged with the next request like any batch received, so it never comes back.
- Layout (right padding, pad id 0): ``input_ids[i] = prompt_i + output_i``; output token t sits at
  input position ``P_i + t`` and is predicted at ``P_i - 1 + t``.
- ``mask`` is the loss mask everything reads: 1 on generated tokens, 0 on padding and on a
  multi-turn episode's context tokens (``Trajectory.loss_mask``), which only condition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch

from areal_like.net.dealer import Client
from areal_like.net.security import Keys
from areal_like.net.transport import TransportTimeout
from areal_like.wire.group_checks import content_problem
from areal_like.wire.protocol import Batch, BatchRequest, Roster, RosterRequest, TrajectoryGroup
from trainer.ranks import all_ranks, from_rank0

log = logging.getLogger("trainer.data")

# on top of wait_s: the buffer answers within wait_s; the margin covers a loaded machine
REPLY_MARGIN_S = 5.0
PAD_ID = 0


class BufferUnavailable(RuntimeError):
    """The buffer has not answered for longer than ``trainer.buffer_timeout_s``."""


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [N, S] int64, prompt + output, right-padded with PAD_ID
    prompt_lens: torch.Tensor  # [N] int64, >= 1
    output_lens: torch.Tensor  # [N] int64
    behav_logp: torch.Tensor  # [N, T] float32, engine logprobs of output tokens (0 on padding)
    # [N, T] float32, 1 on generated output tokens (Trajectory.loss_mask), 0 on context/padding
    mask: torch.Tensor
    rewards: torch.Tensor  # [N] float32
    group_ids: torch.Tensor  # [N] int64, index of the sequence's group in this batch
    head_versions: torch.Tensor  # [G] int64, min token version per group
    # [N, S, layers, top_k] int64: the experts the engine routed each input position to (routing
    # replay, areal_like/weights/routing.py); None: the routers choose
    routes: torch.Tensor | None = None
    # [N, T] float32: a process reward model's step rewards on their tokens (the trajectory's
    # process_rewards metadata; ``rewards`` holds their sum); None: no row has any
    process_rewards: torch.Tensor | None = None
    # [N, T] float32: a teacher's log-probs of the output tokens (distill; 0 on padding and on rows
    # without them); None: no row has any
    teacher_logp: torch.Tensor | None = None
    has_teacher: torch.Tensor | None = None  # [N] bool: the row has the teacher's log-probs

    @property
    def n_seqs(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def select(self, idx: torch.Tensor | list[int]) -> TrainBatch:
        """Rows ``idx`` (per-sequence fields), trimmed to the longest selected sequence."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        s = int((self.prompt_lens[idx] + self.output_lens[idx]).max()) if len(idx) else 1
        t = max(1, int(self.output_lens[idx].max())) if len(idx) else 1
        return TrainBatch(input_ids=self.input_ids[idx, :s], prompt_lens=self.prompt_lens[idx],
                          output_lens=self.output_lens[idx], behav_logp=self.behav_logp[idx, :t],
                          mask=self.mask[idx, :t], rewards=self.rewards[idx],
                          group_ids=self.group_ids[idx], head_versions=self.head_versions,
                          routes=None if self.routes is None else self.routes[idx, :s],
                          process_rewards=None if self.process_rewards is None
                          else self.process_rewards[idx, :t],
                          teacher_logp=None if self.teacher_logp is None
                          else self.teacher_logp[idx, :t],
                          has_teacher=None if self.has_teacher is None else self.has_teacher[idx])

    def to(self, device: torch.device) -> TrainBatch:
        """On ``device``; onto a GPU without waiting for it (pageable host memory is staged at
        once: safe), so the next micro-batch's copy does not drain the queue of the last one."""
        onto_gpu = torch.device(device).type != "cpu"
        return TrainBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=onto_gpu)
                             for f in fields(self) if getattr(self, f.name) is not None})


def groups_to_batch(groups: list[TrajectoryGroup],
                    route_shape: tuple[int, int] | None = None) -> TrainBatch:
    """Pad a list of groups into one ``TrainBatch`` (see the module docstring for the layout);
    with ``route_shape`` (layers, top_k: routing replay) every trajectory's ``routed_experts``
    become ``routes`` (``BatchSource.usable`` dropped the groups without them)."""
    trajs = [(gi, t) for gi, g in enumerate(groups) for t in g.trajectories]
    n = len(trajs)
    p_lens = np.array([len(t.prompt_ids) for _, t in trajs], dtype=np.int64)
    o_lens = np.array([len(t.output_ids) for _, t in trajs], dtype=np.int64)
    if n == 0 or p_lens.min() < 1:
        raise ValueError("every trajectory needs a non-empty prompt "
                         "(its first output token is predicted from it)")
    s, t_max = int((p_lens + o_lens).max()), max(1, int(o_lens.max()))
    input_ids = np.full((n, s), PAD_ID, dtype=np.int64)
    behav = np.zeros((n, t_max), dtype=np.float32)
    mask = np.zeros((n, t_max), dtype=np.float32)
    process = teacher = None
    has_teacher = np.array([t.teacher_logp is not None for _, t in trajs])
    if has_teacher.any():
        teacher = np.zeros((n, t_max), dtype=np.float32)
    for i, (_, t) in enumerate(trajs):
        p, o = p_lens[i], o_lens[i]
        input_ids[i, :p] = t.prompt_ids
        input_ids[i, p:p + o] = t.output_ids
        behav[i, :o] = t.behav_logp
        mask[i, :o] = t.loss_mask  # 0 on context tokens (multi-turn): no loss, no token count
        if has_teacher[i]:
            teacher[i, :o] = t.teacher_logp
        for token, r in t.metadata.get("process_rewards", ()):  # checked: content_problem
            process = np.zeros((n, t_max), dtype=np.float32) if process is None else process
            process[i, token] += r
    return TrainBatch(
        routes=None if route_shape is None else batch_routes(trajs, s, route_shape),
        input_ids=torch.from_numpy(input_ids), prompt_lens=torch.from_numpy(p_lens),
        output_lens=torch.from_numpy(o_lens), behav_logp=torch.from_numpy(behav),
        mask=torch.from_numpy(mask),
        rewards=torch.tensor([t.reward for _, t in trajs], dtype=torch.float32),
        group_ids=torch.tensor([gi for gi, _ in trajs], dtype=torch.long),
        head_versions=torch.tensor([g.head_version for g in groups], dtype=torch.long),
        process_rewards=None if process is None else torch.from_numpy(process),
        teacher_logp=None if teacher is None else torch.from_numpy(teacher),
        has_teacher=None if teacher is None else torch.from_numpy(has_teacher),
    )


def batch_routes(trajs: list, width: int, shape: tuple[int, int]) -> torch.Tensor:
    """[N, width, layers, top_k]: row i's engine routes at its fed positions; experts 0..k-1 at
    the rest (its last token and padding: no log-prob reads them, causal attention)."""
    layers, k = shape
    out = np.broadcast_to(np.arange(k, dtype=np.int64), (len(trajs), width, layers, k)).copy()
    for i, (_, t) in enumerate(trajs):
        r = t.routed_experts.reshape(-1, layers, k)
        out[i, :len(r)] = r
    return torch.from_numpy(out)


# no data for this long: ask the buffer whether an engine is behind our version
RESYNC_CHECK_S = 5.0

# quarantined batches in a row after which the trainer stops: it is broken, not fed poison
MAX_QUARANTINED_IN_A_ROW = 3
ERROR_CHARS = 400  # of a quarantined batch's error, in its record
# raised in a step, but not by its batch: a peer rank or the device failed (a CUDA error leaves
# the context unusable), a disk, a socket
NOT_THE_BATCH = (torch.distributed.DistError, torch.OutOfMemoryError, torch.AcceleratorError,
                 OSError)


class Quarantine:
    """Batches whose step raised in its computation (forward, loss, backward): each is skipped
    after its one failure, on every rank alike, and recorded (its groups, the error cut to
    ``ERROR_CHARS``); ``BatchSource`` acknowledges it with the next request, so the buffer never
    hands it out again (buffer/STALENESS.md, Hand-out). An error in ``NOT_THE_BATCH`` is
    raised as before, and so is the error of the ``MAX_QUARANTINED_IN_A_ROW``-th batch in a
    row."""

    def __init__(self, rank: int, metrics=None):
        self.rank, self.metrics = rank, metrics  # metrics: rank 0's
        self.total = self.in_a_row = 0

    @staticmethod
    def caught(error: Exception) -> Exception:
        """``error`` if it may be the batch's doing; else it is raised again."""
        if isinstance(error, NOT_THE_BATCH):
            raise error
        return error

    def skip(self, error: Exception | None, group_ids: list[str], version: int) -> dict | None:
        """A collective (every rank calls it after every step's computation, ``error`` the
        exception this rank's raised or None): the batch's record when any rank's raised, else
        None. Raises once ``MAX_QUARANTINED_IN_A_ROW`` batches in a row were quarantined."""
        if all_ranks(error is None):
            self.in_a_row = 0
            return None
        self.total += 1
        self.in_a_row += 1
        said = (" ".join(f"{type(error).__name__}: {error}".split())[:ERROR_CHARS]
                if error is not None else "raised on another rank (its log holds the traceback)")
        if error is not None:
            log.error("batch for version %d quarantined (skipped, acknowledged): its step raised "
                      "%s", version, said, exc_info=error)
        if self.metrics is not None:
            self.metrics.counter("trainer/batches_quarantined", "batches whose step raised: "
                                 "skipped and acknowledged").inc()
            self.metrics.counter("trainer/groups_quarantined",
                                 "groups of quarantined batches").inc(len(group_ids))
        if self.in_a_row >= MAX_QUARANTINED_IN_A_ROW:
            raise RuntimeError(f"{self.in_a_row} batches in a row raised in their step (the last "
                               f"for version {version}: {said}): the trainer fails on every batch; "
                               "stopping") from error
        return {"event": "quarantined", "policy_version": version, "groups": group_ids,
                "error": said, "rank": self.rank if error is not None else None,
                "quarantined_total": self.total}


class BatchSource:
    """``next_batch(version)`` on every rank; only rank 0 holds a buffer connection.

    Liveness: while no data comes rank 0 checks the roster every ``RESYNC_CHECK_S``; when an engine
    is behind the trainer's version (it could never produce fresh data) every rank calls
    ``on_stall`` (the loop re-pushes) and the wait goes on."""

    def __init__(self, address: str, n_groups: int, *, keys: Keys | None = None, wait_s: float,
                 buffer_timeout_s: float, rank: int,
                 should_stop: Callable[[], bool] = lambda: False, vocab_size: int = 0,
                 context: int = 0, route_shape: tuple[int, int] | None = None):
        self.n_groups = n_groups
        self.wait_s = wait_s
        self.buffer_timeout_s = buffer_timeout_s
        self.rank = rank
        self.should_stop = should_stop
        self.vocab_size = vocab_size  # token ids must lie in [0, vocab_size) (0: unchecked)
        self.context = context  # prompt + output tokens of a trajectory, at most (0: unchecked)
        # routing replay (trainer.routing_replay): (layers, top_k) of every trajectory's routes
        self.route_shape = route_shape
        self.dropped_groups = 0  # groups dropped from batches for their content (never trained on)
        self.client = Client(address, keys=keys, timeout_s=wait_s + REPLY_MARGIN_S,
                             identity="trainer") if rank == 0 else None
        if self.client is not None:  # a stop ends its wait (the buffer may be gone with run)
            self.client.cancel = should_stop
        self.empty_polls = 0  # metric: answers with no batch (waiting for data)
        # acked in the next request: the buffer then marks that batch consumed
        self.last_batch_id = ""
        # rank 0: the groups of the last batch (sample tables)
        self.last_groups: list[TrajectoryGroup] = []
        self.on_stall: Callable[[], object] | None = None
        self._next_check = 0.0

    def _attempt(self, version: int, last_reply: list[float]) -> tuple[str, object]:
        """Rank 0: one request. Returns (status, payload)."""
        if self.should_stop():
            return "stop", None
        try:
            reply = self.client.request(BatchRequest(n_groups=self.n_groups,
                                                     trainer_version=version, wait_s=self.wait_s,
                                                     ack_batch=self.last_batch_id))
        except TransportTimeout:
            silent = time.monotonic() - last_reply[0]
            if silent > self.buffer_timeout_s:
                return "error", (
                    f"the buffer at {self.client.address} has not answered for {silent:.0f}s "
                    f"(trainer.buffer_timeout_s={self.buffer_timeout_s:g}); is it running?")
            return "empty", "timeout"
        last_reply[0] = time.monotonic()
        if not isinstance(reply, Batch):
            return "error", f"the buffer answered a BatchRequest with {reply.TYPE}"
        if not reply.groups:
            if self.on_stall is not None and time.monotonic() > self._next_check:
                self._next_check = time.monotonic() + RESYNC_CHECK_S
                behind = self._engines_behind(version)
                if behind:
                    return "resync", behind
            return "empty", reply.reason
        # acked even if nothing in it is usable: it must not come back
        self.last_batch_id = reply.batch_id
        groups = self.usable(reply.groups)
        if not groups:
            return "empty", "every group of the batch was dropped"
        self.last_groups = groups
        return "batch", groups_to_batch(groups, self.route_shape)

    def usable(self, groups: list[TrajectoryGroup]) -> list[TrajectoryGroup]:
        """The groups a step can train on; the others are logged and counted, never raised on."""
        out = []
        for g in groups:
            why = content_problem(g, self.vocab_size, self.context) or self._no_routes(g)
            if why is None:
                out.append(g)
                continue
            self.dropped_groups += 1
            log.error("dropped group %s from the batch: %s", g.group_id, why)
        return out

    def _no_routes(self, g: TrajectoryGroup) -> str | None:
        """Why routing replay cannot train on ``g`` (a trajectory without its routes), or None."""
        if self.route_shape is None:
            return None
        size = self.route_shape[0] * self.route_shape[1]
        for t in g.trajectories:
            r = t.routed_experts
            if r is None or len(r) != size * (len(t.prompt_ids) + t.n_tokens - 1):
                return (f"trainer.routing_replay: a trajectory carries no routed_experts of "
                        f"[prompt + output - 1, {self.route_shape[0]} layers, "
                        f"{self.route_shape[1]} experts]")
        return None

    def _engines_behind(self, version: int) -> list[str]:
        try:
            roster = self.client.request(RosterRequest())
        except TransportTimeout:
            return []
        if not isinstance(roster, Roster):
            return []
        return [m.server_id for m in roster.members if m.policy_version < version]

    def next_batch(self, version: int) -> TrainBatch | None:
        """The next batch for step ``version -> version + 1``, or None when a stop was requested."""
        last_reply = [time.monotonic()]
        # a normal wait for generation is not a stall
        self._next_check = time.monotonic() + RESYNC_CHECK_S
        while True:
            status, payload = from_rank0(self._attempt(version, last_reply) if self.rank == 0
                                         else None)
            if status == "batch":
                return payload
            if status == "stop":
                return None
            if status == "error":
                raise BufferUnavailable(payload)
            if status == "resync":
                if self.rank == 0:  # expected after an evaluation (ROLLOUT.md, "Evaluation");
                    # a push that cannot succeed is logged as an error (trainer/engine_lag.py)
                    log.info("engines %s serve a version older than %d (back from an evaluation, "
                             "or they missed a push): pushing the weights to them again",
                             payload, version)
                self.on_stall()
                continue
            self.empty_polls += 1
            if self.rank == 0 and self.empty_polls % 10 == 0:
                log.info("waiting for data for version %d (%s)", version, payload)
            if payload == "timeout":
                # the client already waited its timeout; avoid a hot loop on fast errors
                time.sleep(0.1)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
