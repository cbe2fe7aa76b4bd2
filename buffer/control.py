"""The control plane: trainer version, roster of rollout servers, weight-sync plan and results.

Only ``version`` is durable (the service logs it). The roster is soft state rebuilt from heartbeats
within a second of a restart; a plan is the trainer's to re-send. A server that is evaluating (its
engine holds one version) stays out of weight syncs until done. Handlers return the reply.

Processes: the buffer remembers the ``Register.incarnation`` of each id's last Register, also past
its expiry (the ``INCARNATIONS_KEEP`` latest ids off the roster). A Register comes from a *new
process* when its incarnation differs from the remembered one or, when either is unknown ("", or
none remembered, as after the buffer's own restart), when it says ``fresh``. A new process holds
none of its id's leases (they are re-issued at once: buffer/expiry.py), counts as failed for a
pending plan naming its id, and shows life (below). The same process again (a retried Register,
a re-registration after an expiry or after the buffer's restart) changes none of these: a retry
keeps its leases and its part in the plan; after an expiry it gets back neither.

A plan is for the processes on the roster when it was published, and is handed out
(``HeartbeatAck.pending_plan``, the only way a rollout server takes one up; a published plan is
a hint that sends a heartbeat: rollout_server/server.py) to members on the roster that have not
failed it. A member has failed a pending plan naming it, recorded at once
(``SyncStatus.failed``), when it registers as a new process, when a plan names it while it is off
the roster after an expiry (the trainer read the roster before), or when it leaves the roster
(expired) before it was handed the plan and before it reported. The trainer counts a member that
left the roster as lost before the group formed (trainer/weight_members.py); the record makes
that exact also when the process is back before the trainer looked, and the same process
registering again is never handed a plan the trainer gave up on or formed without it: it joins
the next plan, formed from the roster it is back on. A member expired *after* it was handed the
plan is not failed by the expiry: its engine may still be receiving, and a failure record would
abort the broadcast under way for every member (trainer/weight_sync.py checks
``SyncStatus.failed`` between buckets); if it is dead the broadcast fails on its own. A report
it sends (it took the plan up before it fell silent) counts either way. The results of a version
(``SyncStatus``) are those of its latest plan: a new plan of a version (a re-push, or a resumed
trainer's push under a label the crashed one had pushed other weights under) starts with none, and
an answer naming an earlier plan (``SyncDone.plan_id``) is not counted; after the buffer's restart,
the first answer of a version names the plan its results are (the trainer re-sends its plan).

A member *absent* from a sync stays out of the later ones until it shows life: when the
trainer announces a version at or past the plan's (it is done with the plan), every member of
the plan that sent no ``SyncDone`` for it (it never joined, or never acked) leaves
``Roster.members`` for ``Roster.absent``, so the next plans neither name it nor wait for it; an id
that only heartbeats (no engine behind it) would otherwise hold every sync up to its deadline. It
comes back when it reports a sync (any ``SyncDone``: a real server answers every plan it gets, a
late answer included), delivers a group, or registers as a new process (above); then
the next plan re-forms the group with it and, every push being a full push, it catches up in one
sync. A re-registration of the same process, or an expiry, does not clear it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from areal_like.net.ratelog import RateLimitedLog
from areal_like.wire import protocol as P
from areal_like.wire.codec import field_names

SYNC_RESULTS_KEEP = 8  # versions of SyncDone results kept for SyncStatusRequest
ABSENT_KEEP = 4096  # absent server ids remembered (kept past expiry: silence is no sign of life)
INCARNATIONS_KEEP = 4096  # ids off the roster whose last incarnation is kept (module docstring)
ABSENT_LOG_EVERY_S = 60.0  # a line about absent members at most this often (a key makes many ids)


@dataclass(slots=True)
class Member:
    entry: P.RosterEntry
    last_seen: float
    in_flight: int = 0
    evaluating: bool = False  # out of weight syncs while its engine holds one version for an evaluation


class ControlPlane:
    def __init__(self, pub_address: str, heartbeat_timeout_s: float, clock: Callable[[], float],
                 publish: Callable[[P.Message], None], log: logging.Logger):
        self.pub_address, self.heartbeat_timeout_s = pub_address, heartbeat_timeout_s
        self.clock, self.publish, self.log = clock, publish, log
        self.version = 0
        self.roster: dict[str, Member] = {}
        self.plan: P.WeightSyncPlan | None = None
        self.plan_deadline = 0.0
        self.handed: set[str] = set()  # ids handed ``plan`` in a HeartbeatAck (module docstring)
        self.sync_results: dict[int, dict[str, bool]] = {}  # version -> server -> loaded
        self.result_plans: dict[int, str] = {}  # version -> the plan whose results those are
        self.sync_pauses: dict[int, dict[str, float]] = {}  # version -> server -> seconds not generating
        self.absent: dict[str, int] = {}  # server id -> the version it missed (module docstring)
        self.incarnations: dict[str, str] = {}  # id -> that of its last Register
        # ids off the roster after an expiry, oldest first: INCARNATIONS_KEEP of them keep theirs
        self.departed: OrderedDict[str, None] = OrderedDict()
        self._settled = ""  # plan_id of the last plan whose absent members were taken out
        self._absent_log = RateLimitedLog(log, ABSENT_LOG_EVERY_S)

    def newest_version(self) -> int:
        """The newest version any engine may serve: the trainer's, or that of a sync in progress."""
        return max(self.version, self.plan.policy_version if self.plan else 0)

    def touch(self, server_id: str, engine_version: int | None = None) -> Member | None:
        member = self.roster.get(server_id)
        if member is not None:
            member.last_seen = self.clock()
            if engine_version is not None:
                member.entry = msgspec.structs.replace(member.entry, policy_version=engine_version)
        return member

    def expire(self) -> list[str]:
        """Remove the servers silent for longer than the heartbeat timeout; returns their ids."""
        now = self.clock()
        gone = [s for s, m in self.roster.items() if now - m.last_seen > self.heartbeat_timeout_s]
        for sid in gone:
            silent = now - self.roster.pop(sid).last_seen
            self.log.warning("server %s silent for %.0fs: removed from the roster", sid, silent)
            if (plan := self._pending_plan(sid)) is not None and sid not in self.handed:
                self._failed(sid, plan, "left the roster")
            self.departed[sid] = None
        while len(self.departed) > INCARNATIONS_KEEP:
            del self.incarnations[self.departed.popitem(last=False)[0]]
        return gone

    def new_process(self, m: P.Register) -> bool:
        """Whether ``m`` comes from another process than the last Register under its id (module
        docstring); decided before ``register`` remembers ``m``'s incarnation."""
        known = self.incarnations.get(m.server_id)
        if known and m.incarnation:
            return known != m.incarnation
        return m.fresh

    def register(self, m: P.Register) -> P.RegisterAck:
        new = self.new_process(m)
        if new:
            self.alive(m.server_id, "registered as a new process")
        entry = P.RosterEntry(**{k: getattr(m, k) for k in field_names(P.RosterEntry)})  # Register has them all
        if m.server_id not in self.roster:
            self.log.info("server %s registered (engine %s, version %d, torch %r, CUDA %r, NCCL %r)", m.server_id,
                          m.engine_url, m.policy_version, m.torch_version, m.cuda_version, m.nccl_version)
        if new and (plan := self._pending_plan(m.server_id)) is not None:
            self._failed(m.server_id, plan, "restarted")
        self.roster[m.server_id] = Member(entry, self.clock())
        self.incarnations[m.server_id] = m.incarnation
        self.departed.pop(m.server_id, None)
        return P.RegisterAck(server_id=m.server_id, policy_version=self.version, pub_address=self.pub_address)

    def heartbeat(self, m: P.Heartbeat) -> P.HeartbeatAck:
        member = self.touch(m.server_id, m.policy_version)
        if member is None:
            return P.HeartbeatAck(policy_version=self.version, known=False)
        member.in_flight = m.in_flight
        if member.evaluating != m.evaluating:
            self.log.info("server %s %s", m.server_id, "evaluating: out of weight syncs" if m.evaluating
                          else "done evaluating: back in weight syncs")
            member.evaluating = m.evaluating
        if (plan := self._pending_plan(m.server_id)) is not None:
            self.handed.add(m.server_id)
        return P.HeartbeatAck(policy_version=self.version, known=True, pending_plan=plan)

    def roster_reply(self, _m: P.RosterRequest) -> P.Roster:
        """Weight-sync members: every live server but those evaluating or absent."""
        return P.Roster(members=[m.entry for s, m in self.roster.items()
                                 if not m.evaluating and s not in self.absent],
                        policy_version=self.version,
                        evaluating=sorted(s for s, m in self.roster.items() if m.evaluating),
                        absent=sorted(s for s in self.roster if s in self.absent))

    def settle_plan(self, announced: int) -> None:
        """The trainer announced ``announced``: once it is at or past the plan's version, the plan's
        members still on the roster that never reported it are absent (module docstring)."""
        plan = self.plan
        if plan is None or plan.plan_id == self._settled or announced < plan.policy_version:
            return
        self._settled = plan.plan_id
        reported = self.sync_results.get(plan.policy_version, {})
        for m in plan.members:
            sid = m.server_id
            if sid in self.roster and sid not in reported and sid not in self.absent:
                self.absent[sid] = plan.policy_version
                self._absent_log.warning(
                    "absent", "server %s never reported weight sync v%d: left out of weight syncs "
                    "until it reports one, delivers a group or registers anew", sid[:64],
                    plan.policy_version)
        for sid in list(self.absent)[:-ABSENT_KEEP]:
            del self.absent[sid]

    def alive(self, server_id: str, how: str) -> None:
        """``server_id`` showed life (``how``): back in the weight syncs if it was absent."""
        if self.absent.pop(server_id, None) is not None:
            self._absent_log.log(logging.INFO, "back", "server %s %s: back in weight syncs",
                                 server_id[:64], how)

    def take_plan(self, plan: P.WeightSyncPlan) -> P.Ack:
        if self.result_plans.get(plan.policy_version) != plan.plan_id:  # results are one plan's
            self.sync_results.pop(plan.policy_version, None)  # a re-push: every member loads it again
            self.sync_pauses.pop(plan.policy_version, None)
            self.result_plans[plan.policy_version] = plan.plan_id
        self.plan, self.plan_deadline = plan, self.clock() + plan.deadline_s
        self.handed = set()
        results = self.sync_results.setdefault(plan.policy_version, {})
        for m in plan.members:  # off the roster after an expiry: the trainer read it before
            if m.server_id in self.departed and m.server_id not in results:
                self._failed(m.server_id, plan, "is off the roster")
        for version in sorted(self.sync_results)[:-SYNC_RESULTS_KEEP]:
            del self.sync_results[version]
            self.sync_pauses.pop(version, None)
            self.result_plans.pop(version, None)
        self.publish(plan)
        return P.Ack(ref=str(plan.policy_version), status="ok")

    def _failed(self, server_id: str, plan: P.WeightSyncPlan, how: str) -> None:
        """``server_id``, a member of ``plan`` that has not reported it, registered as a new
        process, left the roster before it was handed the plan, or is named while off it (``how``):
        the plan is not for the process behind the id now (module docstring). Its failure for the
        plan's version is recorded now: the plan is never handed to it (a late join would find the
        trainer gone and block the engine's scheduler), and the trainer stops waiting for it at
        once. It gets the weights at the next push, which re-forms the group with it (the failed
        one is torn down)."""
        self.sync_results.setdefault(plan.policy_version, {})[server_id] = False
        self.log.warning("server %s %s during weight sync v%d: left out of it (it joins the next "
                         "one)", server_id[:64], how, plan.policy_version)

    def _pending_plan(self, server_id: str) -> P.WeightSyncPlan | None:
        plan = self.plan
        if plan is None or self.clock() > self.plan_deadline:
            return None
        if server_id in self.sync_results.get(plan.policy_version, {}):
            return None
        return plan if any(m.server_id == server_id for m in plan.members) else None

    def sync_done(self, m: P.SyncDone) -> P.Ack:
        self.alive(m.server_id, f"reported weight sync v{m.policy_version}")
        if m.plan_id and m.plan_id != self.result_plans.setdefault(m.policy_version, m.plan_id):
            self.log.info("server %s answered an earlier plan of weight sync v%d: not a result of "
                          "the current one", m.server_id[:64], m.policy_version)
            return P.Ack(ref=str(m.policy_version), status="ok")
        self.sync_results.setdefault(m.policy_version, {})[m.server_id] = m.ok
        self.sync_pauses.setdefault(m.policy_version, {})[m.server_id] = m.pause_s
        if m.ok:
            self.touch(m.server_id, m.policy_version)
        else:
            self.log.warning("server %s failed to load version %d: %s", m.server_id, m.policy_version, m.reason)
        return P.Ack(ref=str(m.policy_version), status="ok")

    def sync_status(self, m: P.SyncStatusRequest) -> P.SyncStatus:
        results = self.sync_results.get(m.policy_version, {})
        return P.SyncStatus(policy_version=m.policy_version, done=sorted(s for s, ok in results.items() if ok),
                            failed=sorted(s for s, ok in results.items() if not ok),
                            pause_s=dict(self.sync_pauses.get(m.policy_version, {})))
