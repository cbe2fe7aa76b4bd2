"""Trainer side of weight synchronisation (the protocol: trainer/WEIGHT_SYNC.md).

Invariants:
- ``push`` is a collective over all trainer ranks; only rank 0 talks to the buffer and sends. At
  most one push is in flight: every push (and ``catch_up``, ``close``) first joins the background
  one.
- Every wait on the members is bounded by ``weight_sync.deadline_s`` from the start of the push
  (once the push before is joined), a re-push included; a member that misses it is dropped for
  this version and catches up at the next push.
- The survivors of a lost member get the version again, once.
- The version is announced after every push, so the buffer's admission clock follows the trainer
  (not once the trainer is stopping: its buffer may be gone).
- A member whose torch/CUDA/NCCL versions cannot share the group is left out of the plan.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from areal_like.net.dealer import Client
from areal_like.net.metrics import Metrics
from areal_like.net.peers import TRAINER_PEER
from areal_like.net.security import Keys
from areal_like.net.transport import TransportTimeout
from areal_like.settings.config import WeightSyncConfig
from areal_like.weights.lora import is_adapter
from areal_like.weights.plan import WEIGHT_PATHS, BucketSpec, WeightSyncPlan, plan_buckets
from areal_like.weights.versions import RuntimeVersions, local_versions, mismatch
from areal_like.wire.protocol import Ack, Roster, RosterEntry, RosterRequest, VersionUpdate
from trainer.engine_drive import EngineDrive
from trainer.ranks import from_rank0
from trainer.weight_buckets import PushTensors
from trainer.weight_group import GroupSender
from trainer.weight_local import DiskSender, TensorSender
from trainer.weight_members import (
    BUFFER_REQUEST_TIMEOUT_S,
    MembersLost,
    RendezvousWatch,
    merge_repush,
    rendezvous_end,
    repush_targets,
    roster,
)

log = logging.getLogger("trainer.weight_sync")

CATCH_UP_POLL_S = 0.1  # how often catch_up looks whether an evaluating server came back
CATCH_UP_PUSHES = 3  # re-pushes of the final version before catch_up gives up on a member
# weight_sync.path -> its sender
SENDERS = {"distributed": GroupSender, "tensor": TensorSender, "disk": DiskSender}
assert SENDERS.keys() == WEIGHT_PATHS.keys()  # every path a plan may name has its sender


def push_buckets(push: PushTensors, send_dtype: str, bucket_mb: float) -> list[BucketSpec]:
    """Buckets of at most ``bucket_mb``; a LoRA adapter is ONE bucket (SGLang loads it whole)."""
    adapter = bool(push.entries) and is_adapter(push.entries[0][0])
    limit = sys.maxsize if adapter else int(bucket_mb * 1024 * 1024)
    return plan_buckets([(n, shape, send_dtype) for n, shape, _ in push.entries], limit)


@dataclass
class SyncReport:
    version: int
    seconds: float = 0.0  # whole push on rank 0
    bytes: int = 0  # broadcast payload
    transfer_s: float = 0.0  # gather + broadcast of all buckets
    members: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # versions that cannot share the group
    reform: bool = False
    pause_s: dict = field(default_factory=dict)  # server_id -> seconds not generating
    error: str = ""
    blocked_s: float = 0.0  # the trainer's time inside the push call that returned this report
    overlapped: bool = False  # rank 0 finished this push in the background (``push(wait=False)``)
    repushed: list[str] = field(default_factory=list)  # survivors of a lost member, again
    plan_id: str = ""  # the last plan the buffer took for this version ("": none was published)
    loaded: dict = field(default_factory=dict)  # member in ``done`` -> the plan it loaded
    cut: bool = False  # it ran into its deadline (took 90% of it or more): WeightSyncOverDeadline


class WeightBroadcaster:
    """Pushes the model's weights to every engine in the buffer's roster. ``push`` on all ranks."""

    def __init__(self, cfg: WeightSyncConfig, *, buffer_address: str, rank: int,
                 device: torch.device, send_dtype: str = "float32", metrics: Metrics | None = None,
                 keys: Keys | None = None, adapter_path: str | None = None,
                 engine_key: str | None = None, drive: EngineDrive | None = None):
        self.cfg, self.metrics = cfg, metrics  # metrics: trainer/weight_sync_refused counted there
        if metrics is not None:  # served from the start: alert WeightSyncOverDeadline
            metrics.counter("trainer/weight_sync_near_deadline", "pushes that took 90% or more of "
                            "weight_sync.deadline_s: cut at it (the members not done dropped)")
        self.rank = rank
        self.backend = cfg.backend_on(device.type)
        self.client = Client(buffer_address, keys=keys, timeout_s=BUFFER_REQUEST_TIMEOUT_S,
                             identity=TRAINER_PEER) if rank == 0 else None  # keys None: plain
        # rank 0 runs each plan on the members' engines itself (trainer/engine_drive.py; default:
        # as embedded engines, unless the roster names another kind)
        self.drive = (drive or EngineDrive(engine_key=engine_key)) if rank == 0 else None
        # `run` resolves auto (launch/placement.py); unresolved: the adapter's path, or the group
        path = cfg.path if cfg.path != "auto" else adapter_path or "distributed"  # schema-checked
        self.sender = SENDERS[path](cfg, self.backend, rank, send_dtype)
        self.send_dtype = send_dtype
        self.engine_key = engine_key  # the job's engine API key: the group's members prove it
        self.versions = local_versions()  # what each member's versions are checked against
        self.refused: set[str] = set()  # left out of the last plan: catch_up does not wait for them
        # members whose sync failed with no engine answering after it, or ran into the deadline ->
        # (incarnation, active) then: left out until their roster entry moves (they ask for leases,
        # deliver a group or register anew), so an id with nothing behind it holds up one push
        self.stalled: dict[str, tuple[str, int]] = {}
        self.entries: dict[str, RosterEntry] = {}  # the roster of the plan being run
        self._unversioned: set[str] = set()  # members reporting no versions, warned about once
        # rank 0: member -> the last version it loaded from this process (a resumed trainer's
        # label may name other weights on a member the crashed trainer pushed it to)
        self.loaded: dict[str, int] = {}
        self._inflight: threading.Thread | None = None  # rank 0: an overlapped push still running
        # close() or the trainer's stop request: a push in flight stops waiting on the members,
        # and on the buffer's replies (it may be gone with the launcher)
        self.stopping = threading.Event()
        if self.client is not None:
            self.client.cancel = self.stopping.is_set
        self._done_report: SyncReport | None = None  # what the last overlapped push reported

    # ------------------------------------------------------------------ the collective
    def push(self, model: torch.nn.Module, version: int, *, announce: int | None = None,
             wait: bool = True) -> SyncReport:
        """Send every parameter to the roster as ``version`` and announce ``announce`` (default
        ``version``). ``wait=False`` when the sender ``overlaps``: rank 0 finishes in a background
        thread and the PREVIOUS push's report is returned, with this call's ``blocked_s``."""
        t_start = time.monotonic()
        previous = self.join()
        announce = version if announce is None else announce
        # from now: the wait for the push before is not this one's (it may have used its deadline)
        deadline = time.monotonic() + self.cfg.deadline_s
        report = SyncReport(version=version)
        params = PushTensors(model)  # LoRA: the adapter alone; a checkpoint's names
        buckets = push_buckets(params, self.send_dtype, self.cfg.bucket_mb)
        t_gather = time.monotonic()
        self.sender.stage(model, params, buckets, report)
        report.transfer_s = time.monotonic() - t_gather
        if not wait and self.sender.overlaps(buckets):  # on all ranks
            report.overlapped = True
            if self.rank == 0:
                rest = (params, buckets, report, deadline, t_start, announce, True)
                self._inflight = threading.Thread(target=self._finish, args=rest,
                                                  name="weight-sync", daemon=True)
                self._inflight.start()
            return replace(previous or SyncReport(version=version - 1),
                           blocked_s=time.monotonic() - t_start)
        self._finish(params, buckets, report, deadline, t_start, announce, False)
        report.blocked_s = report.seconds
        return report

    def join(self) -> SyncReport | None:
        """Wait for a push running in the background (rank 0); the last overlapped push's report
        (before the first: the setup push's)."""
        thread, self._inflight = self._inflight, None
        if thread is not None:
            thread.join()
        return self._done_report

    def announce(self, version: int) -> SyncReport:
        """Announce ``version`` without pushing (a lag mode), after any push in flight."""
        self.join()
        report = SyncReport(version=version)
        if self.rank == 0:
            t_start = time.monotonic()
            self._announce(version, report)
            report.seconds = report.blocked_s = time.monotonic() - t_start
        return report

    def catch_up(self, model: torch.nn.Module, version: int, timeout_s: float,
                 should_stop: Callable[[], bool] = lambda: False, final_eval: bool = False) -> int:
        """After the last step (a collective; rank 0 decides each round): re-push ``version``
        until every member serves it and none evaluates, ``timeout_s`` passed or a stop; the
        pushes made."""
        self.join()
        deadline, pushes = time.monotonic() + timeout_s, 0
        while True:
            decision = from_rank0(None if self.rank else "done" if should_stop() else
                                  self.catch_up_decision(version, deadline, pushes, final_eval))
            if decision == "done":
                return pushes
            if decision == "push":
                self.push(model, version)
                pushes += 1
            else:
                time.sleep(CATCH_UP_POLL_S)

    def catch_up_decision(self, version: int, deadline: float, pushes: int,
                          final_eval: bool = False) -> str:
        """Rank 0: "wait" (a server evaluates, or ``final_eval`` and none that evaluates yet),
        "push" (a member is behind; never one refused for its versions or left out stalled) or
        "done"."""
        self.drive.settle(deadline - time.monotonic())  # the servers told: their versions move
        try:
            reply = roster(self.client, deadline)
        except (TransportTimeout, RuntimeError):
            return "done"
        behind = sorted(m.server_id for m in reply.members if m.server_id not in self.refused
                        and self.stalled.get(m.server_id) != (m.incarnation, m.active)
                        and min(m.policy_version, self.loaded.get(m.server_id, -1)) < version)
        absent = final_eval and not reply.evaluating and not any(m.evaluates for m in reply.members)
        if time.monotonic() > deadline or pushes >= CATCH_UP_PUSHES:
            if reply.evaluating or behind or absent:
                why = "no server that evaluates registered" if absent else \
                    f"{behind or reply.evaluating} still behind"
                log.warning("final version %d: %s after %d pushes", version, why, pushes)
            return "done"
        return "wait" if reply.evaluating or absent else "push" if behind else "done"

    def announced_version(self, timeout_s: float) -> int | None:
        """The policy_version the buffer last had announced (rank 0); None if it does not answer."""
        try:
            reply = self.client.request(RosterRequest(), timeout_s=timeout_s)
        except TransportTimeout:
            return None
        return reply.policy_version if isinstance(reply, Roster) else None

    def close(self) -> None:
        self.stopping.set()
        self.join()
        self.sender.close()
        if self.drive is not None:
            self.drive.close()
        if self.client is not None:
            self.client.close()

    # ------------------------------------------------------------------ attempts
    def _finish(self, params, buckets: list[BucketSpec], report: SyncReport, deadline: float,
                t_start: float, announce: int, alone: bool) -> None:
        """Everything after the staging; ``alone``: rank 0 in the background of an overlapped push
        (every bucket is staged)."""
        self._sync(params, buckets, report, deadline, alone=alone)
        if self.rank == 0 and not self.stopping.is_set():  # a stopping trainer's buffer may be gone
            self._announce(announce, report)
        report.seconds = time.monotonic() - t_start
        # it ran into its deadline (cut there): WeightSyncOverDeadline. Not report.seconds: that
        # includes the wait for the push before, which the deadline does not
        near = report.cut = time.monotonic() >= deadline - 0.1 * self.cfg.deadline_s
        if near and self.rank == 0 and self.metrics is not None:
            self.metrics.counter("trainer/weight_sync_near_deadline").inc()
        if alone or self._done_report is None:  # not a blocking resync's: the record wants v's
            self._done_report = report

    def _sync(self, params, buckets: list[BucketSpec], report: SyncReport, deadline: float, *,
              alone: bool) -> None:
        """One attempt and, when a member was lost, one re-push to the survivors. ``alone``: rank 0
        only (an overlapped push); when the sender holds every bucket rank 0 re-sends alone."""
        try:
            lost = self._attempt(params, buckets, report, deadline, alone=alone)
            whole = self.sender.holds_all(buckets)
            targets = (repush_targets(self.client, report, lost, deadline)
                       if self.rank == 0 and not self.stopping.is_set() else [])
            if not (alone or whole):
                targets = from_rank0(targets)
            if not targets:
                return
            if self.rank == 0:
                log.warning("weight sync v%d: lost %s; pushing it again to %s", report.version,
                            sorted(set(report.members) - set(targets) - set(report.done)), targets)
            again = SyncReport(version=report.version)
            self.sender.rewind(params, buckets, again)
            self._attempt(params, buckets, again, deadline, alone=alone or whole, only=targets)
            if self.rank == 0:
                merge_repush(report, again)
        finally:
            self.sender.done()  # what the members loaded from is let go only now
            self.loaded.update(dict.fromkeys(report.done, report.version))

    def _attempt(self, params, buckets: list[BucketSpec], report: SyncReport, deadline: float, *,
                 alone: bool, only: list[str] | None = None) -> set[str]:
        """One plan: set up, transfer, the members' reports; the members lost (at the rendezvous,
        or, driven from here, whose engine stopped answering)."""
        lost: set[str] = set()
        send = self.rank == 0 and self._setup(buckets, report, deadline, only, lost)
        if not alone:
            send = from_rank0(send)
        if send:
            self.sender.send(params, buckets, report, deadline,
                             lambda: self._raise_if_failed(report.version))
        else:  # nobody to send to, or the setup failed
            self.sender.skip()
            report.bytes = 0
        # the members' reports, also after a failed rendezvous (the survivors' before a re-push)
        if self.rank == 0 and report.plan_id:
            self.drive.collect(report, deadline, self.stopping.is_set)
            lost.update(self.drive.lost())
            for sid in self.drive.stalled() & set(self.entries):
                self.stalled[sid] = (self.entries[sid].incarnation, self.entries[sid].active)
            if report.dropped and not self.stopping.is_set():
                log.warning("weight sync v%d: dropped %s (lost, missed the %gs deadline or "
                            "failed)", report.version, report.dropped, self.cfg.deadline_s)
                self.sender.forget_members()  # re-form without them next time
        return lost

    def _setup(self, buckets: list[BucketSpec], report: SyncReport, deadline: float,
               only: list[str] | None, lost: set[str]) -> bool:
        """Rank 0: roster (``only`` these members, for a re-push), plan, publish, connect. Returns
        whether to send; a failure drops this attempt (members lost at the rendezvous: ``lost``).
        A stopping trainer sends nothing more (its buffer may be gone with the launcher)."""
        if self.stopping.is_set():
            return False
        try:
            entries = roster(self.client, deadline).members
            self.entries = {e.server_id: e for e in entries}
            admitted = self._admit(entries, report)
            admitted = admitted if only is None else [a for a in admitted if a[0] in only]
            report.members = [a[0] for a in admitted]
            if not admitted:
                return False
            route = self.sender.route(report.version, admitted)  # disk: writes the directory
            plan = WeightSyncPlan(
                policy_version=report.version, backend=self.backend, buckets=buckets,
                plan_id=uuid.uuid4().hex[:12],
                # the members wait no longer than the trainer does (a re-push gets what is left),
                # counted after the payloads were made
                deadline_s=max(0.5, min(self.cfg.deadline_s, deadline - time.monotonic())),
                **route)
            report.reform = plan.reform
            self.drive.start(plan, entries)
            report.plan_id = plan.plan_id  # started: its members answer it
            watch = RendezvousWatch(self.client, report.members, deadline,
                                    rendezvous_end(deadline), failed=self.drive.failed)
            self.sender.connect(plan, admitted, watch, self.engine_key)
            return True
        except Exception as e:  # rendezvous timeout, member lost, plan refused, buffer gone, disk
            report.error = f"{type(e).__name__}: {e}"
            log.warning("weight sync v%d: setup failed: %s", report.version, report.error)
            if isinstance(e, MembersLost):
                lost.update(e.lost)
            report.dropped = list(report.members)  # nobody got this version from this plan
            return False

    def _admit(self, entries: list[RosterEntry], report: SyncReport) -> list[tuple[str, int, str]]:
        """The members whose versions may share the group, as (id, engine ranks, incarnation); the
        others are refused this version."""
        admitted = []
        for m in entries:
            if self.stalled.get(m.server_id) == (m.incarnation, m.active):
                log.info("weight sync v%d: server %s left out: its engine did not answer after its "
                         "last sync and it showed no life since", report.version, m.server_id)
                continue
            self.stalled.pop(m.server_id, None)
            peer = RuntimeVersions(m.torch_version, m.cuda_version, m.nccl_version)
            if why := mismatch(self.versions, peer, self.backend):
                report.refused.append(m.server_id)
                log.error("weight sync v%d: server %s left out: %s", report.version, m.server_id,
                          why)
                if self.metrics is not None:
                    self.metrics.counter("trainer/weight_sync_refused",
                                         "members refused for their versions").inc()
                continue
            if not peer.known() and m.server_id not in self._unversioned:
                self._unversioned.add(m.server_id)
                log.warning("server %s reports no torch/CUDA/NCCL versions (an older rollout "
                            "server): accepted unchecked; the trainer has %s", m.server_id,
                            self.versions)
            admitted.append((m.server_id, m.engine_ranks, m.incarnation))
        self.refused = set(report.refused)
        return sorted(admitted)

    def _raise_if_failed(self, version: int) -> None:
        failed = self.drive.failed()
        if failed:
            raise RuntimeError(f"member(s) {failed} failed during the broadcast of v{version}")

    def _announce(self, version: int, report: SyncReport) -> None:
        try:
            ack = self._version_update(version)
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
