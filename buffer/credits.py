"""Prompt cursor, leases and the admission counters (STALENESS.md): which prompt goes out next, to
whom, until when. No I/O.

Invariants: every prompt below the cursor is exactly one of covered by an accepted group, leased,
queued for re-issue (served before the cursor moves on), or skipped this epoch (``give_back`` or
``cancel`` without ``reissue``: buffer/service.py skips a prompt whose group was refused for its
content or ``MAX_ENGINE_RETRIES`` times for the engine's numbers, or dropped stale under
``stale_policy=drop``); lease ids are never reused, across restarts too, so
``group_id = f"{server_id}-{lease_id}"`` is unique for the life of the job. A WAL checkpoint
holds ``snapshot()``, each control record ``take_changes()``; a restored lease gets a fresh full
timeout."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from areal_like.wire.protocol import TrajectoryGroup
from buffer.staleness import StalenessPolicy
from buffer.wal_format import MAX_GID_BYTES


@dataclass(slots=True)
class Lease:
    lease_id: str
    prompt_index: int
    epoch: int
    server_id: str
    deadline: float  # clock() value after which the prompt is re-issued


class CreditLedger:
    def __init__(self, policy: StalenessPolicy, dataset_size: int, *, lease_timeout_s: float,
                 max_epochs: int = 0, clock: Callable[[], float]):
        if dataset_size < 1:
            raise ValueError("dataset_size must be >= 1")
        self.policy, self.dataset_size, self.lease_timeout_s = policy, dataset_size, lease_timeout_s
        self.max_epochs, self.clock = max_epochs, clock
        self.next_index = self.epoch = self.started = self.consumed = self.next_lease = 0
        self.leases: dict[str, Lease] = {}
        self.reissue: deque[tuple[int, int]] = deque()
        self._forget_changes()

    def _forget_changes(self) -> None:
        self._granted: list[Lease] = []  # in grant order
        self._closed: list[str] = []  # lease ids fulfilled, cancelled or expired
        self._requeued: list[tuple[int, int]] = []  # pushed onto the re-issue queue, in order
        self._dequeued = 0  # taken from its front

    @property
    def in_flight(self) -> int:
        return len(self.leases)

    @property
    def exhausted(self) -> bool:
        return self.max_epochs > 0 and self.epoch >= self.max_epochs and not self.reissue

    def available(self, lag: int = 0) -> int:
        """Credits admission allows now to an engine ``lag`` versions behind (before other
        limits)."""
        return self.policy.capacity(self.consumed, self.started, self.in_flight, lag)

    def consume(self, n: int) -> None:
        """``n`` groups were trained on: their slots stay taken, the admission window moves on."""
        self.consumed += n

    def grant(self, server_id: str, n: int, lag: int = 0) -> list[Lease]:
        """Lease up to ``n`` prompts (re-issues first) within the admission limit
        (``available``)."""
        out: list[Lease] = []
        n = min(n, self.available(lag))
        while len(out) < n:
            if self.reissue:
                index, epoch = self.reissue.popleft()
                self._dequeued += 1
            elif self.exhausted:
                break
            else:
                index, epoch = self.next_index, self.epoch
                self.next_index += 1
                if self.next_index == self.dataset_size:
                    self.next_index, self.epoch = 0, self.epoch + 1
            lease = Lease(f"L{self.next_lease}", index, epoch, server_id,
                          self.clock() + self.lease_timeout_s)
            self.next_lease += 1
            self.started += 1
            self.leases[lease.lease_id] = lease
            self._granted.append(lease)
            out.append(lease)
        return out

    def shortfall_reason(self, lag: int = 0) -> str:
        """Why ``grant`` gave fewer credits than allowed by the caller's limits."""
        if self.in_flight >= self.policy.max_inflight:
            return "inflight"
        if self.started >= self.policy.admission_limit(self.consumed, lag):
            return "staleness"
        return "exhausted"

    def fulfil(self, lease_id: str) -> Lease | None:
        """A group for this lease was accepted: the lease closes, its slot stays taken."""
        lease = self.leases.pop(lease_id, None)
        if lease is not None:
            self._closed.append(lease_id)
        return lease

    def give_back(self, prompt_index: int, epoch: int, *, reissue: bool) -> None:
        """A group was dropped (filter, staleness): return its slot, optionally re-queue its
        prompt."""
        self.started -= 1
        if reissue:
            self.reissue.append((prompt_index, epoch))
            self._requeued.append((prompt_index, epoch))

    def cancel(self, lease_id: str, *, reissue: bool = True) -> Lease | None:
        """The lease's group was rejected: the slot is returned, the prompt re-issued if
        ``reissue``."""
        if (lease := self.fulfil(lease_id)) is not None:
            self.give_back(lease.prompt_index, lease.epoch, reissue=reissue)
        return lease

    def release(self, keep: Callable[[str], bool]) -> list[Lease]:
        """Re-issue every lease whose holder ``keep`` rejects (it left the roster: it will not
        deliver)."""
        return self._cancel_all(lambda lease: not keep(lease.server_id))

    def expire(self) -> list[Lease]:
        """Re-issue every lease past its deadline (the holder died or stalled)."""
        now = self.clock()
        return self._cancel_all(lambda lease: lease.deadline <= now)

    def _cancel_all(self, pred: Callable[[Lease], bool]) -> list[Lease]:
        gone = [lease for lease in self.leases.values() if pred(lease)]
        for lease in gone:
            self.cancel(lease.lease_id)
        return gone

    # ---- persistence
    def state(self) -> dict:
        """The whole state (what ``load_state`` restores)."""
        return {**self._counters(), "leases": _leases(self.leases.values()),
                "reissue": [list(p) for p in self.reissue]}

    def _counters(self) -> dict:
        return {"cursor": [self.next_index, self.epoch], "started": self.started,
                "consumed": self.consumed, "next_lease": self.next_lease}

    def snapshot(self) -> dict:
        """``state()`` for a checkpoint: the next change record starts from here."""
        self._forget_changes()
        return self.state()

    def load_state(self, state: dict) -> None:
        """Replace the state with a ``state()`` (as the changes that build it from nothing)."""
        self.leases, self.reissue = {}, deque()
        self.apply_changes({**state, "granted": state["leases"], "closed": [],
                            "requeued": state["reissue"], "dequeued": 0})

    def take_changes(self) -> dict:
        """What changed since the last ``snapshot``, ``take_changes`` or ``load_state``: the
        counters (whole), the leases granted and closed, and the re-issue queue's pushes and pops
        (it is FIFO: it becomes ``old + requeued`` without its first ``dequeued``, whatever the
        interleaving)."""
        changes = {**self._counters(), "granted": _leases(self._granted), "closed": self._closed,
                   "requeued": [list(p) for p in self._requeued], "dequeued": self._dequeued}
        self._forget_changes()
        return changes

    def apply_changes(self, changes: dict) -> None:
        """Replay a ``take_changes`` record on the state it was taken from."""
        self.next_index, self.epoch = changes["cursor"]
        self.started = changes["started"]
        self.consumed = changes["consumed"]
        self.next_lease = changes["next_lease"]
        deadline = self.clock() + self.lease_timeout_s
        for lid, i, e, sid in changes["granted"]:
            self.leases[lid] = Lease(lid, i, e, sid, deadline)
        for lid in changes["closed"]:
            self.leases.pop(lid, None)  # a replayed group record may have closed it already
        self.reissue.extend((i, e) for i, e in changes["requeued"])
        if changes["dequeued"] > len(self.reissue):
            raise ValueError(f"change record takes {changes['dequeued']} re-issues of "
                             f"{len(self.reissue)}")
        for _ in range(changes["dequeued"]):
            self.reissue.popleft()
        self._forget_changes()


def _leases(leases: Iterable[Lease]) -> list[list]:
    return [[x.lease_id, x.prompt_index, x.epoch, x.server_id] for x in leases]


def version_range(group: TrajectoryGroup) -> tuple[int, int, int]:
    """``(lowest, highest, head_version)`` of the group's token versions, read from their runs (a
    value per run, never a value per token); ``lowest``/``highest`` cover non-empty trajectories
    (0, 0 if none); ``head_version`` is ``group.head_version``."""
    arrays = [t.version_values for t in group.trajectories if t.n_tokens]
    if not arrays:
        return 0, 0, 0
    joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    lo, hi = int(joined.min()), int(joined.max())
    return lo, hi, lo if len(arrays) == len(group.trajectories) else min(lo, 0)


def invalid_group(group: TrajectoryGroup, lease: Lease | None, newest_version: int,
                  versions: tuple[int, int, int]) -> str | None:
    """Why a group cannot be accepted against its lease (None: it can). ``newest_version`` is the
    newest version any engine may serve: the trainer's + 1 (its push may be loading before it
    announces it);
    ``versions`` is the group's ``version_range``."""
    if not 0 < len(group.group_id.encode()) <= MAX_GID_BYTES:
        return f"invalid_group_id: must be 1 to {MAX_GID_BYTES} bytes"
    if lease is None:
        return (f"unknown_lease: {group.lease_id} is not outstanding (expired and re-issued, or "
                "never granted)")
    if (lease.prompt_index, lease.epoch) != (group.prompt_index, group.epoch):
        return (f"lease_mismatch: lease {group.lease_id} is for prompt {lease.prompt_index} "
                f"epoch {lease.epoch}")
    lo, hi, _ = versions
    if hi > newest_version:
        return f"future_version: token version {hi} > newest published version {newest_version}"
    if lo < 0:
        return "negative_version: token versions must be >= 0"
    return None
