"""Admission counted against what was consumed, through the buffer's real request handling
(eta = 1, B = 2: at most 4 groups ahead of the trainer; a server d versions behind: d fewer)."""

from __future__ import annotations

import pytest
from service_harness import answer, start, step

from areal_like.settings.config import BufferConfig
from areal_like.wire import protocol as P
from buffer.service import BufferService
from buffer.staleness import StalenessPolicy

ETA, B = 1, 2
TRAINER, STRAY = b"trainer-ws-t0", b"stray-c0ffee"
CONFIG = BufferConfig(max_staleness=ETA, groups_per_step=B, max_inflight=16, capacity=64,
                      stale_policy="reissue")


def _start(tmp_path, delivered: int = 10) -> BufferService:
    """The service with server s registered at version 0 and ``delivered`` groups sent."""
    svc = start(tmp_path, CONFIG)
    _step(svc, P.Register(server_id="s", engine_url="http://x", policy_version=0))
    _deliver(svc, delivered, 0)
    return svc


def _step(svc: BufferService, msg: P.Message, peer: bytes = TRAINER) -> P.Message:
    return step(svc, msg, peer)


def _deliver(svc: BufferService, n: int, version: int) -> None:
    for c in _step(svc, P.CreditRequest(server_id="s", max_credits=n)).credits:
        assert _step(svc, answer(c, version)).status == "accepted"


def _ahead(svc: BufferService) -> int:
    return svc.ledger.in_flight + len(svc.store) + svc.handout.in_transit_groups()


def test_a_restart_that_skips_a_version_label_does_not_open_the_window(tmp_path):
    svc = _start(tmp_path)
    # (eta + 1) * B ahead, the window is full
    assert (svc.ledger.started, svc.ledger.available()) == (4, 0)
    first = _step(svc, P.BatchRequest(n_groups=B, trainer_version=0, wait_s=0))
    _step(svc, P.VersionUpdate(policy_version=1))
    second = _step(svc, P.BatchRequest(n_groups=B, trainer_version=1, wait_s=0,
                                       ack_batch=first.batch_id))
    assert len(second.groups) == B and svc.ledger.consumed == B and svc.ledger.available() == B
    _step(svc, P.Heartbeat(server_id="s", policy_version=1))
    _deliver(svc, 10, 1)
    assert _ahead(svc) == 4 and svc.ledger.available() == 0
    # a trainer that jumps from 1 to 3 without consuming a batch in between (a resumed trainer
    # whose checkpoint is ahead of the buffer, or one that took a fresh label for its weights):
    # taken whole
    assert _step(svc, P.VersionUpdate(policy_version=3)).status == "ok"
    assert svc.control.version == 3
    # at version 3 the stored head-0 groups are stale (dropped, slots back); what is ahead plus what
    # may start is still (eta + 1) * B, where (eta + v + 1) * B - started would admit 2 * B more
    old_rule = (ETA + 3 + 1) * B - svc.ledger.started
    assert (_ahead(svc) + svc.ledger.available() == (ETA + 1) * B
            and old_rule - svc.ledger.available() == 2 * B)
    third = _step(svc, P.BatchRequest(n_groups=B, trainer_version=3, wait_s=0,
                                      ack_batch=first.batch_id))
    # the lost batch (head 0) came back: stale at version 3, dropped with its slots;
    # nothing fresh yet
    assert third.groups == [] and svc.ledger.consumed == B
    assert _ahead(svc) + svc.ledger.available() == (ETA + 1) * B
    svc.wal.close()


def test_a_stray_consumer_neither_shrinks_the_window_nor_starves_the_trainer(tmp_path):
    svc = _start(tmp_path)
    stray = _step(svc, P.BatchRequest(n_groups=B, trainer_version=0, wait_s=0), peer=STRAY)
    _step(svc, P.BatchRequest(n_groups=1, trainer_version=0, wait_s=0, ack_batch=stray.batch_id),
          peer=STRAY)
    # the stray consumer took 2 (acked) and holds 1 in transit: those 2 left the pipeline, so 2 new
    # groups may start; under (eta + v + 1) * B at v = 0 none could until the trainer moved on
    assert svc.ledger.consumed == B and svc.ledger.available() == B
    _deliver(svc, 10, 0)
    assert _ahead(svc) == (ETA + 1) * B and svc.ledger.available() == 0
    # the stray's 1 is back
    batch = _step(svc, P.BatchRequest(n_groups=B, trainer_version=0, wait_s=0))
    assert len(batch.groups) == B
    svc.wal.close()


# eta, B, lambda (designed lag), lag (this engine's now), consumed -> admission limit, by hand
LIMITS = [
    (4, 8, 0, 0, 400, 440),  # 400 + (4 - 0 + 1) * 8
    (4, 8, 0, 1, 400, 432),  # missed one sync: 400 + (4 - 1 + 1) * 8
    (4, 8, 0, 4, 400, 408),  # eta behind: one batch, consumed at once to stay within eta
    (4, 8, 2, 1, 400, 424),  # behind by less than designed: lambda's window, 400 + (4 - 2 + 1) * 8
    (4, 8, 2, 3, 400, 416),  # behind by more: 400 + (4 - 3 + 1) * 8
    (1, 2, 0, 1, 2, 4),  # the sequence below: 2 + (1 - 1 + 1) * 2
]


@pytest.mark.parametrize("eta,b,lam,lag,consumed,limit", LIMITS)
def test_admission_limit_shrinks_by_an_engines_lag(eta, b, lam, lag, consumed, limit):
    policy = StalenessPolicy(max_staleness=eta, groups_per_step=b, max_inflight=64, engine_lag=lam)
    assert policy.admission_limit(consumed, lag) == limit
    assert policy.engine_lag_of(eta - lag, eta) == lag and policy.engine_lag_of(-1, eta) == 0


def test_an_engine_that_missed_a_sync_starts_no_group_that_would_go_stale(tmp_path):
    svc = _start(tmp_path)
    first = _step(svc, P.BatchRequest(n_groups=B, trainer_version=0, wait_s=0))
    _step(svc, P.VersionUpdate(policy_version=1))  # the engine missed this sync: it still serves 0
    second = _step(svc, P.BatchRequest(n_groups=B, trainer_version=1, wait_s=0,
                                       ack_batch=first.batch_id))
    assert len(second.groups) == B and svc.ledger.consumed == B and svc.ledger.started == 2 * B
    # B slots are free, but what the engine starts now has head 0 and is trained at version 2 at the
    # earliest (second is in transit): staleness 2 > eta. Under the full window it got B credits,
    # and both groups were dropped as stale at version 2.
    refused = _step(svc, P.CreditRequest(server_id="s", max_credits=10))
    assert refused.credits == [] and refused.reason == "staleness"
    _step(svc, P.Heartbeat(server_id="s", policy_version=1))  # the next sync reached it
    _deliver(svc, 10, 1)
    assert svc.ledger.started == 3 * B
    _step(svc, P.VersionUpdate(policy_version=2))
    third = _step(svc, P.BatchRequest(n_groups=B, trainer_version=2, wait_s=0,
                                      ack_batch=second.batch_id))
    assert len(third.groups) == B and svc.instruments.counts.get("groups_dropped_stale", 0) == 0
    svc.wal.close()


# the second batch handed out at once (in transit), or its request waiting (an overlapped sync)
@pytest.mark.parametrize("delivered, pending, admitted", [(10, 0, 0), (B, 1, B)])
def test_the_lag_counts_from_a_batch_asked_for_before_its_version_was_announced(
        tmp_path, delivered, pending, admitted):
    svc = _start(tmp_path, delivered)
    first = _step(svc, P.BatchRequest(n_groups=B, trainer_version=0, wait_s=0))
    ask = P.BatchRequest(n_groups=B, trainer_version=1, wait_s=60, ack_batch=first.batch_id)
    frame = P.encode(ask)
    svc.handle(TRAINER, b"req", P.decode(frame), frame)
    svc.settle()
    assert len(svc.handout.pending) == pending and svc.ledger.consumed == B
    assert svc.handout.in_transit_groups() == B - pending * B and svc.control.version == 0
    # what the engine (still version 0) starts now is trained at version 2 at the earliest: 2 > eta
    # (waiting, B may start, not 2B)
    credits = _step(svc, P.CreditRequest(server_id="s", max_credits=10))
    assert len(credits.credits) == admitted and (admitted or credits.reason == "staleness")
    if not admitted:
        _step(svc, P.Heartbeat(server_id="s", policy_version=1))  # the sync landed
        assert len(_step(svc, P.CreditRequest(server_id="s", max_credits=10)).credits) == B
    svc.wal.close()
