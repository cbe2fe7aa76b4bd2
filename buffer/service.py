"""The buffer daemon: data plane and control plane of one job (areal_like/DESIGN.md sections 1-4).

Owns: the prompt cursor and leases (``CreditLedger``), the replay store (``ReplayBuffer``), the
write-ahead log, the trainer version, the roster of rollout servers and the latest weight-sync
plan. Everything but the roster and the plan is durable: the roster is soft state rebuilt from
heartbeats within a second of a restart, and a plan is the trainer's to re-send.

One thread, one loop (``run_once``): receive a batch of requests, answer what can be answered,
expire leases and silent servers, hand out batches. Every reply first logs what it depends on (a
group record, or one control record with the changed state), takes a WAL sync ticket, and is sent
only once that ticket is durable: the WAL's fsync thread syncs whatever has been written so far
(group commit) while this loop keeps receiving. So:

* a group is acked only after its record is durable; credits are granted only after the lease
  is durable (a restart neither repeats nor skips prompts); a batch is handed out only after it
  is durably recorded as in transit, and its groups are consumed once the trainer acknowledges it
  (``handout.py``: at least once into training, exactly once while nothing crashes);
* bad input (undecodable frame, unknown lease, versions newer than any published, NaN reward)
  gets ``Ack(status="rejected", reason=...)``, is counted, and the loop keeps serving;
* a duplicate group id gets ``Ack(status="duplicate")`` and is stored once;
* a group may ask for the sender's next leases (``want_credits``): its Ack carries them, granted by
  the same rules as a CreditRequest (none for a rejected group), so a rollout server needs one
  round trip per group, not two.

The store holds each group's bookkeeping and a reference to its WAL record, not the group: the
received frame is freed once written, and a hand-out reads the frames back (``wal.py``).

Deliberately ignored: who generates what (any registered server may take any credit) and what a
trajectory contains beyond versions, lengths and rewards.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from areal_like import protocol as P
from areal_like.config import RunConfig, dataset_size
from areal_like.daemon import Daemon
from areal_like.transport import Publisher, Server
from buffer.credits import CreditLedger, invalid_group, version_range
from buffer.handout import BatchHandout, InTransit, PendingBatch
from buffer.instruments import BufferMetrics
from buffer.replay_buffer import ReplayBuffer, StoredGroup
from buffer.staleness import StalenessPolicy
from buffer.wal import WriteAheadLog

POLL_S = 0.02  # wait for the first request of a batch; bounds how late a held BatchRequest is answered
POLL_BUSY_S = 0.001  # ...while replies wait for an fsync, where the WAL has no wake-up descriptor
MAX_POLL_BATCH = 512  # requests handled per loop iteration (one fsync for all of them)
MAX_POLL_BYTES = 4 << 20  # ...or this many bytes: smaller fsyncs start sooner and overlap receiving
SWEEP_S = 0.05  # lease expiry and roster timeouts at most this often: their deadlines are
# seconds, and a scan of every lease per loop iteration cost several % of the ingest CPU
SEEN_KEEP = 200_000  # group ids remembered for dedupe after consumption: hours of generation,
# while a sender re-sends an unacked group within seconds to minutes; ~20 MB
SYNC_RESULTS_KEEP = 8  # versions of SyncDone results kept for SyncStatusRequest


@dataclass(slots=True)
class Member:
    entry: P.RosterEntry
    last_seen: float
    in_flight: int = 0
    evaluating: bool = False  # out of weight syncs while its engine holds one version for an evaluation


class BufferService(BatchHandout, BufferMetrics, Daemon):
    name = "buffer"

    def __init__(self, cfg: RunConfig, *, clock: Callable[[], float] = time.monotonic):
        b = cfg.buffer
        super().__init__(metrics_port=b.metrics_port)
        self.cfg = b
        self.clock = clock
        self.policy = StalenessPolicy(b.max_staleness, b.groups_per_step, b.max_inflight)
        self.ledger = CreditLedger(self.policy, dataset_size(cfg.task, cfg.model), lease_timeout_s=b.lease_timeout_s,
                                   max_epochs=b.max_epochs, clock=clock)
        self.store = ReplayBuffer(self.policy, capacity=b.capacity, selection=b.selection,
                                  filter_equal_rewards=b.filter_equal_rewards,
                                  max_tokens_per_trajectory=b.max_tokens_per_trajectory)
        self.wal = WriteAheadLog(cfg.resolve_path(b.wal_dir), fsync=b.fsync, segment_bytes=b.segment_bytes,
                                 direct=b.direct_io)
        self.version = 0
        self.seen: dict[str, None] = {}  # accepted group ids (ordered: oldest are forgotten first)
        self.roster: dict[str, Member] = {}
        self.plan: P.WeightSyncPlan | None = None
        self.plan_deadline = 0.0
        self.sync_results: dict[int, dict[str, bool]] = {}
        self.sync_pauses: dict[int, dict[str, float]] = {}  # version -> server -> seconds not generating
        self.pending: list[PendingBatch] = []
        self.in_transit: InTransit | None = None  # the last batch handed out, until the trainer acks it
        self._waiting: deque[tuple] = deque()  # (wal ticket, peer, req_id, reply, type, t): sent once durable;
        # peer None: a message to publish once durable (a VersionUpdate a restart must not forget)
        self._publish: list[P.Message] = []  # to publish once this iteration's control record is durable
        self._after_control: list[tuple] = []  # (peer, req_id, reply, type, t): replies waiting for it
        self._consumed: list[str] = []  # group ids marked consumed/dropped in this iteration
        self._dirty = False  # control state changed in this iteration
        self._next_sweep = 0.0  # time.monotonic() of the next expiry sweep
        self._handlers = {
            P.Register: self._on_register, P.Heartbeat: self._on_heartbeat, P.CreditRequest: self._on_credits,
            P.VersionUpdate: self._on_version, P.RosterRequest: self._on_roster,
            P.WeightSyncPlan: self._on_plan, P.SyncDone: self._on_sync_done,
            P.SyncStatusRequest: self._on_sync_status, P.StatsRequest: lambda m: P.Stats(values=self.stats()),
        }
        self.server: Server | None = None
        self.publisher: Publisher | None = None
        self._declare_metrics()  # BufferMetrics

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        from buffer.recovery import recover

        recover(self)
        self.server = Server(self.cfg.address)
        if self.wal.wakeup_fd is not None:
            self.server.wake_on(self.wal.wakeup_fd)  # a finished fsync ends the wait for requests
        self.publisher = Publisher(self.cfg.pub_address)
        self.log.info("serving on %s (pub %s): version %d, %d groups stored, %d leases, cursor %s",
                      self.cfg.address, self.cfg.pub_address, self.version, len(self.store),
                      self.ledger.in_flight, (self.ledger.next_index, self.ledger.epoch))

    def run_once(self) -> None:
        busy = self._waiting and self.wal.wakeup_fd is None  # else the fsync thread ends the wait itself
        self._receive(POLL_BUSY_S if busy else POLL_S)  # handle a batch of requests
        if (now := time.monotonic()) >= self._next_sweep:  # real time: self.clock may be a test's
            self._next_sweep = now + SWEEP_S
            self._expire()  # leases past their deadline, servers past their heartbeat timeout
        self._serve_batches()  # held BatchRequests: enough fresh groups now, or their wait is over
        self._persist_and_reply()  # log what changed, send the replies that are durable now

    def stop(self) -> None:
        if self.server is not None:
            self._log_control()
        if self.server is not None and self._waiting:
            self.wal.wait_durable()
            self._send_durable_replies()
        for closable in (self.server, self.publisher):
            if closable is not None:
                closable.close()
        self.wal.close()

    def health(self) -> tuple[bool, dict]:
        return self.failure is None, {"name": self.name, "policy_version": self.version,
                                      "stored": len(self.store), "in_flight": self.ledger.in_flight}

    # ------------------------------------------------------------------ the loop's steps
    def _receive(self, timeout_s: float) -> None:
        n_bytes = 0
        for i in range(MAX_POLL_BATCH):
            got = self.server.recv_with_payload(timeout_s if i == 0 else 0)
            if got is None:
                return
            peer, req_id, msg, frame = got
            n_bytes += len(frame)
            self.handle(peer, req_id, msg, frame)
            if n_bytes >= MAX_POLL_BYTES:
                return

    def handle(self, peer: bytes, req_id: bytes, msg: P.Message | P.ProtocolError, frame: bytes) -> None:
        received = self.clock()
        if isinstance(msg, P.ProtocolError):
            self._count("rejected", reason="decode")
            self.log.warning("rejected an undecodable frame: %s", msg)
            reply, kind = P.Ack(ref="", status="rejected", reason=f"decode: {msg}"), "invalid"
        elif isinstance(msg, P.TrajectoryGroup):
            reply, kind = self._on_group(msg, frame), msg.TYPE
        elif isinstance(msg, P.BatchRequest):
            wait = max(0.0, msg.wait_s)
            self.pending.append(PendingBatch(peer, req_id, msg, received + wait, received))
            return
        elif type(msg) in self._handlers:
            reply, kind = self._handlers[type(msg)](msg), msg.TYPE
        else:  # a valid message the buffer does not serve (e.g. a reply type sent by mistake)
            self._count("rejected", reason="unexpected_type")
            reply, kind = P.Ack(ref="", status="rejected", reason=f"type: {msg.TYPE} is not a request"), "invalid"
        self._queue_reply(peer, req_id, reply, kind, received)

    def _queue_reply(self, peer: bytes, req_id: bytes, reply: P.Message, kind: str, received: float) -> None:
        """Send this reply as soon as what it depends on is durable. A reply that changed no control
        state (so far in this loop iteration) takes its own ticket at once: every reply already
        durable goes out while the rest of the burst is being handled (in benchmarks/bench_buffer.py
        this beats one ticket per loop iteration). One that did waits for the iteration's single
        control record (``_log_control``): with leases granted in group acks, a control record per
        reply cost more than the rest of the group's handling. The ticket is taken in both cases so
        that the fsync thread starts on the first record of a burst."""
        ticket = self.wal.request_sync()
        if self._dirty or self._consumed or self._publish:
            self._after_control.append((peer, req_id, reply, kind, received))
            return
        self._waiting.append((ticket, peer, req_id, reply, kind, received))
        self._send_durable_replies()

    def _log_control(self) -> None:
        """Log the control state changed in this iteration (one record), then queue the replies and
        announcements that wait for it."""
        self._write_control()
        if self._after_control or self._publish:
            ticket = self.wal.request_sync()
            now = self.clock()
            self._waiting.extend((ticket, None, b"", m, "", now) for m in self._publish)
            self._waiting.extend((ticket, *entry) for entry in self._after_control)
            self._publish.clear()
            self._after_control.clear()

    def _expire(self) -> None:
        expired = self.ledger.expire()
        if expired:
            self._dirty = True
            self._count("credits_expired", len(expired))
            self.log.warning("re-issuing %d expired leases (e.g. %s of %s)", len(expired),
                             expired[0].lease_id, expired[0].server_id)
        now = self.clock()
        for sid in [s for s, m in self.roster.items() if now - m.last_seen > self.cfg.heartbeat_timeout_s]:
            silent = now - self.roster.pop(sid).last_seen
            self.log.warning("server %s silent for %.0fs: removed from the roster", sid, silent)

    def _write_control(self) -> None:
        if self._dirty or self._consumed:  # what changed, not the whole state (see credits.py)
            self._count("wal_bytes_written", self.wal.append_control({"changes": self._control(self.ledger.take_changes()),
                                                                      "consumed": self._consumed}))
            self._dirty, self._consumed = False, []

    def _persist_and_reply(self) -> None:
        self._log_control()  # the replies that wait for it, and e.g. expired leases or stale drops
        self.wal.request_sync()
        self.wal.clear_wakeup()  # before reading durable(): a later fsync wakes the next wait
        self._send_durable_replies()
        if self.wal.maybe_rotate(self.checkpoint):
            self._send_durable_replies()

    def _send_durable_replies(self) -> None:
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
            self._observe_latency(kind, now - received)
        for seconds in self.wal.fsync_seconds():
            self._metric_child("histogram", "buffer/fsync_seconds", "WAL group commit latency (write if direct, fsync)").observe(seconds)

    # ------------------------------------------------------------------ rollout servers
    def _on_register(self, m: P.Register) -> P.RegisterAck:
        entry = P.RosterEntry(**{k: getattr(m, k) for k in P.field_names(P.RosterEntry)})  # Register has them all
        if m.server_id not in self.roster:
            self.log.info("server %s registered (engine %s, version %d, torch %r, CUDA %r, NCCL %r)", m.server_id,
                          m.engine_url, m.policy_version, m.torch_version, m.cuda_version, m.nccl_version)
        self.roster[m.server_id] = Member(entry, self.clock())
        return P.RegisterAck(server_id=m.server_id, policy_version=self.version, pub_address=self.cfg.pub_address)

    def _touch(self, server_id: str, engine_version: int | None = None) -> Member | None:
        member = self.roster.get(server_id)
        if member is not None:
            member.last_seen = self.clock()
            if engine_version is not None:
                member.entry = msgspec.structs.replace(member.entry, policy_version=engine_version)
        return member

    def _on_heartbeat(self, m: P.Heartbeat) -> P.HeartbeatAck:
        member = self._touch(m.server_id, m.policy_version)
        if member is None:
            return P.HeartbeatAck(policy_version=self.version, known=False)
        member.in_flight = m.in_flight
        if member.evaluating != m.evaluating:
            self.log.info("server %s %s", m.server_id, "evaluating: out of weight syncs" if m.evaluating
                          else "done evaluating: back in weight syncs")
            member.evaluating = m.evaluating
        return P.HeartbeatAck(policy_version=self.version, known=True, pending_plan=self._pending_plan(m.server_id))

    def _on_credits(self, m: P.CreditRequest) -> P.Credits:
        credits, reason = self._grant(m.server_id, m.max_credits)
        return P.Credits(credits=credits, policy_version=self.version, reason=reason)

    def _grant(self, server_id: str, n: int) -> tuple[list[P.Credit], str]:
        """Up to ``n`` leases for a server (a CreditRequest, or a group's ``want_credits``), and why
        fewer when fewer. They are durable before the reply that carries them is sent."""
        member = self._touch(server_id)
        reason = ""
        if member is None:
            reason, n = "unknown_server", 0
        elif not self.policy.engine_can_start(member.entry.policy_version, self.version):
            reason, n = "stale_engine", 0  # it gets the new weights at the next sync
        elif self.store.free_slots(self.ledger.in_flight) < n:
            reason, n = "capacity", self.store.free_slots(self.ledger.in_flight)
        queued = len(self.ledger.reissue)
        leases = self.ledger.grant(server_id, n, self.version)
        if len(leases) < n:
            reason = self.ledger.shortfall_reason(self.version)
        if leases:
            self._dirty = True
            self._count("credits_granted", len(leases))
            self._count("credits_reissued", queued - len(self.ledger.reissue))
        return [P.Credit(lease_id=x.lease_id, prompt_index=x.prompt_index, epoch=x.epoch,
                         deadline_s=self.cfg.lease_timeout_s) for x in leases], reason

    def _on_group(self, g: P.TrajectoryGroup, frame: bytes) -> P.Ack:
        if g.group_id in self.seen or g.group_id in self.store:
            self._count("groups_duplicate")
            return self._ack_with_leases(g, "duplicate")
        lease = self.ledger.leases.get(g.lease_id)
        versions = version_range(g)  # one pass over the token versions, for every check below
        reason = invalid_group(g, lease, max(self.version, self.plan.policy_version if self.plan else 0), versions)
        if reason is not None:
            self._count("rejected", reason=reason.split(":")[0])
            self.log.warning("rejected group %s from %s: %s", g.group_id, g.server_id, reason)
            if lease is not None and not reason.startswith("lease"):
                self.ledger.cancel(lease.lease_id)  # the sender drops a rejected group: generate it again
                self._dirty = True
            return P.Ack(ref=g.group_id, status="rejected", reason=reason)
        ref = self.wal.append_group(g.group_id, frame)
        self._count("wal_bytes_written", ref.length)
        self.ledger.fulfil(g.lease_id)
        self._remember(g.group_id)
        self._count("groups_accepted")
        head = versions[2]
        why = "stale" if not self.policy.is_fresh(head, self.version) else self.store.filter_reason(g)
        if why is not None:  # acked (the sender is done with it), never stored
            self._drop([g], why)
        else:
            self.store.add(g, len(frame), head, ref=ref)  # the frame's memory is freed: the WAL holds it
        return self._ack_with_leases(g, "accepted")

    def _ack_with_leases(self, g: P.TrajectoryGroup, status: str) -> P.Ack:
        """The Ack of a group taken (accepted or duplicate), with the leases it asked for."""
        credits = self._grant(g.server_id, g.want_credits)[0] if g.want_credits else []
        return P.Ack(ref=g.group_id, status=status, credits=credits)

    def _drop(self, groups: list[P.TrajectoryGroup] | list[StoredGroup], reason: str) -> None:
        """Groups that will never be trained on: marked in the WAL, counted, their slots returned."""
        reissue = reason == "unreadable" or (reason == "stale" and self.cfg.stale_policy == "reissue")
        for g in groups:
            self._consumed.append(g.group_id)
            self.ledger.give_back(g.prompt_index, g.epoch, reissue=reissue)
            self._count("groups_dropped", reason=reason)
        if groups:
            self._dirty = True

    # ------------------------------------------------------------------ trainer
    def _on_version(self, m: P.VersionUpdate) -> P.Ack:
        if m.policy_version > self.version:
            self.version = m.policy_version
            self._dirty = True
            self._drop(self.store.drop_stale(self.version), "stale")
            self._publish.append(m)  # once the new version is durable: a restart never goes back on it
            self.log.debug("trainer version %d", self.version)
        return P.Ack(ref=str(m.policy_version), status="ok")

    def _on_roster(self, _m: P.RosterRequest) -> P.Roster:
        """Weight-sync members: every live server but those evaluating (their engines hold one version)."""
        return P.Roster(members=[m.entry for m in self.roster.values() if not m.evaluating],
                        policy_version=self.version,
                        evaluating=sorted(s for s, m in self.roster.items() if m.evaluating))

    def _on_plan(self, plan: P.WeightSyncPlan) -> P.Ack:
        old = self.plan
        if old is not None and old.policy_version == plan.policy_version and old.plan_id != plan.plan_id:
            self.sync_results.pop(plan.policy_version, None)  # a re-push: every member must load it again
            self.sync_pauses.pop(plan.policy_version, None)
        self.plan, self.plan_deadline = plan, self.clock() + plan.deadline_s
        self.sync_results.setdefault(plan.policy_version, {})
        for old in sorted(self.sync_results)[:-SYNC_RESULTS_KEEP]:
            del self.sync_results[old]
            self.sync_pauses.pop(old, None)
        self.publisher.publish(plan)
        return P.Ack(ref=str(plan.policy_version), status="ok")

    def _pending_plan(self, server_id: str) -> P.WeightSyncPlan | None:
        plan = self.plan
        if plan is None or self.clock() > self.plan_deadline:
            return None
        if server_id in self.sync_results.get(plan.policy_version, {}):
            return None
        return plan if any(m.server_id == server_id for m in plan.members) else None

    def _on_sync_done(self, m: P.SyncDone) -> P.Ack:
        self.sync_results.setdefault(m.policy_version, {})[m.server_id] = m.ok
        self.sync_pauses.setdefault(m.policy_version, {})[m.server_id] = m.pause_s
        if m.ok:
            self._touch(m.server_id, m.policy_version)
        else:
            self.log.warning("server %s failed to load version %d: %s", m.server_id, m.policy_version, m.reason)
        return P.Ack(ref=str(m.policy_version), status="ok")

    def _on_sync_status(self, m: P.SyncStatusRequest) -> P.SyncStatus:
        results = self.sync_results.get(m.policy_version, {})
        return P.SyncStatus(policy_version=m.policy_version, done=sorted(s for s, ok in results.items() if ok),
                            failed=sorted(s for s, ok in results.items() if not ok),
                            pause_s=dict(self.sync_pauses.get(m.policy_version, {})))

    # ------------------------------------------------------------------ state, metrics
    def state(self) -> dict:
        """The whole control state (a checkpoint holds it; every iteration logs what changed)."""
        return self._control(self.ledger.state())

    def _control(self, ledger: dict) -> dict:
        """A ledger's state or changes with the service's own control state (trainer version, batch in
        transit), both always whole."""
        return {**ledger, "version": self.version,
                "in_transit": self.in_transit.record() if self.in_transit is not None else None}

    def checkpoint(self) -> dict:
        """First record of every WAL segment: supersedes every older control record."""
        return {"state": self._control(self.ledger.snapshot()), "seen": list(self.seen)[-SEEN_KEEP:]}

    def _remember(self, group_id: str) -> None:
        self.seen[group_id] = None
        if len(self.seen) > 2 * SEEN_KEEP:
            self.seen = dict.fromkeys(list(self.seen)[-SEEN_KEEP:])

    def stats(self) -> dict:
        return {**self.counts, "policy_version": self.version, "stored": len(self.store),
                "in_transit": self._in_transit_groups(), "stored_bytes": self.store.nbytes, "in_flight": self.ledger.in_flight, "started": self.ledger.started,
                "cursor_index": self.ledger.next_index, "cursor_epoch": self.ledger.epoch,
                "reissue_queue": len(self.ledger.reissue), "roster_size": len(self.roster),
                "pending_batches": len(self.pending), "wal_bytes": self.wal.disk_bytes,
                "wal_corrupt_records": self.wal.corrupt_records}
