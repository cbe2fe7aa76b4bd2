"""StalenessPolicy (admission formula, consume-time check) and CreditLedger (cursor, leases).

Admission: capacity = min(max_inflight - in_flight, (eta + v + 1) * B - started), never < 0.
Every row of the table below is computed by hand in its comment.
"""

from __future__ import annotations

import pytest

from buffer.credits import CreditLedger
from buffer.staleness import StaleBatchError, StalenessPolicy


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# eta, B, v, started, in_flight, max_inflight, expected capacity
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
    (3, 2, 0, 9, 0, 64, 0),  # over the limit (e.g. restored after a restart): 8-9 -> 0, never negative
]


@pytest.mark.parametrize("eta,B,v,started,in_flight,cap,expected", ADMISSION)
def test_admission_table(eta, B, v, started, in_flight, cap, expected):
    policy = StalenessPolicy(max_staleness=eta, groups_per_step=B, max_inflight=cap)
    assert policy.capacity(v, started, in_flight) == expected
    assert policy.admits(v, started, in_flight) == (expected > 0)


@pytest.mark.parametrize("eta,head,v,fresh", [(0, 3, 3, True), (0, 2, 3, False), (2, 1, 3, True),
                                               (2, 0, 3, False), (1, 5, 3, True)])
def test_is_fresh(eta, head, v, fresh):
    policy = StalenessPolicy(eta, 4, 8)
    assert policy.is_fresh(head, v) is fresh
    assert policy.staleness(head, v) == v - head


def test_check_batch_raises_on_a_stale_group():
    policy = StalenessPolicy(1, 4, 8)
    policy.check_batch([2, 3, 3], trainer_version=3)  # staleness 1, 0, 0
    with pytest.raises(StaleBatchError, match="head version 1 at trainer version 3"):
        policy.check_batch([3, 1], trainer_version=3)


def test_engine_older_than_the_bound_gets_no_credits():
    policy = StalenessPolicy(1, 4, 8)
    assert policy.engine_can_start(4, 5) and not policy.engine_can_start(3, 5)
    assert policy.engine_can_start(-1, 5)  # unknown version: trusted, checked at consumption


def test_eta_zero_is_synchronous():
    """Simulated: grant until admission stops, generate at the current version, consume B, step."""
    B = 3
    ledger = CreditLedger(StalenessPolicy(0, B, 64), 1000, lease_timeout_s=60, clock=FakeClock())
    for v in range(5):
        leases = ledger.grant("s", 100, v)
        assert len(leases) == B  # exactly one step's worth per version
        assert ledger.grant("s", 100, v) == []
        heads = []
        for lease in leases:
            ledger.fulfil(lease.lease_id)
            heads.append(v)  # generated entirely by the weights of version v
        ledger.policy.check_batch(heads, v)  # staleness 0 everywhere


def test_admission_bounds_in_flight_plus_stored():
    """started - consumed = in_flight + stored <= (eta + 1) * B at every version."""
    eta, B = 2, 4
    ledger = CreditLedger(StalenessPolicy(eta, B, 1000), 10_000, lease_timeout_s=60, clock=FakeClock())
    consumed = 0
    for v in range(6):
        for lease in ledger.grant("s", 1000, v):
            ledger.fulfil(lease.lease_id)
        assert ledger.started - consumed == (eta + 1) * B
        consumed += B  # the trainer takes one batch, publishes v + 1


def test_lease_expiry_and_reissue_with_a_fake_clock():
    clock = FakeClock(100.0)
    ledger = CreditLedger(StalenessPolicy(1, 4, 8), 50, lease_timeout_s=10.0, clock=clock)
    a = ledger.grant("server-a", 3, 0)
    assert [(x.lease_id, x.prompt_index) for x in a] == [("L0", 0), ("L1", 1), ("L2", 2)]
    assert ledger.fulfil("L1") is not None  # delivered: not subject to expiry
    clock.t = 109.9
    assert ledger.expire() == []
    clock.t = 110.0
    assert sorted(x.lease_id for x in ledger.expire()) == ["L0", "L2"]
    assert ledger.started == 1 and ledger.in_flight == 0  # the two slots came back
    b = ledger.grant("server-b", 3, 0)
    # same prompts again first, new lease ids, then the cursor moves on (no repeat, no skip)
    assert [(x.lease_id, x.prompt_index, x.server_id) for x in b] == [
        ("L3", 0, "server-b"), ("L4", 2, "server-b"), ("L5", 3, "server-b")]
    assert all(x.deadline == 120.0 for x in b)
    assert ledger.fulfil("L0") is None  # the expired lease is gone for good


def test_cursor_wraps_into_epochs_and_stops_at_max_epochs():
    ledger = CreditLedger(StalenessPolicy(10, 10, 100), 3, lease_timeout_s=1, max_epochs=2, clock=FakeClock())
    got = [(x.prompt_index, x.epoch) for x in ledger.grant("s", 10, 0)]
    assert got == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert ledger.exhausted and ledger.grant("s", 10, 0) == []


def test_state_round_trip_neither_repeats_nor_skips():
    clock = FakeClock(0.0)
    ledger = CreditLedger(StalenessPolicy(1, 2, 8), 10, lease_timeout_s=5.0, clock=clock)
    first = ledger.grant("s", 3, 0)
    ledger.fulfil(first[0].lease_id)
    ledger.cancel(first[1].lease_id)  # rejected: prompt 1 queued for re-issue
    state = ledger.state()
    clock.t = 1000.0  # much later: restored leases get a fresh timeout, not an instant expiry
    restored = CreditLedger(StalenessPolicy(1, 2, 8), 10, lease_timeout_s=5.0, clock=clock)
    restored.load_state(state)
    assert restored.state() == state
    assert restored.expire() == [] and restored.leases["L2"].deadline == 1005.0
    again = restored.grant("t", 2, 0)
    assert [(x.lease_id, x.prompt_index) for x in again] == [("L3", 1), ("L4", 3)]
