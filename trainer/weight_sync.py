"""Trainer side of weight synchronisation (areal_like/DESIGN.md section 4; the protocol: WEIGHT_SYNC.md).

Owns: the weight-update process group on trainer rank 0 (``WeightBroadcaster``), the broadcast
of every bucket (planned and packed by ``trainer.weight_buckets``: one flattened uint8 broadcast
per bucket, the next bucket packed while the previous one is on the wire), the wait for the
members' ``SyncDone`` reports (the buffer's ``SyncStatus``; ``trainer.weight_members``, which
also runs each push's attempts and its re-push to the survivors of a lost member) and the
``VersionUpdate`` announcement; for a model that fits in the two staging buffers, ``push(wait=False)`` does all
of that after the packing in a background thread on rank 0 (the trainer trains the next step
meanwhile). The engines' HTTP side (pause, receive, continue) is driven by each rollout server.

Invariants:
- ``push`` is a collective over all trainer ranks: gathering a full tensor from FSDP shards
  (``full_tensor()``) is an all-gather, so every rank walks the same buckets in the same order;
  only rank 0 broadcasts on the weight group. At most one push is in flight: every push (and
  ``catch_up``, ``close``) first joins the background one; the background thread reads only
  the staging buffers (packed copies), never the parameters the optimizer is updating, and it
  is the only user of the buffer client while it runs.
- Every wait is bounded by ``weight_sync.deadline_s`` measured from the start of the push: the
  rendezvous, each bucket's broadcast, the status poll, and a re-push. A member that misses it is
  dropped for this version; the next plan re-forms the group (``reform=True``) with whoever is in
  the roster then, and every push is a full push, so a dropped engine catches up on its next sync.
- One lost member (it left the roster, or failed before the group formed) costs the others
  nothing but the time to notice it: the rendezvous gives up as soon as the buffer shows it, and
  the members that survived without the version get it again, once, from a group re-formed for
  them alone within the same deadline (``trainer.weight_members``).
- After any failure on the group (a peer died mid-broadcast, rendezvous timeout) the group is
  torn down and re-formed on the next push; a broken group is never reused.
- Each formed group has a name of its own, ``weight_sync.group_name`` plus a random token, that only
  the plan carries: the rendezvous store's keys live under it, so only the plan's members can join
  (rank 0 hosts the store on ``master_addr`` only; areal_like/distributed.py).
- The version is announced to the buffer after every push, with or without members, so the
  buffer's admission clock always follows the trainer.
- A member whose torch/CUDA/NCCL cannot share the group with rank 0's (``areal_like.versions``) is
  left out of the plan, logged and counted; one reporting no versions (an older server) is accepted.
- ``weight_sync.path`` tensor or disk (trainer and engine on one GPU) never forms a group: ``push``
  hands over to ``trainer.weight_local.push_local``; ``auto`` left unresolved (no ``areal-like run``)
  is the group path.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from areal_like.config import WeightSyncConfig
from areal_like.dealer import Client
from areal_like.distributed import destroy_weight_group, free_port, init_weight_group
from areal_like.lora import synced_parameters
from areal_like.metrics import Metrics
from areal_like.peers import TRAINER_PEER
from areal_like.protocol import (
    Ack,
    BucketSpec,
    Roster,
    RosterEntry,
    RosterRequest,
    SyncMember,
    VersionUpdate,
    WeightSyncPlan,
)
from areal_like.security import Keys
from areal_like.transport import TransportTimeout
from areal_like.versions import RuntimeVersions, local_versions, mismatch
from trainer.weight_buckets import BucketPipeline, plan_buckets
from trainer.weight_catch_up import catch_up
from trainer.weight_guard import BUFFER_REQUEST_TIMEOUT_S, Watchdog, wait_work
from trainer.weight_guard import bounded as _bounded
from trainer.weight_local import LocalSender, push_local
from trainer.weight_members import (
    ROSTER_POLL_S,
    RendezvousWatch,
    await_members,
    failed_members,
    rendezvous_end,
    sync,
)

log = logging.getLogger("trainer.weight_sync")

GROUP_TOKEN_BYTES = 16  # random bytes in each weight group's name, the key space of its rendezvous store


@dataclass
class SyncReport:
    version: int
    seconds: float = 0.0  # whole push on rank 0
    bytes: int = 0  # broadcast payload
    transfer_s: float = 0.0  # gather + broadcast of all buckets
    members: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # left out: versions that cannot share the group
    reform: bool = False
    pause_s: dict = field(default_factory=dict)  # server_id -> seconds not generating (when reported)
    error: str = ""
    blocked_s: float = 0.0  # the trainer's time inside the push call that returned this report
    overlapped: bool = False  # rank 0 finished this push in the background (``push(wait=False)``)
    repushed: list[str] = field(default_factory=list)  # survivors of a lost member, pushed this version again
    plan_id: str = ""  # the last plan the buffer took for this version ("": none was published)


class WeightBroadcaster:
    """Pushes the model's weights to every engine in the buffer's roster. ``push`` on all ranks."""

    def __init__(self, cfg: WeightSyncConfig, *, buffer_address: str, rank: int, device: torch.device,
                 send_dtype: str = "float32", metrics: Metrics | None = None,
                 keys: Keys | None = None):
        self.cfg, self.metrics = cfg, metrics  # metrics: trainer/weight_sync_refused is counted there
        self.rank = rank
        self.device = device
        self.send_dtype = send_dtype
        self.backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        self.client = Client(buffer_address, keys=keys, timeout_s=BUFFER_REQUEST_TIMEOUT_S,
                             identity=TRAINER_PEER) if rank == 0 else None  # keys None: plain
        self._pg = None
        self._group_key: tuple | None = None  # ((server_id, engine_ranks), ...) of the formed group
        self._port = 0
        self._group_name = cfg.group_name  # + a fresh token at each group formation (_make_plan)
        self._pipeline = BucketPipeline()  # its staging buffers are reused by every push
        self.versions = local_versions()  # what each member's versions are checked against
        self.refused: set[str] = set()  # left out of the last plan: catch_up does not wait for them
        self._unversioned: set[str] = set()  # members reporting no versions, warned about once
        self.path = cfg.path if cfg.path != "auto" else "distributed"  # `run` resolves auto (launch/placement.py)
        self._local = LocalSender(self.path) if self.path != "distributed" and rank == 0 else None
        self._watchdog = Watchdog(self._abort)  # NCCL: bounds a launch that blocks (communicator init)
        self._deadline = 0.0  # the running push's, for the watchdog
        self._inflight: threading.Thread | None = None  # rank 0: an overlapped push still running
        self._done_report: SyncReport | None = None  # what the last overlapped push reported

    # ------------------------------------------------------------------ rank 0 phases
    def announced_version(self, timeout_s: float) -> int | None:
        """The policy_version the buffer last had announced (rank 0); None if it does not answer."""
        try:
            reply = self.client.request(RosterRequest(), timeout_s=timeout_s)
        except TransportTimeout:
            return None
        return reply.policy_version if isinstance(reply, Roster) else None

    def _roster(self, deadline: float | None = None) -> list[RosterEntry]:
        reply = self.client.request(RosterRequest(), timeout_s=_bounded(deadline))
        if not isinstance(reply, Roster):
            raise RuntimeError(f"buffer answered RosterRequest with {reply.TYPE}")
        return reply.members

    def _admit(self, entries: list[RosterEntry], report: SyncReport) -> list[tuple[str, int]]:
        """The members whose versions may share the group; the others are refused for this version."""
        admitted = []
        for m in entries:
            peer = RuntimeVersions(m.torch_version, m.cuda_version, m.nccl_version)
            if why := mismatch(self.versions, peer, self.backend):
                report.refused.append(m.server_id)
                log.error("weight sync v%d: server %s left out: %s", report.version, m.server_id, why)
                if self.metrics is not None:
                    self.metrics.counter("trainer/weight_sync_refused", "members refused for their versions").inc()
                continue
            if not peer.known() and m.server_id not in self._unversioned:
                self._unversioned.add(m.server_id)
                log.warning("server %s reports no torch/CUDA/NCCL versions (an older rollout server): accepted "
                            "unchecked; the trainer has %s", m.server_id, self.versions)
            admitted.append((m.server_id, m.engine_ranks))
        self.refused = set(report.refused)
        return sorted(admitted)

    def _make_plan(self, version: int, roster: list[tuple[str, int]], buckets: list[BucketSpec],
                   deadline: float) -> WeightSyncPlan:
        key = tuple(roster)
        reform = self._pg is None or key != self._group_key
        if reform:
            self._port = self.cfg.master_port or free_port(self.cfg.master_addr)
            # the group's store keys live under this name: unguessable, it reaches only the plan's members
            # (the plan travels over the authenticated buffer channel; areal_like/distributed.py)
            self._group_name = f"{self.cfg.group_name}-{secrets.token_hex(GROUP_TOKEN_BYTES)}"
        members, offset = [], 1  # trainer rank 0 is group rank 0
        for server_id, ranks in roster:
            members.append(SyncMember(server_id=server_id, rank_offset=offset))
            offset += ranks
        return WeightSyncPlan(policy_version=version, group_name=self._group_name, master_addr=self.cfg.master_addr,
                              master_port=self._port, world_size=offset, backend=self.backend, reform=reform,
                              members=members, buckets=buckets, plan_id=uuid.uuid4().hex[:12],
                              # the members wait no longer than the trainer does (a re-push gets what is left)
                              deadline_s=max(0.5, min(self.cfg.deadline_s, deadline - time.monotonic())))

    def _form_group(self, plan: WeightSyncPlan, key: tuple, deadline: float) -> None:
        self._teardown()
        # The rendezvous and the connection of the ranks get what is left of this sync's deadline;
        # every later op of the group (the pg keeps its timeout) gets a whole sync's budget.
        # A member lost meanwhile (left the roster, reported failure) ends the rendezvous at once.
        # It gives up a margin before the deadline: the members learn it and report meanwhile.
        give_up = rendezvous_end(deadline)
        members = [m.server_id for m in plan.members]
        watch = RendezvousWatch(self.client, plan.policy_version, members, deadline, give_up)
        self._pg = init_weight_group(plan.backend, plan.master_addr, plan.master_port, plan.world_size, 0,
                                     plan.group_name, timeout_s=self.cfg.deadline_s,
                                     connect_timeout_s=max(0.5, give_up - time.monotonic()),
                                     check=watch, check_every_s=ROSTER_POLL_S)
        self._group_key = key

    def _abort(self) -> None:
        """Abort the group's communicator (NCCL: unblocks a call stuck on a dead peer; any thread)."""
        pg = self._pg
        if pg is not None and self.backend == "nccl" and hasattr(pg, "abort"):
            pg.abort()

    def _teardown(self) -> None:
        if self._pg is not None:
            try:  # a communicator with a hung op would block a plain destroy
                self._abort()
            except Exception as e:  # already broken or aborted: destroy below still cleans up
                log.debug("abort of the weight group failed: %s", e)
            destroy_weight_group(self._pg)
        self._pg, self._group_key = None, None

    def _prepare(self, version: int, buckets: list[BucketSpec], report: SyncReport, deadline: float,
                 only: list[str] | None = None) -> bool:
        """Rank 0: roster (``only`` these members, for a re-push), plan, publish, (re)form. Returns
        whether tensors should be broadcast."""
        roster = self._admit(self._roster(deadline), report)
        roster = roster if only is None else [(s, r) for s, r in roster if s in only]
        report.members = [s for s, _ in roster]
        if not roster:
            self._teardown()
            return False
        plan = self._make_plan(version, roster, buckets, deadline)
        report.reform = plan.reform
        ack = self.client.request(plan, timeout_s=_bounded(deadline))
        if not (isinstance(ack, Ack) and ack.status in ("ok", "accepted")):
            raise RuntimeError(f"buffer refused the plan for version {version}: {ack}")
        report.plan_id = plan.plan_id  # published: its members answer it (weight_members._attempt)
        if plan.reform:
            self._form_group(plan, tuple(roster), deadline)
        return True

    def _raise_if_failed(self, version: int) -> None:
        failed = failed_members(self.client, version)
        if failed:
            raise RuntimeError(f"member(s) {failed} failed during the broadcast")

    def _await_members(self, version: int, report: SyncReport, deadline: float) -> None:
        await_members(self.client, version, report, deadline)

    # ------------------------------------------------------------------ the collective
    def push(self, model: torch.nn.Module, version: int, *, announce: int | None = None,
             wait: bool = True) -> SyncReport:
        """Broadcast every parameter to the roster as ``version`` and announce ``announce`` (default:
        ``version``; larger when the engines lag by design, trainer/engine_lag.py). Call on all ranks.

        ``wait=False`` on a model that fits in the staging buffers (at most ``BucketPipeline.SLOTS``
        buckets): once every bucket is gathered and packed, rank 0 hands the rest (plan, broadcast,
        members' reports, announcement) to a background thread and returns; the next call (or
        ``join``) waits for it. The report returned is then the one of the PREVIOUS push,
        complete, with this call's ``blocked_s``."""
        t_start = time.monotonic()
        previous = self.join()
        announce = version if announce is None else announce
        if self.path != "distributed":  # trainer and engine share a device: no group (trainer/weight_local.py)
            return push_local(self, model, version, SyncReport(version=version), announce)
        deadline = t_start + self.cfg.deadline_s
        report = SyncReport(version=version)
        params = synced_parameters(model)  # LoRA: the adapter alone
        buckets = plan_buckets([(n, list(p.shape), self.send_dtype) for n, p in params],
                               int(self.cfg.bucket_mb * 1024 * 1024))
        t_gather = time.monotonic()
        self._stage_first(params, buckets, report)
        report.transfer_s = time.monotonic() - t_gather
        if not wait and len(buckets) <= BucketPipeline.SLOTS:  # every rank decides alike: nothing left to gather
            report.overlapped = True
            if self.rank == 0:
                self._inflight = threading.Thread(target=self._rank0_rest, name="weight-sync", daemon=True,
                                                  args=(report, buckets, params, deadline, t_start, announce))
                self._inflight.start()
            return replace(previous or SyncReport(version=version - 1), blocked_s=time.monotonic() - t_start)
        sync(self, params, buckets, report, deadline, alone=False)
        if self.rank == 0:
            self._announce(announce, report)
        report.seconds = report.blocked_s = time.monotonic() - t_start
        self._done_report = report
        return report

    def join(self) -> SyncReport | None:
        """Wait for a push running in the background (rank 0); the last finished push's report."""
        thread, self._inflight = self._inflight, None
        if thread is not None:
            thread.join()
        return self._done_report

    def announce(self, version: int) -> SyncReport:
        """Announce ``version`` to the buffer without pushing (the engines keep their weights: a lag
        mode, trainer/engine_lag.py), after any push still in flight. Call on all ranks; only rank 0 talks."""
        self.join()
        report = SyncReport(version=version)
        if self.rank == 0:
            t_start = time.monotonic()
            self._announce(version, report)
            report.seconds = report.blocked_s = time.monotonic() - t_start
        return report

    def _rank0_rest(self, report: SyncReport, buckets: list[BucketSpec], params, deadline: float,
                    t_start: float, announce: int) -> None:
        """Rank 0, background thread of an overlapped push: everything after the packing."""
        sync(self, params, buckets, report, deadline, alone=True)  # only launches: every bucket is staged
        self._announce(announce, report)
        report.seconds = time.monotonic() - t_start
        self._done_report = report

    def _stage_first(self, params, buckets: list[BucketSpec], report: SyncReport) -> None:
        """The first buckets (one per staging buffer) are gathered (all ranks) and packed (rank 0)
        before the plan goes out: that work is then outside the engines' pause window, which
        starts only when they receive the plan."""
        for b in buckets[:BucketPipeline.SLOTS]:
            tensors = self._gather(params, b)
            if self.rank == 0:
                report.bytes += self._pipeline.stage(tensors)

    def catch_up(self, model: torch.nn.Module, version: int, timeout_s: float,
                 should_stop: Callable[[], bool] = lambda: False, final_eval: bool = False) -> int:
        """After the last step (a collective): re-push ``version`` to members that missed it
        (``trainer.weight_catch_up``); returns the pushes made."""
        self.join()
        return catch_up(self, model, version, timeout_s, should_stop, final_eval)

    def _transfer(self, params: list[tuple[str, torch.nn.Parameter]], buckets: list[BucketSpec],
                  report: SyncReport, deadline: float) -> None:
        """Broadcast the staged buckets, then gather (all ranks) and broadcast (rank 0) the others, each
        as one flattened buffer; bucket i+2 is gathered and packed while bucket i+1 is on the wire."""
        healthy = self.rank == 0 and self._pg is not None
        self._pipeline.wait = lambda work: wait_work(work, deadline, self.backend,
                                                     lambda: self._raise_if_failed(report.version))
        self._deadline = deadline  # the watchdog's, for every step on the group
        t0 = time.monotonic()
        while healthy and self._pipeline.staged:
            healthy = self._guarded(report, lambda: self._pipeline.launch(self._pg))
        for b in buckets[BucketPipeline.SLOTS:]:
            # full_tensor() is an all-gather over the trainer ranks: every rank runs it, even after a failure.
            tensors = self._gather(params, b)
            if healthy:
                healthy = self._guarded(report, lambda: self._pipeline.send(tensors, self._pg))
        if healthy:
            self._guarded(report, self._pipeline.finish)
        self._pipeline.abandon()  # rank > 0, or after a failure: nothing may stay staged for the next push
        report.transfer_s += time.monotonic() - t0

    def _gather(self, params: list[tuple[str, torch.nn.Parameter]], b: BucketSpec) -> list[torch.Tensor]:
        by_name = dict(params)
        dtype = getattr(torch, self.send_dtype)
        return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to(dtype)
                for p in (by_name[n] for n in b.names)]

    def _guarded(self, report: SyncReport, step) -> bool:
        """Run one broadcast step; on failure (a member died or stalled) the group is unusable: tear it down."""
        try:
            if self.backend == "nccl":  # a launch may block (communicator init): abort it at the deadline
                with self._watchdog.armed(self._deadline):
                    report.bytes += step() or 0
            else:
                report.bytes += step() or 0
            return True
        except Exception as e:
            self._pipeline.abandon()
            report.error = f"{type(e).__name__}: {e}"
            log.warning("weight sync v%d: broadcast failed: %s", report.version, report.error)
            self._teardown()
            return False

    def _announce(self, version: int, report: SyncReport) -> None:
        try:
            ack = self._version_update(version)
            if ack.status == "rejected" and ack.reason.startswith("version_jump"):
                # The buffer restarted before our last announcements were durable: walk it up one
                # version at a time (it refuses jumps; every label in between was ours).
                log.warning("buffer is at version %s, behind our %d: announcing the versions in between",
                            ack.ref, version)
                for v in range(int(ack.ref) + 1, version + 1):
                    ack = self._version_update(v)
            if ack.status != "ok":
                raise RuntimeError(f"buffer refused VersionUpdate({version}): {ack.reason}")
        except Exception as e:
            report.error = report.error or f"announce failed: {type(e).__name__}: {e}"
            log.error("could not announce version %d to the buffer: %s", version, e)

    def _version_update(self, version: int) -> Ack:
        ack = self.client.request(VersionUpdate(policy_version=version),
                                  timeout_s=min(BUFFER_REQUEST_TIMEOUT_S, self.cfg.deadline_s))
        if not isinstance(ack, Ack):
            raise RuntimeError(f"buffer answered VersionUpdate with {ack.TYPE}")
        return ack

    def close(self) -> None:
        self.join()
        self._teardown()
        if self._local is not None:
            self._local.close()
        self._pipeline.release()
        if self.client is not None:
            self.client.close()

