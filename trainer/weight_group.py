"""The group path of weight sync: ``WeightGroup`` (rank 0's weight-update process group) and its
sender ``GroupSender`` (trainer/WEIGHT_SYNC.md).

Invariants:
- After any failure the group is torn down (NCCL aborted before destroy) and re-formed at the
  next plan; a broken group is never reused.
- Each formation's name carries a random token only the plan carries: only its members can join.
- The group is reused while the plan's members (ids, ranks, incarnations) are the formed group's.
- Every step on the group ends by the push's deadline: ``wait_work`` waits in slices, asking
  ``check`` between them; ``watchdog`` aborts a launch that blocks past it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch

from areal_like.net.distributed import destroy_weight_group, free_port, init_weight_group
from areal_like.settings.config import WeightSyncConfig
from areal_like.weights.plan import BucketSpec, SyncMember, WeightSyncPlan
from trainer.weight_buckets import BucketPipeline, Sender, gather
from trainer.weight_members import BROADCAST_SLICE_S, ROSTER_POLL_S, RendezvousWatch

log = logging.getLogger("trainer.weight_sync")

GROUP_TOKEN_BYTES = 16  # random bytes in each group's name, the key space of its rendezvous store
NCCL_POLL_S = 0.0005  # NCCL completion poll; small next to any bucket's transfer time


class WeightGroup:
    """Trainer rank 0's side of the weight-update group (group rank 0)."""

    def __init__(self, cfg: WeightSyncConfig, backend: str):
        self.cfg, self.backend = cfg, backend
        self.pg = None
        self.key: tuple | None = None  # ((server_id, engine_ranks, incarnation), ...) formed
        self.name = cfg.group_name  # + a fresh token at each formation (``reserve``)
        self.port = 0

    def reserve(self, key: tuple) -> bool:
        """Whether a plan for the members ``key`` re-forms the group; if so, new name and port."""
        if self.pg is not None and key == self.key:
            return False
        self.port = self.cfg.master_port or free_port(self.cfg.master_addr)
        # unguessable: only the plan's members (authenticated channel) can join its store
        self.name = f"{self.cfg.group_name}-{secrets.token_hex(GROUP_TOKEN_BYTES)}"
        return True

    def form(self, plan: WeightSyncPlan, key: tuple, watch: RendezvousWatch,
             engine_key: str) -> None:
        """Join ``plan``'s group as rank 0, its store's gate asking for ``engine_key`` (the job's
        engine API key); the rendezvous ends at ``watch.give_up`` or a lost member."""
        self.teardown()
        self.pg = init_weight_group(plan.backend, plan.master_addr, plan.master_port,
                                    plan.world_size, 0, plan.group_name,
                                    timeout_s=self.cfg.deadline_s,
                                    connect_timeout_s=max(0.5, watch.give_up - time.monotonic()),
                                    check=watch, check_every_s=ROSTER_POLL_S, key=engine_key)
        self.key = key

    def forget_members(self) -> None:
        """A member missed a version: the next plan re-forms the group."""
        self.key = None

    def run(self, step: Callable[[], int | None], deadline: float) -> int | None:
        """One step on the group; on NCCL the watchdog aborts it at ``deadline`` (a launch that
        blocks: the communicator's creation with a dead peer)."""
        with watchdog(self.abort, deadline) if self.backend == "nccl" else nullcontext():
            return step()

    def abort(self) -> None:
        """Abort the communicator (NCCL: unblocks a call stuck on a dead peer); from any thread."""
        pg = self.pg
        if pg is not None and self.backend == "nccl" and hasattr(pg, "abort"):
            pg.abort()

    def teardown(self) -> None:
        if self.pg is not None:
            try:  # a communicator with a hung op would block a plain destroy
                self.abort()
            except Exception as e:  # already broken or aborted: destroy below still cleans up
                log.debug("abort of the weight group failed: %s", e)
            destroy_weight_group(self.pg)
        self.pg, self.key = None, None


class GroupSender(Sender):
    """The sender of path ``distributed``: buckets broadcast on the weight group (all ranks)."""

    def __init__(self, cfg: WeightSyncConfig, backend: str, rank: int, send_dtype: str):
        self.cfg, self.rank, self.send_dtype = cfg, rank, send_dtype
        self.group = WeightGroup(cfg, backend)
        self.pipeline = BucketPipeline()  # its staging buffers are reused by every push
        self._first: list = []  # the staged buckets of this push, for a re-push from them

    def holds_all(self, buckets: list[BucketSpec]) -> bool:
        return len(buckets) <= BucketPipeline.SLOTS

    def overlaps(self, buckets: list[BucketSpec]) -> bool:
        return self.holds_all(buckets)  # a model in the staging buffers

    def stage(self, model: torch.nn.Module, params, buckets: list[BucketSpec], report) -> None:
        """Gather and pack the first buckets before the plan: outside the engines' pause."""
        for b in buckets[:BucketPipeline.SLOTS]:
            tensors = gather(params, b, self.send_dtype)
            if self.rank == 0:
                report.bytes += self.pipeline.stage(tensors)
        self._first = self.pipeline.staged_buckets()

    def rewind(self, params, buckets: list[BucketSpec], report) -> None:
        """Before a re-push: the same bytes staged again (from the buffers when they hold all)."""
        if self.holds_all(buckets):
            self.pipeline.restage(self._first)
        else:
            self.stage(None, params, buckets, report)

    def route(self, version: int, roster: list[tuple[str, int, str]]) -> dict:
        """The plan's fields for the group: trainer rank 0 is group rank 0, then each member's."""
        reform = self.group.reserve(tuple(roster))
        members, offset = [], 1
        for server_id, ranks, _ in roster:
            members.append(SyncMember(server_id=server_id, rank_offset=offset))
            offset += ranks
        return dict(group_name=self.group.name, master_addr=self.cfg.master_addr,
                    master_port=self.group.port, world_size=offset, reform=reform, members=members)

    def connect(self, plan: WeightSyncPlan, roster: list[tuple[str, int, str]],
                watch: RendezvousWatch, engine_key: str) -> None:
        if plan.reform:
            self.group.form(plan, tuple(roster), watch, engine_key)

    def send(self, params, buckets: list[BucketSpec], report, deadline: float,
             check: Callable[[], None]) -> None:
        """Broadcast the staged buckets, then gather (all ranks) and
        broadcast (rank 0) the others."""
        healthy = self.rank == 0 and self.group.pg is not None
        self.pipeline.wait = lambda work: wait_work(work, deadline, self.group.backend, check)
        t0 = time.monotonic()
        while healthy and self.pipeline.staged:
            healthy = self._step(report, deadline, lambda: self.pipeline.launch(self.group.pg))
        for b in buckets[BucketPipeline.SLOTS:]:
            # full_tensor() is an all-gather: every rank runs it, even after a failure.
            tensors = gather(params, b, self.send_dtype)
            if healthy:
                healthy = self._step(report, deadline,
                                     lambda: self.pipeline.send(tensors, self.group.pg))
        if healthy:
            self._step(report, deadline, self.pipeline.finish)
        self.pipeline.abandon()  # rank > 0, or after a failure: nothing stays for the next push
        report.transfer_s += time.monotonic() - t0

    def _step(self, report, deadline: float, step: Callable[[], int | None]) -> bool:
        """One broadcast step; on failure (a member died or stalled) the group is torn down."""
        try:
            report.bytes += self.group.run(step, deadline) or 0
            return True
        except Exception as e:
            self.pipeline.abandon()
            report.error = f"{type(e).__name__}: {e}"
            log.warning("weight sync v%d: broadcast failed: %s", report.version, report.error)
            self.group.teardown()
            return False

    def skip(self) -> None:
        """Nothing is sent: drop the staged buckets and a maybe half-formed group."""
        self.pipeline.abandon()
        self.group.teardown()

    def forget_members(self) -> None:
        self.group.forget_members()

    def close(self) -> None:
        self.group.teardown()
        self.pipeline.release()


def wait_work(work, deadline: float, backend: str, check: Callable[[], None]) -> None:
    """Wait for ``work`` (an async broadcast) until ``deadline`` (``time.monotonic()``), calling
    ``check`` after each slice of ``BROADCAST_SLICE_S``: gloo waits a slice at a time; NCCL's wait
    cannot time out, so its completion is polled."""
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError("weight-sync deadline passed during the broadcast")
        end = min(deadline, now + BROADCAST_SLICE_S)
        if backend == "nccl":
            while not work.is_completed() and time.monotonic() < end:
                time.sleep(NCCL_POLL_S)
            if work.is_completed():
                work.wait()
                return
        else:
            try:
                work.wait(timedelta(seconds=end - now))
                return
            except RuntimeError as e:
                if "timed out" not in str(e).lower():
                    raise  # a peer died: gloo reports the closed connection at once
        if time.monotonic() < deadline:  # at the deadline: the timeout, not a last check
            check()


@contextmanager
def watchdog(abort: Callable[[], None], deadline: float) -> Iterator[None]:
    """Calls ``abort()`` from a timer thread if the block outlives ``deadline``."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        log.warning("weight sync: a call on the group outlived the deadline; aborting it")
        try:
            abort()
        except Exception as e:  # already aborted or destroyed: the blocked call fails anyway
            log.debug("watchdog abort failed: %s", e)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if fired.is_set():
        raise TimeoutError("weight-sync deadline passed inside a call on the group "
                           "(aborted by the watchdog)")
