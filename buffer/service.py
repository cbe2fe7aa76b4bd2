"""The buffer daemon: one loop wiring the parts of one job's data and control plane (its place in
the system: areal_like/DESIGN.md; the staleness bound: STALENESS.md; the WAL: WAL.md).

The parts own their state; this module ties them together: dedupe by group id, dropping a group
(slot back to the ledger, a consumed mark in the WAL), and the rule that **a reply leaves only
once what it depends on is durable**. Bad input gets ``Ack(status="rejected", reason=...)`` and is
counted."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable

from areal_like.daemon import Daemon
from areal_like.net import security
from areal_like.net.peers import is_trainer_peer, takes_trainer_prefix
from areal_like.net.pubsub import Publisher
from areal_like.net.ratelog import RateLimitedLog
from areal_like.net.transport import LOCAL_MEMBER, Server, listening_on, local_addresses
from areal_like.settings.config import BufferConfig, RunConfig
from areal_like.wire import group_checks
from areal_like.wire import protocol as P
from buffer.control import ControlPlane
from buffer.credits import CreditLedger, Lease, invalid_group, version_range
from buffer.diskspace import MIN_SEGMENT_BYTES, DiskGuard
from buffer.facts import BufferFacts
from buffer.handout import Handout
from buffer.instruments import BufferMetrics, service_gauges, service_stats
from buffer.peer_caps import PeerCaps
from buffer.recovery import replay
from buffer.replay_buffer import ReplayBuffer
from buffer.staleness import StalenessPolicy
from buffer.wal import DiskFull, WriteAheadLog, segment_path

# wait for the first request of a batch; bounds how late a held BatchRequest is answered
POLL_S = 0.02
POLL_BUSY_S = 0.001  # ...while replies wait for an fsync, where the WAL has no wake-up descriptor
# a kind of rejection is logged at most this often (a peer can send them at will)
REJECT_LOG_EVERY_S = 60.0
MAX_POLL_BATCH = 512  # requests handled per loop iteration (one fsync for all of them)
MAX_POLL_BYTES = 4 << 20  # ...or this many bytes: smaller fsyncs start sooner and overlap receiving
# lease expiry and roster timeouts at most this often (a scan per iteration cost % of ingest)
SWEEP_S = 0.05
MAX_ENGINE_RETRIES = 3  # groups of one prompt refused for the engine's numbers before it is skipped
# group ids remembered for dedupe after consumption: hours of generation, ~20 MB
SEEN_KEEP = 200_000


def io_threads(configured: int) -> int:
    """``buffer.io_threads``, 0 resolved: half the cores this process may use, 1 to 8."""
    return configured or min(8, max(1, len(os.sched_getaffinity(0)) // 2))


class BufferService(Daemon):
    name = "buffer"

    def __init__(self, b: BufferConfig, facts: BufferFacts, *,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(metrics_port=b.metrics_port)
        self.cfg, self.clock = b, clock
        self.facts = facts
        # counted in full in buffer/rejected
        self.rejections = RateLimitedLog(self.log, REJECT_LOG_EVERY_S)
        self.policy = StalenessPolicy(b.max_staleness, b.groups_per_step, b.max_inflight,
                                      engine_lag=facts.engine_lag)
        self.ledger = CreditLedger(self.policy, facts.dataset_size,
                                   lease_timeout_s=b.lease_timeout_s,
                                   max_epochs=b.max_epochs, clock=clock)
        self.store = ReplayBuffer(self.policy, capacity=b.capacity, selection=b.selection,
                                  filter_equal_rewards=b.filter_equal_rewards,
                                  max_tokens_per_trajectory=b.max_tokens_per_trajectory)
        facts.wal_dir.mkdir(parents=True, exist_ok=True)
        self.disk = DiskGuard(facts.wal_dir, b.wal_reserve_bytes, log=self.log)
        segment_bytes = min(b.segment_bytes, max(MIN_SEGMENT_BYTES, self.disk.free // 8))
        self.wal = WriteAheadLog(facts.wal_dir, fsync=b.fsync, segment_bytes=segment_bytes)
        self.control = ControlPlane(b.pub_address, b.heartbeat_timeout_s, clock, self.log,
                                    self._release)
        self.instruments = BufferMetrics(self.metrics,
                                         {"in_flight": lambda: self.ledger.in_flight,
                                          "stored": lambda: len(self.store),
                                          "in_transit": lambda: self.handout.in_transit_groups()},
                                         service_gauges(self))
        # group ids consumed or dropped this iteration (the hand-out extends it)
        self._consumed: list[str] = []
        self.handout = Handout(self.store, self.wal.read_group, self._drop, self._on_consumed,
                               self._changed, self.instruments, self.log)
        self.caps = PeerCaps(facts.max_servers, clock=clock)
        self.seen: dict[str, None] = {}  # accepted group ids (ordered: oldest are forgotten first)
        # (prompt, epoch) -> groups refused for the engine's numbers; at MAX_ENGINE_RETRIES it is
        # skipped this epoch like a bad prompt (in memory: a restart gives each prompt a
        # fresh count)
        self.engine_faults: Counter[tuple[int, int]] = Counter()
        # (ticket, peer, req_id, reply, type, t); peer None: publish
        self._waiting: deque[tuple] = deque()
        self._after_control: list[tuple] = []  # (peer, req_id, reply, type, t) waiting for this
        # iteration's control record
        self._dirty = False  # control state changed in this iteration: a control record is due
        self._next_sweep = 0.0
        self._handlers = {
            P.Register: self.control.register, P.Heartbeat: self.control.heartbeat,
            P.RosterRequest: self.control.roster_reply,
            P.CreditRequest: self._on_credits,
            P.StatsRequest: lambda m: P.Stats(values=self.stats()),
        }
        self.server: Server | None = None
        self.publisher: Publisher | None = None
        # peers refused by CURVE never reach handle()
        self._unwatch_refused = security.on_refused(self.instruments.refused)

    @classmethod
    def from_run(cls, cfg: RunConfig, *, keys: security.Keys | None = None,
                 clock: Callable[[], float] = time.monotonic) -> BufferService:
        """The buffer of the job ``cfg`` describes, serving CURVE with ``keys`` (None: plain
        sockets)."""
        return cls(cfg.buffer, BufferFacts.from_run(cfg, keys), clock=clock)

    # ------------------------------------------------------------------ lifecycle and the loop
    def start(self) -> None:
        self.recover()
        f = self.facts
        local = local_addresses(f.local_dir) if f.local_dir else (None, None)
        self.server = Server(self.cfg.address, keys=f.keys, max_frame_bytes=f.frame_limit,
                             local_address=local[0], io_threads=io_threads(self.cfg.io_threads))
        if self.wal.wakeup_fd is not None:
            self.server.wake_on(self.wal.wakeup_fd)  # a finished fsync ends the wait for requests
        self.publisher = Publisher(self.cfg.pub_address, keys=f.keys, local_address=local[1])
        self.log.info("listening on %s, pub %s; same-node %s: version %d, %d groups stored, "
                      "%d leases, cursor %s, frames up to %d bytes", listening_on(self.cfg.address),
                      listening_on(self.cfg.pub_address), f.local_dir or "none",
                      self.control.version,
                      len(self.store), self.ledger.in_flight,
                      (self.ledger.next_index, self.ledger.epoch), f.frame_limit)
        if f.prompt_layout:
            self.log.info("%s; %d prompts per epoch", f.prompt_layout, self.ledger.dataset_size)

    def run_once(self) -> None:
        # else the fsync thread ends the wait itself
        busy = self._waiting and self.wal.wakeup_fd is None
        self._receive(POLL_BUSY_S if busy else POLL_S)  # handle a batch of requests
        # real time: self.clock may be a test's
        if sweep := (now := time.monotonic()) >= self._next_sweep:
            self._next_sweep = now + SWEEP_S
        self.settle(sweep=sweep)

    def settle(self, *, sweep: bool = True) -> None:
        """The rest of a loop iteration (WAL.md, Replies wait for the disk)."""
        if sweep:
            self.expire()
            self.disk.sweep(self.wal, self.checkpoint)
        for p, reply in self.handout.serve(self.clock()):
            self._queue_reply(p.peer, p.req_id, reply, p.request.TYPE, p.received)
        self._log_control()
        self.wal.request_sync()
        self.wal.clear_wakeup()  # before reading durable(): a later fsync wakes the next wait
        self.send_durable()
        if self.wal.maybe_rotate(self.checkpoint):
            self.send_durable()

    def stop(self) -> None:
        if self.server is not None and not self.wal.failed:  # a failed WAL makes nothing durable
            self._log_control()
            if self._waiting:
                self.wal.wait_durable(unless_full=True)  # SIGTERM on a full disk: no hang
                self.send_durable()
        for closable in (self.server, self.publisher):
            if closable is not None:
                closable.close()
        self.wal.close()
        self._unwatch_refused()

    def health(self) -> tuple[bool, dict]:
        return self.failure is None, {"name": self.name, "policy_version": self.control.version,
                                      "stored": len(self.store), "in_flight": self.ledger.in_flight,
                                      **({"degraded": self.disk.reason()} if self.disk.degraded
                                         else {}), **self.failed()}

    def recover(self) -> None:
        """Take the state the WAL holds, then drop what cannot be served (WAL.md, Recovery)."""
        got = replay(self.wal, self.ledger, self.store, self.log)
        self.control.version, self.seen = got.version, got.seen
        self.handout.restore(got.in_transit)
        # drops land after the checkpoint, with their returned slots
        self.wal.open(self.checkpoint())
        self._drop(self.store.drop_stale(self.control.version), "stale")
        for u in got.unreadable.values():
            self.log.error("wal %s: group %s at offset %d is damaged or no longer decodes: "
                           "dropped as unreadable%s",
                           segment_path(self.wal.dir, u.ref.segment).name, u.group_id, u.ref.offset,
                           "" if u.lease_id
                           else "; its lease is unknown, so its prompt is not re-issued")
            if u.lease_id is not None:
                # still open if the process died before its control record
                self.ledger.fulfil(u.lease_id)
            self._drop([u], "unreadable", slots=u.lease_id is not None)
        # filtered, but died before its drop was logged (or config changed)
        for gid, why in got.filtered.items():
            if (stored := self.store.pop(gid)) is not None:
                self._drop([stored], why)
        self.settle(sweep=False)
        if got.unreadable:  # their consumed marks are written: their segments may go now
            self.wal.wait_durable()
            self.wal.compact()
        if got.records:
            self.log.info("recovered %d WAL records (%d group records, %d stored now, %d of them "
                          "in transit, %d corrupt skipped, %d damaged control records restored, "
                          "%d lost)", got.records, got.groups,
                          len(self.store) + self.handout.in_transit_groups(),
                          self.handout.in_transit_groups(), self.wal.corrupt_records, got.restored,
                          got.lost_control)

    # ------------------------------------------------------------------ requests
    def _receive(self, timeout_s: float) -> None:
        n_bytes = 0
        for i in range(MAX_POLL_BATCH):
            if (got := self.server.recv_request(timeout_s if i == 0 else 0)) is None:
                return
            self.handle(*got)
            n_bytes += len(got[3])
            if n_bytes >= MAX_POLL_BYTES:
                return

    def handle(self, peer: bytes, req_id: bytes, msg: P.Message | P.ProtocolError, frame: bytes,
               member: str = LOCAL_MEMBER) -> None:
        """One request from ``peer``, a socket of ``member`` (its key's role: peer_caps.py). A
        GroupSubmit is served as the group it carries, whose frame the WAL stores; a bare
        TrajectoryGroup asks for no leases."""
        received, want = self.clock(), 0
        if isinstance(msg, P.GroupSubmit):
            want = msg.want_credits
            try:
                msg, frame = P.opened(msg)
            except P.ProtocolError as e:
                msg = e
        if (refused := self.caps.refusal(member, msg, self.handout.pending, self.control.roster)):
            refused = self._refuse(*refused)
            reply = P.Batch(groups=[], trainer_version=msg.trainer_version, reason=refused.reason) \
                if isinstance(msg, P.BatchRequest) else refused
            kind = msg.TYPE
        elif isinstance(msg, P.BatchRequest):
            self.handout.hold(peer, req_id, msg, received, member)  # answered by settle()
            return
        elif isinstance(msg, P.ProtocolError):
            # frame_too_large: refused from its length, never decoded
            label = "frame_too_large" if len(frame) > self.facts.frame_limit else "decode"
            self.instruments.count("rejected", reason=label)
            self.rejections.warning(label, "rejected %s frame from %r: %s",
                                    "an oversized" if label != "decode" else "an undecodable",
                                    peer[:64], msg)
            reply, kind = P.Ack(ref="", status="rejected", reason=f"{label}: {msg}"), "invalid"
        elif (older := self.control.older(msg)) is not None:  # it exits (STALENESS.md)
            self.instruments.count("rejected", reason="duplicate_id")
            reply, kind = P.Ack(ref=getattr(msg, "group_id", ""), status="rejected",
                                reason=f"duplicate_id: {older}"), msg.TYPE
        elif isinstance(msg, P.TrajectoryGroup):
            reply, kind = self._on_group(msg, frame, want), msg.TYPE
        elif isinstance(msg, P.VersionUpdate):
            reply, kind = self._on_version(msg, peer), msg.TYPE
        elif isinstance(msg, P.Register) and takes_trainer_prefix(msg.server_id):
            reply, kind = self._refuse("reserved_id", f"server id {msg.server_id!r} takes the "
                                       "trainer's prefix"), msg.TYPE
        elif isinstance(msg, P.Register) and (held := self.control.held(msg)) is not None:
            reply, kind = self._refuse("id_in_use", held, ref=""), msg.TYPE
        elif type(msg) in self._handlers:
            reply, kind = self._handlers[type(msg)](msg), msg.TYPE
        else:  # a valid message the buffer does not serve (e.g. a reply type sent by mistake)
            reply, kind = self._refuse("unexpected_type", f"{msg.TYPE} is not a request",
                                       ref=""), "invalid"
        self._queue_reply(peer, req_id, reply, kind, received)

    def _retry(self, label: str, lease: Lease) -> bool:
        """Whether a prompt whose group was refused for ``label`` is generated again."""
        if label in group_checks.REASONS:
            return False
        key = (lease.prompt_index, lease.epoch)
        self.engine_faults[key] += 1
        if self.engine_faults[key] < MAX_ENGINE_RETRIES:
            return True
        del self.engine_faults[key]
        self.log.warning("prompt %d (epoch %d) skipped this epoch: %d of its groups were refused "
                         "for the engine's numbers (%s)", *key, MAX_ENGINE_RETRIES, label)
        return False

    def _on_group(self, g: P.TrajectoryGroup, frame: memoryview, want: int) -> P.Ack:
        if g.group_id in self.seen or g.group_id in self.store:
            self.instruments.count("groups_duplicate")
            return self._ack_with_leases(g, "duplicate", want)
        lease = self.ledger.leases.get(g.lease_id)
        versions = version_range(g)  # one pass over the token versions, for every check below
        reason = (invalid_group(g, lease, self.control.newest_version(), versions)
                  or group_checks.content_problem(g, self.facts.vocab_size, self.facts.context,
                                                  self.facts.trajectories, self.facts.routes))
        if reason is not None:
            self.instruments.count("rejected", reason=(label := reason.split(":")[0]))
            self.rejections.warning(f"group:{label}", "rejected group %s from %s: %s", g.group_id,
                                    g.server_id, reason)
            if lease is not None and not reason.startswith("lease"):
                # the sender drops a rejected group: generate it again, unless its content is what
                # is wrong (the same prompt would come back the same way) or the engine's numbers
                # were wrong MAX_ENGINE_RETRIES times for it: then it is skipped this epoch
                self.ledger.cancel(lease.lease_id, reissue=self._retry(label, lease))
                self._dirty = True
            return P.Ack(ref=g.group_id, status="rejected", reason=reason)
        try:
            ref = self.wal.append_group(g.group_id, frame) if self.disk.room(len(frame)) else None
        except DiskFull:  # fsync=batch|never: written inline, and the estimate had room for it
            self.disk.full()
            ref = None
        # disk full: not stored, not acknowledged; the sender keeps it and sends it again
        if ref is None:
            self.instruments.count("groups_deferred")
            return P.Ack(ref=g.group_id, status="unavailable", reason=self.disk.reason())
        self.disk.wrote(ref.length)
        self.instruments.count("wal_bytes_written", ref.length)
        self.ledger.fulfil(g.lease_id)
        self.control.acted(g.server_id)
        if lease is not None:
            self.engine_faults.pop((lease.prompt_index, lease.epoch), None)
        self._remember(g.group_id)
        self.instruments.count("groups_accepted")
        head = versions[2]
        why = ("stale" if not self.policy.is_fresh(head, self.control.version)
               else self.store.filter_reason(g))
        if why is not None:  # acked (the sender is done with it), never stored
            self._drop([g], why)
        else:
            # the frame's memory is freed: the WAL holds it
            self.store.add(g, len(frame), head, ref=ref)
        return self._ack_with_leases(g, "accepted", want)

    def _ack_with_leases(self, g: P.TrajectoryGroup, status: str, want: int) -> P.Ack:
        return P.Ack(ref=g.group_id, status=status,
                     credits=self._grant(g.server_id, want)[0] if want else [])

    def _on_credits(self, m: P.CreditRequest) -> P.Credits:
        self.control.acted(m.server_id)
        credits, reason = self._grant(m.server_id, m.max_credits)
        return P.Credits(credits=credits, policy_version=self.control.version, reason=reason)

    def _grant(self, server_id: str, n: int) -> tuple[list[P.Credit], str]:
        """Up to ``n`` leases for a server, and why fewer when fewer."""
        member, version, reason = self.control.touch(server_id), self.control.version, ""
        if member is None:
            reason, n = "unknown_server", 0
        elif self.disk.degraded:
            reason, n = "disk_full", 0  # what would be generated could not be stored
        elif not self.policy.engine_can_start(member.entry.policy_version, version):
            reason, n = "stale_engine", 0  # it gets the new weights at the next sync
        elif self.store.free_slots(self.ledger.in_flight) < n:
            reason, n = "capacity", self.store.free_slots(self.ledger.in_flight)
        queued = len(self.ledger.reissue)
        # an engine that missed a sync generates groups older than admission assumes: a smaller
        # window. Its lag counts from the trainer's newest version: with an overlapped sync the
        # trainer asks for the batch of v + 1 (and so opens the window) before it announces v + 1,
        # whether that batch is in transit or its request still waits; never more than one ahead.
        newest = version + 1 if self.handout.trainer_version() > version else version
        lag = (self.policy.engine_lag_of(member.entry.policy_version, newest)
               if member is not None else 0)
        leases = self.ledger.grant(server_id, n, lag)
        if len(leases) < n:
            reason = self.ledger.shortfall_reason(lag)
        if leases:
            self._dirty = True
            self.instruments.count("credits_granted", len(leases))
            self.instruments.count("credits_reissued", queued - len(self.ledger.reissue))
        return [P.Credit(lease_id=x.lease_id, prompt_index=x.prompt_index, epoch=x.epoch,
                         deadline_s=self.cfg.lease_timeout_s) for x in leases], reason

    def _refuse(self, reason: str, detail: str, ref: str | None = None) -> P.Ack:
        """Count and log (rate-limited) a refusal; its Ack's ``ref`` is the buffer's version by
        default."""
        self.instruments.count("rejected", reason=reason)
        self.rejections.warning(reason, "refused: %s: %s", reason, detail)
        return P.Ack(ref=str(self.control.version) if ref is None else ref, status="rejected",
                     reason=f"{reason}: {detail}")

    def _on_version(self, m: P.VersionUpdate, peer: bytes) -> P.Ack:
        """Versions come only from the trainer; one ahead by several is taken whole (admission
        counts consumed groups, not versions: buffer/STALENESS.md, Versions)."""
        if not is_trainer_peer(peer):
            return self._refuse("not_trainer",
                                f"VersionUpdate({m.policy_version}) from {peer[:64]!r}")
        if m.policy_version > self.control.version:
            self.control.version = m.policy_version
            self._dirty = True
            self._drop(self.store.drop_stale(m.policy_version), "stale")
            # published once the new version is durable: a restart never goes back on it
            self._after_control.append((None, b"", m, "", self.clock()))
        return P.Ack(ref=str(m.policy_version), status="ok")

    # ----------------------------------------------------------------- what ties the parts together
    def _drop(self, groups: list, reason: str, *, slots: bool = True) -> None:
        """Groups never to be trained on: marked consumed in the WAL, counted, slots returned."""
        reissue = (reason == "unreadable"
                   or (reason == "stale" and self.cfg.stale_policy == "reissue"))
        for g in groups:
            self._consumed.append(g.group_id)
            if slots:
                self.ledger.give_back(g.prompt_index, g.epoch, reissue=reissue)
            self.instruments.count("groups_dropped", reason=reason)
        self._dirty = self._dirty or bool(groups)

    def _changed(self) -> None:
        self._dirty = True

    def expire(self) -> None:
        """Re-issue expired leases; the control plane releases those of servers gone."""
        if expired := self.ledger.expire():
            self._dirty = True
            self.instruments.count("credits_expired", len(expired))
            self.log.warning("re-issuing %d expired leases (e.g. %s of %s)", len(expired),
                             expired[0].lease_id, expired[0].server_id)
        self.control.expire()

    def _release(self, keep: Callable[[str], bool], why: str, level: int = logging.WARNING) -> None:
        """Re-issue at once every lease whose holder ``keep`` rejects."""
        if released := self.ledger.release(keep):
            self._dirty = True
            self.instruments.count("credits_released", len(released))
            self.log.log(level, "re-issuing %d leases of %s: %s", len(released),
                         ", ".join(sorted({x.server_id for x in released})), why)

    def _on_consumed(self, group_ids: list[str]) -> None:
        """The trainer acknowledged a batch: WAL marks, and the admission window moves on."""
        self._consumed.extend(group_ids)
        self.ledger.consume(len(group_ids))
        self._dirty = True

    def _remember(self, group_id: str) -> None:
        self.seen[group_id] = None
        if len(self.seen) > 2 * SEEN_KEEP:
            self.seen = dict.fromkeys(list(self.seen)[-SEEN_KEEP:])

    def _queue_reply(self, peer: bytes, req_id: bytes, reply: P.Message, kind: str,
                     received: float) -> None:
        """Send once what the reply depends on is durable (WAL.md, Replies wait for the disk)."""
        if isinstance(reply, P.Ack) and reply.status == "unavailable":
            self.server.send(peer, req_id, reply)
            self.instruments.latency(kind, self.clock() - received)
            return
        ticket = self.wal.request_sync()
        if self._dirty:
            self._after_control.append((peer, req_id, reply, kind, received))
            return
        self._waiting.append((ticket, peer, req_id, reply, kind, received))
        self.send_durable()

    def _log_control(self) -> None:
        """One control record with what changed in this iteration, then queue what waits for it."""
        if self._dirty:
            record = {"changes": self._control(self.ledger.take_changes()),
                      "consumed": self._consumed}
            written = self.wal.append_control(record)
            self.disk.wrote(written)
            self.instruments.count("wal_bytes_written", written)
            self._dirty = False
            self._consumed.clear()  # after encoding; the hand-out extends this same list
        if self._after_control:
            ticket = self.wal.request_sync()
            self._waiting.extend((ticket, *entry) for entry in self._after_control)
            self._after_control.clear()

    def send_durable(self) -> None:
        durable = self.wal.durable()
        if not self._waiting or self._waiting[0][0] > durable:
            return
        now = self.clock()
        while self._waiting and self._waiting[0][0] <= durable:
            _, peer, req_id, reply, kind, received = self._waiting.popleft()
            if peer is None:
                self.publisher.publish(reply)
                continue
            self.server.send(peer, req_id, reply)
            self.instruments.latency(kind, now - received)
        self.instruments.fsync(self.wal.fsync_seconds())

    # ------------------------------------------------------------------ state, metrics
    def _control(self, ledger: dict) -> dict:
        return {**ledger, "version": self.control.version, "in_transit": self.handout.record()}

    def state(self) -> dict:
        """The whole control state (a checkpoint holds it; every iteration logs what changed)."""
        return self._control(self.ledger.state())

    def checkpoint(self) -> dict:
        """First record of every WAL segment: supersedes every older control record."""
        return {"state": self._control(self.ledger.snapshot()),
                "seen": list(self.seen)[-SEEN_KEEP:]}

    def stats(self) -> dict:
        return service_stats(self)
