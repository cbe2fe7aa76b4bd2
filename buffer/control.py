"""The control plane: the trainer's version and the roster of rollout servers.

Only ``version`` is durable (the service logs it); the roster is rebuilt from heartbeats within a
second of a restart. Handlers return the reply. The trainer reads the roster and drives the
members' engines itself (trainer/WEIGHT_SYNC.md): no weight sync passes through here. The rules
(a new process, evaluating members) and their argument: STALENESS.md, "The roster". Leases of
servers that leave the roster, register as a new process or (after a restart) never came back are
given to ``release`` (STALENESS.md, Restarts)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from areal_like.wire import protocol as P
from areal_like.wire.codec import field_names

INCARNATIONS_KEEP = 4096  # ids off the roster whose last incarnation is kept (STALENESS.md)
# what a process registers once and never changes: another value under a live id is another
# process, or the same one pointed elsewhere (STALENESS.md, The roster)
IDENTITY = ("incarnation", "engine_url", "sync_url", "engine_ranks", "engine_kind")


@dataclass(slots=True)
class Member:
    entry: P.RosterEntry
    last_seen: float
    # out of weight syncs while its engine holds one version for an evaluation
    evaluating: bool = False
    active: int = 0  # lease requests and groups so far (``RosterEntry.active``)
    challenged: str = ""  # a refused Register under its id, told in its next HeartbeatAck


class ControlPlane:
    def __init__(self, pub_address: str, heartbeat_timeout_s: float, clock: Callable[[], float],
                 log: logging.Logger,
                 release: Callable[..., None] = lambda keep, why, level=logging.WARNING: None):
        self.pub_address, self.heartbeat_timeout_s = pub_address, heartbeat_timeout_s
        self.clock, self.log = clock, log
        # release(keep, why, level): re-issue the leases of servers ``keep`` rejects, logged at
        # ``level`` (a warning but for a server stopped on request: routine at every job's end)
        self.release = release
        # restored leases of servers not back
        self.started_at, self.orphans_checked = clock(), False
        self.version = 0
        self.roster: dict[str, Member] = {}
        self.incarnations: dict[str, str] = {}  # id -> that of its last Register
        # ids off the roster after an expiry, oldest first: INCARNATIONS_KEEP of them keep theirs
        self.departed: OrderedDict[str, None] = OrderedDict()
        self.superseded: dict[str, str] = {}  # id -> the older incarnation last warned about

    def newest_version(self) -> int:
        """The newest version any engine may serve: the trainer's, or the next, which its push may
        be loading (a version is announced once pushed)."""
        return self.version + 1

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
        self.roster.pop(sid)
        self.departed[sid] = None
        while len(self.departed) > INCARNATIONS_KEEP:
            sid = self.departed.popitem(last=False)[0]
            del self.incarnations[sid]
            self.superseded.pop(sid, None)

    def acted(self, server_id: str) -> None:
        """``server_id`` asked for leases or delivered a group (``RosterEntry.active``)."""
        if (member := self.roster.get(server_id)) is not None:
            member.active += 1

    def register(self, m: P.Register) -> P.RegisterAck:
        # a new process (STALENESS.md): another incarnation than the last, or, either being
        # unknown, one that says it is fresh
        known = self.incarnations.get(m.server_id)
        new = known != m.incarnation if known and m.incarnation else m.fresh
        if new:  # it holds none of the leases an earlier one left
            self.release(lambda sid: sid != m.server_id, f"{m.server_id} restarted")
        # Register has them all
        entry = P.RosterEntry(**{k: getattr(m, k) for k in field_names(P.RosterEntry)
                                 if k != "active"})
        if m.server_id not in self.roster:
            self.log.info("server %s registered (engine %s, version %d, torch %r, CUDA %r, "
                          "NCCL %r)", m.server_id, m.engine_url, m.policy_version,
                          m.torch_version, m.cuda_version, m.nccl_version)
        old = self.roster.get(m.server_id)
        self.roster[m.server_id] = Member(entry, self.clock(), active=old.active if old else 0)
        self.incarnations[m.server_id] = m.incarnation
        self.departed.pop(m.server_id, None)
        return P.RegisterAck(server_id=m.server_id, policy_version=self.version,
                             pub_address=self.pub_address)

    def held(self, m: P.Register) -> str | None:
        """Why ``m`` may not take its id (None: it may): a live process holds the id (heard within
        the heartbeat timeout) and ``m`` differs from its Register in ``IDENTITY``. That process
        is told at its next heartbeat (``HeartbeatAck.challenged``)."""
        member = self.roster.get(m.server_id)
        if member is None:
            return None
        silent = self.clock() - member.last_seen
        changed = [k for k in IDENTITY if getattr(member.entry, k) != getattr(m, k)]
        if not changed or silent > self.heartbeat_timeout_s:  # the same process, or one gone
            return None
        member.challenged = (f"a Register under this server's id with another "
                             f"{', '.join(changed)} (engine_url {m.engine_url[:80]!r}) was "
                             "refused; this process keeps the id")
        return (f"server id {m.server_id[:64]!r} is held by a live process (heard {silent:.1f}s "
                f"ago) with another {', '.join(changed)}; a restarted server is let in once the "
                f"old one is silent for buffer.heartbeat_timeout_s={self.heartbeat_timeout_s:g}s; "
                "give each rollout server its own rollout.server_id")

    def older(self, m: P.Message) -> str | None:
        """Why ``m`` (a Heartbeat, CreditRequest or group) must not be served: its sender is an
        older process than the last one that registered under its id (STALENESS.md), told to stop;
        None when it is not. An id registered with an incarnation is served only to messages that
        carry it: one without (``""``) could otherwise take the holder off the roster (``leaving``)
        or keep a dead one on it. A warning once per such process."""
        if not isinstance(m, (P.Heartbeat, P.CreditRequest, P.TrajectoryGroup)):
            return None  # a Register: the newest wins
        sid, was = m.server_id, m.incarnation
        now = self.incarnations.get(sid)
        if not now or was == now:
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
        challenged, member.challenged = member.challenged, ""
        if member.evaluating != m.evaluating:
            self.log.info("server %s %s", m.server_id,
                          "evaluating: out of weight syncs" if m.evaluating
                          else "done evaluating: back in weight syncs")
            member.evaluating = m.evaluating
        return P.HeartbeatAck(policy_version=self.version, known=True, challenged=challenged)

    def roster_reply(self, _m: P.RosterRequest) -> P.Roster:
        """Weight-sync members: every live server but those evaluating."""
        return P.Roster(members=[msgspec.structs.replace(m.entry, active=m.active)
                                 for m in self.roster.values() if not m.evaluating],
                        policy_version=self.version,
                        evaluating=sorted(s for s, m in self.roster.items() if m.evaluating))
