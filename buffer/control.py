"""The control plane: trainer version, roster of rollout servers, weight-sync plan and results.

Only ``version`` is durable (the service logs it); the roster is rebuilt from heartbeats within a
second of a restart, and a plan is the trainer's to re-send. Handlers return the reply. The rules
(new process, plan hand-out and failure, a version's results, absent members) and their argument:
STALENESS.md, Weight-sync roster and plans. Leases of servers that leave the roster, register as
a new process or (after a restart) never came back are given to ``release`` (STALENESS.md,
Restarts)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from areal_like.net.ratelog import RateLimitedLog
from areal_like.wire import protocol as P
from areal_like.wire.codec import field_names

# versions of SyncDone results kept for SyncStatusRequest (and the current plan's, whatever its age)
SYNC_RESULTS_KEEP = 8
ABSENT_KEEP = 4096  # absent server ids remembered (kept past expiry: silence is no sign of life)
INCARNATIONS_KEEP = 4096  # ids off the roster whose last incarnation is kept (STALENESS.md)
ABSENT_LOG_EVERY_S = 60.0  # a line about absent members at most this often (a key makes many ids)


@dataclass(slots=True)
class Member:
    entry: P.RosterEntry
    last_seen: float
    # out of weight syncs while its engine holds one version for an evaluation
    evaluating: bool = False


@dataclass(slots=True)
class Sync:
    """The results of one version's weight sync: those of its plan ``plan_id`` (None: unknown)."""
    plan_id: str | None = None
    loaded: dict[str, bool] = field(default_factory=dict)  # server -> loaded
    pause_s: dict[str, float] = field(default_factory=dict)  # server -> seconds not generating


class ControlPlane:
    def __init__(self, pub_address: str, heartbeat_timeout_s: float, clock: Callable[[], float],
                 publish: Callable[[P.Message], None], log: logging.Logger,
                 release: Callable[..., None] = lambda keep, why, level=logging.WARNING: None):
        self.pub_address, self.heartbeat_timeout_s = pub_address, heartbeat_timeout_s
        self.clock, self.publish, self.log = clock, publish, log
        # release(keep, why, level): re-issue the leases of servers ``keep`` rejects, logged at
        # ``level`` (a warning but for a server stopped on request: routine at every job's end)
        self.release = release
        # restored leases of servers not back
        self.started_at, self.orphans_checked = clock(), False
        self.version = 0
        self.roster: dict[str, Member] = {}
        self.plan: P.WeightSyncPlan | None = None
        self.plan_deadline = 0.0
        self.handed: set[str] = set()  # ids handed ``plan`` in a HeartbeatAck (STALENESS.md)
        self.syncs: dict[int, Sync] = {}  # version -> its results
        self.absent: dict[str, int] = {}  # server id -> the version it missed (STALENESS.md)
        self.incarnations: dict[str, str] = {}  # id -> that of its last Register
        # ids off the roster after an expiry, oldest first: INCARNATIONS_KEEP of them keep theirs
        self.departed: OrderedDict[str, None] = OrderedDict()
        self.superseded: dict[str, str] = {}  # id -> the older incarnation last warned about
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
            self.log.warning("server %s silent for %.0fs: removed from the roster", sid,
                             now - self.roster[sid].last_seen)
            self._remove(sid)
        if not self.orphans_checked and now - self.started_at > self.heartbeat_timeout_s:
            # after a restart: leases restored for servers that never came back (a server heartbeats
            # far more often than the timeout, so every live one has registered again by now)
            self.orphans_checked = True
            self.release(lambda sid: sid in self.roster, "gone from the roster")
        elif gone:
            self.release(lambda sid: sid not in gone, "gone from the roster")
        return gone

    def _remove(self, sid: str) -> None:
        """Take ``sid`` off the roster: a plan it was not handed fails for it now."""
        self.roster.pop(sid)
        if (plan := self._pending_plan(sid)) is not None and sid not in self.handed:
            self._failed(sid, plan, "left the roster")
        self.departed[sid] = None
        while len(self.departed) > INCARNATIONS_KEEP:
            sid = self.departed.popitem(last=False)[0]
            del self.incarnations[sid]
            self.superseded.pop(sid, None)

    def register(self, m: P.Register) -> P.RegisterAck:
        # a new process (STALENESS.md): another incarnation than the last, or, either being
        # unknown, one that says it is fresh
        known = self.incarnations.get(m.server_id)
        new = known != m.incarnation if known and m.incarnation else m.fresh
        if new:  # it holds none of the leases an earlier one left
            self.release(lambda sid: sid != m.server_id, f"{m.server_id} restarted")
            self.alive(m.server_id, "registered as a new process")
        # Register has them all
        entry = P.RosterEntry(**{k: getattr(m, k) for k in field_names(P.RosterEntry)})
        if m.server_id not in self.roster:
            self.log.info("server %s registered (engine %s, version %d, torch %r, CUDA %r, "
                          "NCCL %r)", m.server_id, m.engine_url, m.policy_version,
                          m.torch_version, m.cuda_version, m.nccl_version)
        if new and (plan := self._pending_plan(m.server_id)) is not None:
            self._failed(m.server_id, plan, "restarted")
        self.roster[m.server_id] = Member(entry, self.clock())
        self.incarnations[m.server_id] = m.incarnation
        self.departed.pop(m.server_id, None)
        return P.RegisterAck(server_id=m.server_id, policy_version=self.version,
                             pub_address=self.pub_address)

    def older(self, m: P.Message) -> str | None:
        """Why ``m`` (a Heartbeat, CreditRequest or group) must not be served: its sender is an
        older process than the last one that registered under its id (STALENESS.md), told to stop;
        None when it is not. A warning once per such process."""
        if not isinstance(m, (P.Heartbeat, P.CreditRequest, P.TrajectoryGroup)):
            return None  # a Register: the newest wins
        sid, was = m.server_id, m.incarnation
        now = self.incarnations.get(sid)
        if not was or not now or was == now:
            return None
        if self.superseded.get(sid) != was:
            self.superseded[sid] = was
            self.log.warning("server %s: process %s sends after process %s registered under its id"
                             ": told to stop (two rollout servers share rollout.server_id)",
                             sid[:64], was, now)
        return (f"another process registered as {sid[:64]} after this one; give each rollout "
                "server its own rollout.server_id")

    def heartbeat(self, m: P.Heartbeat) -> P.HeartbeatAck:
        member = self.touch(m.server_id, m.policy_version)
        if member is None:
            return P.HeartbeatAck(policy_version=self.version, known=False)
        if m.leaving:  # stopped on request: its leases go to the others now
            self.log.info("server %s is stopping: removed from the roster", m.server_id)
            self._remove(m.server_id)
            self.release(lambda sid: sid != m.server_id, f"{m.server_id} stopped on request",
                         logging.INFO)
            return P.HeartbeatAck(policy_version=self.version, known=False)
        if member.evaluating != m.evaluating:
            self.log.info("server %s %s", m.server_id,
                          "evaluating: out of weight syncs" if m.evaluating
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
        """The trainer announced ``announced``: at or past the plan's version, its silent members
        are absent (STALENESS.md)."""
        plan = self.plan
        if plan is None or plan.plan_id == self._settled or announced < plan.policy_version:
            return
        self._settled = plan.plan_id
        reported = self.syncs.get(plan.policy_version, Sync()).loaded
        for m in plan.members:
            sid = m.server_id
            if sid in self.roster and sid not in reported and sid not in self.absent:
                self.absent[sid] = plan.policy_version
                self._absent_log.warning(
                    "absent", "server %s never reported weight sync v%d: left out of weight syncs "
                    "until it reports one, asks for credits, delivers a group or registers anew",
                    sid[:64], plan.policy_version)
        for sid in list(self.absent)[:-ABSENT_KEEP]:
            del self.absent[sid]

    def alive(self, server_id: str, how: str) -> None:
        """``server_id`` showed life (``how``): back in the weight syncs if it was absent."""
        if self.absent.pop(server_id, None) is not None:
            self._absent_log.log(logging.INFO, "back", "server %s %s: back in weight syncs",
                                 server_id[:64], how)

    def take_plan(self, plan: P.WeightSyncPlan) -> P.Ack:
        sync = self.syncs.get(plan.policy_version)
        if sync is None or sync.plan_id != plan.plan_id:  # a re-push: every member loads it again
            sync = self.syncs[plan.policy_version] = Sync(plan.plan_id)
        self.plan, self.plan_deadline = plan, self.clock() + plan.deadline_s
        self.handed = set()
        for m in plan.members:  # off the roster after an expiry: the trainer read it before
            if m.server_id in self.departed and m.server_id not in sync.loaded:
                self._failed(m.server_id, plan, "is off the roster")
        self._trim_syncs()
        self.publish(plan)
        return P.Ack(ref=str(plan.policy_version), status="ok")

    def _trim_syncs(self) -> None:
        """The newest ``SYNC_RESULTS_KEEP`` versions' results and the current plan's: a report of
        a version no plan named (a peer's, between pushes) adds no lasting entry."""
        current = self.plan.policy_version if self.plan else None
        for version in sorted(self.syncs)[:-SYNC_RESULTS_KEEP]:
            if version != current:
                del self.syncs[version]

    def _failed(self, server_id: str, plan: P.WeightSyncPlan, how: str) -> None:
        """The plan is not for the process behind ``server_id`` now (STALENESS.md): it is never
        handed to it and the trainer stops waiting for it; the next push re-forms the group."""
        self.syncs.setdefault(plan.policy_version, Sync()).loaded[server_id] = False
        self.log.warning("server %s %s during weight sync v%d: left out of it (it joins the next "
                         "one)", server_id[:64], how, plan.policy_version)

    def _pending_plan(self, server_id: str) -> P.WeightSyncPlan | None:
        plan = self.plan
        if plan is None or self.clock() > self.plan_deadline:
            return None
        if server_id in self.syncs.get(plan.policy_version, Sync()).loaded:
            return None
        return plan if any(m.server_id == server_id for m in plan.members) else None

    def sync_done(self, m: P.SyncDone) -> P.Ack:
        self.alive(m.server_id, f"reported weight sync v{m.policy_version}")
        sync = self.syncs.setdefault(m.policy_version, Sync())
        if m.plan_id and sync.plan_id is None:
            sync.plan_id = m.plan_id  # after the buffer's restart: the plan the trainer re-sends
        if m.plan_id and m.plan_id != sync.plan_id:
            self.log.info("server %s answered an earlier plan of weight sync v%d: not a result of "
                          "the current one", m.server_id[:64], m.policy_version)
            return P.Ack(ref=str(m.policy_version), status="ok")
        sync.loaded[m.server_id], sync.pause_s[m.server_id] = m.ok, m.pause_s
        self._trim_syncs()
        if m.ok:
            self.touch(m.server_id, m.policy_version)
        else:
            self.log.warning("server %s failed to load version %d: %s", m.server_id,
                             m.policy_version, m.reason)
        return P.Ack(ref=str(m.policy_version), status="ok")

    def sync_status(self, m: P.SyncStatusRequest) -> P.SyncStatus:
        sync = self.syncs.get(m.policy_version, Sync())
        return P.SyncStatus(policy_version=m.policy_version,
                            done=sorted(s for s, ok in sync.loaded.items() if ok),
                            failed=sorted(s for s, ok in sync.loaded.items() if not ok),
                            pause_s=dict(sync.pause_s))
