"""StalenessPolicy (hand-computed admission table) and CreditLedger (cursor, leases)."""

from __future__ import annotations

import random

import msgspec
import pytest
from service_harness import Sink

from areal_like.settings.config import BufferConfig, RunConfig, TaskConfig
from areal_like.wire import protocol as P
from areal_like.wire.protocol import encode
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from buffer.credits import CreditLedger
from buffer.service import BufferService
from buffer.staleness import StaleBatchError, StalenessPolicy


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# eta, B, v, started, in_flight, max_inflight, expected capacity
# (the trainer consumed B per version: v * B)
ADMISSION = [
    (0, 4, 0, 0, 0, 64, 4),  # (0+0+1)*4 = 4 - 0
    (0, 4, 0, 4, 4, 64, 0),  # synchronous: the 5th group waits for v = 1
    (0, 4, 1, 4, 0, 64, 4),  # v = 1: (0+1+1)*4 = 8 - 4
    (0, 1, 5, 6, 0, 1, 0),  # (0+5+1)*1 = 6 - 6
    (1, 4, 0, 0, 0, 64, 8),  # (1+0+1)*4 = 8
    (1, 4, 0, 8, 8, 64, 0),  # one version ahead is full
    (1, 4, 1, 8, 4, 64, 4),  # (1+1+1)*4 = 12 - 8
    (2, 8, 3, 40, 10, 64, 8),  # (2+3+1)*8 = 48 - 40 = 8; in-flight room 54
    (4, 8, 0, 0, 0, 16, 16),  # staleness room 40, in-flight cap 16 binds
    (4, 8, 0, 30, 10, 16, 6),  # staleness room 40-30 = 10, in-flight room 16-10 = 6
    # over the limit (e.g. restored after a restart): 8-9 -> 0, never negative
    (3, 2, 0, 9, 0, 64, 0),
]


@pytest.mark.parametrize("eta,B,v,started,in_flight,cap,expected", ADMISSION)
def test_admission_table(eta, B, v, started, in_flight, cap, expected):
    policy = StalenessPolicy(max_staleness=eta, groups_per_step=B, max_inflight=cap)
    assert policy.capacity(v * B, started, in_flight) == expected


@pytest.mark.parametrize("eta,head,v,fresh", [(0, 3, 3, True), (0, 2, 3, False), (2, 1, 3, True),
                                               (2, 0, 3, False), (1, 5, 3, True)])
def test_is_fresh_and_check_batch_raises_on_a_stale_group(eta, head, v, fresh):
    policy = StalenessPolicy(eta, 4, 8)
    assert policy.is_fresh(head, v) is fresh
    policy.check_batch([v - eta, v, v], trainer_version=v)  # staleness eta, 0, 0
    if not fresh:
        with pytest.raises(StaleBatchError, match=f"head version {head} at trainer version {v}"):
            policy.check_batch([v, head], trainer_version=v)


def test_lease_expiry_and_reissue_with_a_fake_clock():
    clock = FakeClock(100.0)
    ledger = CreditLedger(StalenessPolicy(1, 4, 8), 50, lease_timeout_s=10.0, clock=clock)
    a = ledger.grant("server-a", 3)
    assert [(x.lease_id, x.prompt_index) for x in a] == [("L0", 0), ("L1", 1), ("L2", 2)]
    assert ledger.fulfil("L1") is not None  # delivered: not subject to expiry
    clock.t = 109.9
    assert ledger.expire() == []
    clock.t = 110.0
    assert sorted(x.lease_id for x in ledger.expire()) == ["L0", "L2"]
    assert ledger.started == 1 and ledger.in_flight == 0  # the two slots came back
    b = ledger.grant("server-b", 3)
    # same prompts again first, new lease ids, then the cursor moves on (no repeat, no skip)
    assert [(x.lease_id, x.prompt_index, x.server_id) for x in b] == [
        ("L3", 0, "server-b"), ("L4", 2, "server-b"), ("L5", 3, "server-b")]
    assert all(x.deadline == 120.0 for x in b)
    assert ledger.fulfil("L0") is None  # the expired lease is gone for good


def test_cursor_wraps_into_epochs_and_stops_at_max_epochs():
    ledger = CreditLedger(StalenessPolicy(10, 10, 100), 3, lease_timeout_s=1, max_epochs=2,
                          clock=FakeClock())
    got = [(x.prompt_index, x.epoch) for x in ledger.grant("s", 10)]
    assert got == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert ledger.exhausted and ledger.grant("s", 10) == []


def test_state_round_trip_neither_repeats_nor_skips():
    clock = FakeClock(0.0)
    ledger = CreditLedger(StalenessPolicy(1, 2, 8), 10, lease_timeout_s=5.0, clock=clock)
    first = ledger.grant("s", 3)
    ledger.fulfil(first[0].lease_id)
    ledger.cancel(first[1].lease_id)  # rejected: prompt 1 queued for re-issue
    state = ledger.state()
    clock.t = 1000.0  # much later: restored leases get a fresh timeout, not an instant expiry
    restored = CreditLedger(StalenessPolicy(1, 2, 8), 10, lease_timeout_s=5.0, clock=clock)
    restored.load_state(state)
    assert restored.state() == state
    assert restored.expire() == [] and restored.leases["L2"].deadline == 1005.0
    again = restored.grant("t", 2)
    assert [(x.lease_id, x.prompt_index) for x in again] == [("L3", 1), ("L4", 3)]


# -------------------------------------------------------- the service's books, under random traffic

def _group(credit, server_id: str, version: int, rewards):
    trajs = [Trajectory.of(prompt_ids=as_i32([1]), output_ids=as_i32([2, 3]),
                           behav_logp=as_f32([-1, -1]), versions=as_i32([version, version]),
                           reward=float(r), finish_reason="stop") for r in rewards]
    return P.TrajectoryGroup(group_id=f"{server_id}-{credit.lease_id}", server_id=server_id,
                             lease_id=credit.lease_id, prompt_index=credit.prompt_index,
                             epoch=credit.epoch, trajectories=trajs)


OPS = {"credits": 3, "deliver": 4, "redeliver": 1, "batch": 2, "lost_batch": 1, "bump": 1,
       "tick": 1, "heartbeat": 1, "restart": 1}  # weights


@pytest.mark.parametrize("seed", range(20))
def test_change_records_rebuild_the_state(seed):
    """Snapshot plus every later change record rebuilds the ledger, however cut."""
    rng, clock = random.Random(seed), FakeClock(0.0)
    ledger = CreditLedger(StalenessPolicy(2, 3, 12), 7, lease_timeout_s=5.0,
                          max_epochs=rng.choice([0, 3]), clock=clock)
    replica = CreditLedger(StalenessPolicy(2, 3, 12), 7, lease_timeout_s=5.0, clock=clock)
    given_back = 0
    for step in range(300):
        op = rng.choice(["grant", "grant", "fulfil", "cancel", "drop", "expire", "tick", "record",
                         "snapshot"])
        leases = list(ledger.leases)
        if op == "grant":
            ledger.grant(rng.choice("ab"), rng.randint(1, 4))
            if rng.random() < 0.3:
                ledger.consume(rng.randint(0, 3))
        elif op in ("fulfil", "cancel") and leases:
            getattr(ledger, op)(rng.choice(leases))
        elif op == "drop" and ledger.started > len(ledger.leases) + given_back:
            # a stored group is dropped
            ledger.give_back(rng.randint(0, 6), 0, reissue=rng.random() < 0.5)
            given_back += 1
        elif op == "expire":
            ledger.expire()
        elif op == "tick":
            clock.t += rng.choice([1.0, 3.0])
        elif op == "record":  # what the WAL gets: msgpack, as written
            replica.apply_changes(
                msgspec.msgpack.decode(msgspec.msgpack.encode(ledger.take_changes())))
            assert replica.state() == ledger.state(), step
        elif op == "snapshot":  # a checkpoint: the replica starts over from it
            replica.load_state(ledger.snapshot())
    replica.apply_changes(ledger.take_changes())
    assert replica.state() == ledger.state()


def test_a_change_record_costs_what_changed_not_what_is_outstanding():
    """With 4,096 leases out, one grant and one close log two lease entries."""
    ledger = CreditLedger(StalenessPolicy(10_000, 8, 100_000), 10**6, lease_timeout_s=60.0,
                          clock=FakeClock())
    for s in range(64):
        ledger.grant(f"rollout-server-{s:02d}", 64)
    ledger.take_changes()
    ledger.fulfil("L17")
    ledger.grant("rollout-server-99", 1)
    changes = ledger.take_changes()
    assert ((changes["granted"], changes["closed"])
            == ([["L4096", 4096, 0, "rollout-server-99"]], ["L17"]))
    assert (len(msgspec.msgpack.encode(changes)) < 150 < 100_000
            < len(msgspec.msgpack.encode(ledger.state())))


@pytest.mark.parametrize("seed", range(12))
def test_books_balance_under_random_traffic(seed, tmp_path):
    """Random traffic (fake clock, restarts): slots and prompts always accounted, nothing stale."""
    rng = random.Random(seed)
    clock = FakeClock(0.0)
    cfg = RunConfig(run_dir=str(tmp_path), task=TaskConfig(num_prompts=7), buffer=BufferConfig(
        max_staleness=rng.choice([0, 1, 2]), groups_per_step=rng.choice([1, 2, 3]),
        max_inflight=6, capacity=8,
        lease_timeout_s=10.0, heartbeat_timeout_s=1000.0, filter_equal_rewards=rng.random() < 0.5,
        stale_policy="reissue"))
    svc = BufferService.from_run(cfg, clock=clock)
    svc.recover()
    svc.server, svc.publisher = Sink(), Sink()
    consumed: list = []
    in_transit: list = []  # the last batch received, not yet acked
    last_batch = ""
    held: list = []  # (credit, server) not yet delivered
    delivered: list = []
    v = 0

    def step(msg, frame=b""):
        svc.handle(b"trainer-ws-test", b"req", msg, frame)
        svc.settle()
        svc.wal.wait_durable()
        svc.send_durable()

    for sid in ("a", "b"):
        step(P.Register(server_id=sid, engine_url="http://x", policy_version=0))
    for _ in range(120):
        (op,) = rng.choices(list(OPS), weights=list(OPS.values()))
        sid = rng.choice(["a", "b"])
        if op == "credits":
            step(P.CreditRequest(server_id=sid, max_credits=rng.randint(1, 4)))
            reply = svc.server.sent[-1]
            held += [(c, sid, v) for c in reply.credits]
        elif op in ("deliver", "redeliver") and (held if op == "deliver" else delivered):
            pool = held if op == "deliver" else delivered
            credit, owner, gen_v = (pool.pop(rng.randrange(len(pool))) if op == "deliver"
                                    else rng.choice(pool))
            group = _group(credit, owner, gen_v, rng.choice([(0.0, 1.0), (1.0, 1.0)]))
            step(group, encode(group))
            if op == "deliver":
                delivered.append((credit, owner, gen_v))
        elif op in ("batch", "lost_batch"):
            ack = last_batch if op == "batch" else ""
            step(P.BatchRequest(n_groups=cfg.buffer.groups_per_step, trainer_version=v, wait_s=0.0,
                                ack_batch=ack))
            batch = svc.server.sent[-1]
            assert all(v - g.head_version <= cfg.buffer.max_staleness for g in batch.groups)
            if ack:
                consumed += in_transit
            in_transit, last_batch = [], ack
            if batch.groups:
                in_transit, last_batch = ([(g.prompt_index, g.epoch) for g in batch.groups],
                                          batch.batch_id)
                v += 1
                step(P.VersionUpdate(policy_version=v))
        elif op == "bump":  # the trainer moves on without a batch from us: stored groups age
            v += 1
            step(P.VersionUpdate(policy_version=v))
        elif op == "tick":
            clock.t += rng.choice([1.0, 1.0, 1.0, 11.0])  # sometimes past every lease deadline
            step(P.StatsRequest())
        elif op == "heartbeat":
            step(P.Heartbeat(server_id=sid, policy_version=v))
        elif op == "restart":  # a clean crash: what the WAL holds is all that survives
            before = (svc.state(), {g.group_id for g in svc.store.groups()}, svc.control.version)
            svc.wal.close()
            svc = BufferService.from_run(cfg, clock=clock)
            svc.recover()
            svc.server, svc.publisher = Sink(), Sink()
            assert (svc.state(), {g.group_id for g in svc.store.groups()},
                    svc.control.version) == before
            for server_id in ("a", "b"):  # the roster is soft state: servers re-register
                step(P.Register(server_id=server_id, engine_url="http://x", policy_version=v))
        ledger = svc.ledger
        assert ledger.started == ledger.in_flight + len(svc.store) + len(in_transit) + len(consumed)
        assert svc.handout.in_transit_groups() == len(in_transit)
        if not cfg.buffer.filter_equal_rewards:  # filtered prompts are deliberately not re-issued
            below = [(i, e) for e in range(ledger.epoch + 1)
                     for i in range(ledger.next_index if e == ledger.epoch
                                    else cfg.task.num_prompts)]
            places = (consumed + in_transit
                      + [(g.prompt_index, g.epoch) for g in svc.store.groups()]
                      + [(x.prompt_index, x.epoch) for x in ledger.leases.values()]
                      + list(ledger.reissue))
            assert sorted(places) == sorted(below)
    svc.wal.close()
    restarted = BufferService.from_run(cfg, clock=clock)  # the WAL alone rebuilds the same state
    restarted.recover()
    assert restarted.state() == svc.state() and restarted.control.version == svc.control.version
    assert ({g.group_id for g in restarted.store.groups()}
            == {g.group_id for g in svc.store.groups()})
    assert set(restarted.seen) == set(svc.seen)
    restarted.wal.close()
