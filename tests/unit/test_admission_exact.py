"""Admission counted against what was consumed: hand-built sequences of events through the buffer's
real request handling (fake sockets, a real WAL in tmp_path).

eta = 1, B = 2: at most (eta + 1) * B = 4 groups may be ahead of the trainer (in flight, stored or
in transit). AReaL's ``started < (eta + v + 1) * B`` lets a trainer restart that skips a version
label open the window by B, and a consumer other than the trainer close it by what it took; the
buffer counts consumed groups instead, so neither moves the bound.
"""

from __future__ import annotations

import numpy as np
from service_harness import start, step

from areal_like import protocol as P
from areal_like.config import BufferConfig
from areal_like.trajectory import Trajectory, as_f32, as_i32
from buffer.service import BufferService

ETA, B = 1, 2
TRAINER, STRAY = b"trainer-ws-t0", b"stray-c0ffee"


def _start(tmp_path) -> BufferService:
    return start(tmp_path, BufferConfig(max_staleness=ETA, groups_per_step=B, max_inflight=16, capacity=64,
                                        stale_policy="reissue"))


def _step(svc: BufferService, msg: P.Message, peer: bytes = TRAINER) -> P.Message:
    return step(svc, msg, peer)


def _deliver(svc: BufferService, n: int, version: int) -> None:
    for c in _step(svc, P.CreditRequest(server_id="s", max_credits=n)).credits:
        t = Trajectory.of(prompt_ids=as_i32([1]), output_ids=as_i32([2, 3]), behav_logp=as_f32([-1, -1]),
                         versions=as_i32(np.full(2, version)), reward=1.0, finish_reason="stop")
        g = P.TrajectoryGroup(group_id=f"s-{c.lease_id}", server_id="s", lease_id=c.lease_id,
                              prompt_index=c.prompt_index, epoch=c.epoch, trajectories=[t])
        assert _step(svc, g).status == "accepted"


def _ahead(svc: BufferService) -> int:
    return svc.ledger.in_flight + len(svc.store) + svc.handout.in_transit_groups()


def test_a_restart_that_skips_a_version_label_does_not_open_the_window(tmp_path):
    svc = _start(tmp_path)
    _step(svc, P.Register(server_id="s", engine_url="http://x", policy_version=0))
    _deliver(svc, 10, 0)
    assert (svc.ledger.started, svc.ledger.available()) == (4, 0)  # (eta + 1) * B ahead, the window is full
    first = _step(svc, P.BatchRequest(n_groups=B, trainer_version=0, wait_s=0))
    _step(svc, P.VersionUpdate(policy_version=1))
    second = _step(svc, P.BatchRequest(n_groups=B, trainer_version=1, wait_s=0, ack_batch=first.batch_id))
    assert len(second.groups) == B and svc.ledger.consumed == B and svc.ledger.available() == B
    _step(svc, P.Heartbeat(server_id="s", policy_version=1))
    _deliver(svc, 10, 1)
    assert _ahead(svc) == 4 and svc.ledger.available() == 0
    # the trainer dies after announcing 2 with the second batch's step; it restarts from the checkpoint
    # that holds the first batch, skips label 2 (it named the lost weights) and announces 3
    _step(svc, P.VersionUpdate(policy_version=2))
    _step(svc, P.VersionUpdate(policy_version=3))
    # at version 3 the stored head-0 groups are stale (dropped, slots back); what is ahead plus what
    # may start is still (eta + 1) * B, where (eta + v + 1) * B - started would admit 2 * B more
    old_rule = (ETA + 3 + 1) * B - svc.ledger.started
    assert _ahead(svc) + svc.ledger.available() == (ETA + 1) * B and old_rule - svc.ledger.available() == 2 * B
    third = _step(svc, P.BatchRequest(n_groups=B, trainer_version=3, wait_s=0, ack_batch=first.batch_id))
    # the lost batch (head 0) came back: stale at version 3, dropped with its slots; nothing fresh yet
    assert third.groups == [] and svc.ledger.consumed == B
    assert _ahead(svc) + svc.ledger.available() == (ETA + 1) * B
    svc.wal.close()


def test_a_stray_consumer_neither_shrinks_the_window_nor_starves_the_trainer(tmp_path):
    svc = _start(tmp_path)
    _step(svc, P.Register(server_id="s", engine_url="http://x", policy_version=0))
    _deliver(svc, 10, 0)
    stray = _step(svc, P.BatchRequest(n_groups=B, trainer_version=0, wait_s=0), peer=STRAY)
    _step(svc, P.BatchRequest(n_groups=1, trainer_version=0, wait_s=0, ack_batch=stray.batch_id), peer=STRAY)
    # the stray consumer took 2 (acked) and holds 1 in transit: those 2 left the pipeline, so 2 new
    # groups may start; under (eta + v + 1) * B at v = 0 none could until the trainer moved on
    assert svc.ledger.consumed == B and svc.ledger.available() == B
    _deliver(svc, 10, 0)
    assert _ahead(svc) == (ETA + 1) * B and svc.ledger.available() == 0
    batch = _step(svc, P.BatchRequest(n_groups=B, trainer_version=0, wait_s=0))  # the stray's 1 is back
    assert len(batch.groups) == B
    svc.wal.close()


def test_consumption_is_durable(tmp_path):
    svc = _start(tmp_path)
    _step(svc, P.Register(server_id="s", engine_url="http://x", policy_version=0))
    _deliver(svc, 10, 0)
    first = _step(svc, P.BatchRequest(n_groups=B, trainer_version=0, wait_s=0))
    _step(svc, P.VersionUpdate(policy_version=1))
    _step(svc, P.BatchRequest(n_groups=1, trainer_version=1, wait_s=0, ack_batch=first.batch_id))
    state = (svc.ledger.consumed, svc.ledger.available())
    svc.wal.close()
    again = _start(tmp_path)
    assert (again.ledger.consumed, again.ledger.available()) == state == (B, B)
    again.wal.close()
