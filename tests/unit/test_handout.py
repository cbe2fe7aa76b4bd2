"""Batch hand-out (buffer/handout.py): in transit until the next request acks it, or back."""

from __future__ import annotations

import errno
import os
import struct

import crc32c
import numpy as np
import pytest
from service_harness import answer, start, step

import buffer.wal
from areal_like.settings.config import BufferConfig
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from buffer.service import BufferService


def _start(tmp_path) -> BufferService:
    return start(tmp_path, BufferConfig(max_staleness=1, groups_per_step=2, max_inflight=16,
                                        capacity=64))


def _fill(svc: BufferService, n: int) -> list[str]:
    step(svc, P.Register(server_id="s", engine_url="http://x", policy_version=0))
    ids = []
    for c in step(svc, P.CreditRequest(server_id="s", max_credits=n)).credits:
        g = answer(c)
        assert step(svc, g).status == "accepted"
        ids.append(g.group_id)
    return ids


def _ask(svc: BufferService, ack: str = "", n: int = 2) -> P.Batch:
    return step(svc, P.BatchRequest(n_groups=n, trainer_version=0, wait_s=0.0, ack_batch=ack))


def test_in_transit_until_acked_and_put_back_by_a_request_without_the_ack(tmp_path):
    svc = _start(tmp_path)
    ids = _fill(svc, 4)
    first = _ask(svc)
    assert first.batch_id and [g.group_id for g in first.groups] == ids[:2]
    assert (len(svc.store), svc.handout.in_transit_groups(),
            svc.instruments.counts["groups_consumed"]) == (2, 2, 0)
    second = _ask(svc, ack=first.batch_id)  # acks the first, takes the next two
    assert [g.group_id for g in second.groups] == ids[2:] and second.batch_id != first.batch_id
    assert (len(svc.store), svc.handout.in_transit_groups(),
            svc.instruments.counts["groups_consumed"]) == (0, 2, 2)
    assert svc.instruments.counts["batches_redelivered"] == 0
    again = _ask(svc)  # a restarted trainer acks nothing: the batch never arrived
    assert (sorted(g.group_id for g in again.groups) == sorted(ids[2:])
            and again.batch_id != second.batch_id)
    assert (svc.instruments.counts["batches_redelivered"] == 1
            and svc.instruments.counts["groups_redelivered"] == 2)
    stale_ack = _ask(svc, ack=second.batch_id)  # an older id: the reply to `again` was lost too
    assert sorted(g.group_id for g in stale_ack.groups) == sorted(ids[2:])
    assert (svc.instruments.counts["batches_redelivered"] == 2
            and svc.instruments.counts["groups_consumed"] == 2)
    empty = _ask(svc, ack=stale_ack.batch_id)
    assert (empty.groups == [] and empty.batch_id == ""
            and svc.instruments.counts["groups_consumed"] == 4)
    assert svc.handout.in_transit is None and svc.state()["in_transit"] is None
    svc.wal.close()
    restarted = _start(tmp_path)  # the WAL agrees: everything consumed
    assert len(restarted.store) == 0 and restarted.handout.in_transit is None
    restarted.wal.close()


def test_wal_replay_restores_the_batch_in_transit(tmp_path):
    svc = _start(tmp_path)
    ids = _fill(svc, 4)
    first = _ask(svc)
    svc.wal.close()  # a crash after the hand-out: the WAL alone survives

    received = _start(tmp_path)  # the trainer got it: its ack consumes it, no double training
    assert (received.handout.in_transit is not None
            and received.handout.in_transit.batch_id == first.batch_id)
    assert (len(received.store), received.handout.in_transit_groups()) == (2, 2)
    nxt = _ask(received, ack=first.batch_id)
    assert ([g.group_id for g in nxt.groups] == ids[2:]
            and received.instruments.counts["groups_consumed"] == 2)
    received.wal.close()

    # restart again with `nxt` in transit; this time the trainer never got it
    svc = _start(tmp_path)
    assert svc.handout.in_transit.batch_id == nxt.batch_id
    again = _ask(svc)
    assert sorted(g.group_id for g in again.groups) == sorted(ids[2:])
    assert svc.instruments.counts["batches_redelivered"] == 1
    # returned again, unacked, they are checked for staleness again: eta = 1, head 0 at version 2
    step(svc, P.VersionUpdate(policy_version=2))
    batch = step(svc, P.BatchRequest(n_groups=2, trainer_version=2, wait_s=0.0))
    assert (batch.groups == [] and svc.instruments.counts["groups_dropped_stale"] == 2
            and svc.instruments.counts["groups_redelivered"] == 4)
    svc.wal.close()


def test_stored_groups_live_in_the_wal_and_come_back_whole(tmp_path):
    """The sender's frame is what the WAL stores and the Batch carries, spliced."""
    svc = _start(tmp_path)
    step(svc, P.Register(server_id="s", engine_url="http://x", policy_version=0))
    sent = []
    for k, c in enumerate(step(svc, P.CreditRequest(server_id="s", max_credits=2)).credits):
        t = Trajectory.of(prompt_ids=as_i32([k, 5]), output_ids=as_i32(np.arange(k, k + 7)),
                         behav_logp=as_f32(np.linspace(-1, -0.5, 7)), versions=as_i32(np.zeros(7)),
                         reward=float(k), finish_reason="stop")
        sent.append(P.TrajectoryGroup(group_id=f"s-{c.lease_id}",
                                      server_id="s", lease_id=c.lease_id,
                                      prompt_index=c.prompt_index, epoch=c.epoch, trajectories=[t]))
        # as a rollout server sends it: encoded once, asking for a lease with the ack
        submit = P.GroupSubmit(group=P.encode_group(sent[-1]), want_credits=1)
        assert step(svc, submit).status == "accepted"
    # no frame kept in memory: each is read back from the WAL
    assert all(s.ref is not None for s in svc.store.groups())
    batch = _ask(svc)
    # handed out as stored, which is what its sender encoded: each group's bytes verbatim
    frame = svc.server.frames[-1]
    assert all(frame.count(bytes(P.encode_group(g))) == 1 for g in sent)
    for got, want in zip(batch.groups, sent, strict=True):
        assert ((got.group_id, got.prompt_index, got.trajectories[0].reward)
                == (want.group_id, want.prompt_index, want.trajectories[0].reward))
        np.testing.assert_array_equal(got.trajectories[0].output_ids,
                                      want.trajectories[0].output_ids)
        np.testing.assert_array_equal(got.trajectories[0].behav_logp,
                                      want.trajectories[0].behav_logp)
    svc.wal.close()


def test_a_record_damaged_on_disk_is_dropped_and_the_daemon_keeps_serving(tmp_path):
    svc = _start(tmp_path)
    ids = _fill(svc, 4)
    victim = next(s for s in svc.store.groups() if s.group_id == ids[0])
    segment = svc.wal.dir / f"seg-{victim.ref.segment:012d}.wal"
    # flip one byte in the middle of the record: its CRC no longer matches
    with open(segment, "r+b") as f:
        f.seek(victim.ref.offset + victim.ref.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    # this pass drops the damaged group; the request stays held for the next pass of the loop
    _ask(svc)
    svc.settle()
    svc.wal.wait_durable()
    svc.send_durable()
    batch = svc.server.sent[-1]
    first = [g.group_id for g in batch.groups]
    assert len(first) == 2 and set(first) < set(ids[1:])  # the damaged group is never handed out
    assert svc.instruments.counts["groups_dropped_unreadable"] == 1
    # its prompt goes out again; one group stays
    assert len(svc.ledger.reissue) == 1 and len(svc.store) == 1
    last = _ask(svc, ack=batch.batch_id, n=1).groups[0].group_id
    assert sorted([*first, last]) == sorted(ids[1:])  # every readable group exactly once
    svc.wal.close()


def test_a_transient_read_error_never_drops_an_intact_group(tmp_path, monkeypatch):
    """EMFILE/ENOMEM reading a record stops the daemon; no intact group is dropped."""
    svc = _start(tmp_path)
    ids = _fill(svc, 4)
    real_open = os.open

    def no_fds(path, flags, *args):
        # a reader, direct or not
        if str(path).endswith(".wal") and flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args)

    with monkeypatch.context() as out_of_fds:
        out_of_fds.setattr(buffer.wal.os, "open", no_fds)
        with pytest.raises(OSError) as raised:
            _ask(svc)
    assert raised.value.errno == errno.EMFILE
    assert svc.instruments.counts["groups_dropped_unreadable"] == 0 and not svc.ledger.reissue
    svc.wal.close()
    restarted = _start(tmp_path)
    assert sorted(s.group_id for s in restarted.store.groups()) == sorted(ids)
    restarted.wal.close()


def _make_undecodable(wal_dir, ref) -> None:
    """Overwrite a group record's frame with non-msgpack bytes, CRC kept valid."""
    path = wal_dir / f"seg-{ref.segment:012d}.wal"
    data = bytearray(path.read_bytes())
    start, end = ref.offset + 8, ref.offset + ref.length
    (n,) = struct.unpack_from("<H", data, start + 1)
    data[start + 3 + n:end] = b"\xc1" * (end - start - 3 - n)
    struct.pack_into("<I", data, ref.offset + 4, crc32c.crc32c(bytes(data[start:end])))
    path.write_bytes(data)


def test_a_group_that_no_longer_decodes_at_replay_is_dropped_and_stops_pinning_its_segment(
        tmp_path, caplog):
    svc = _start(tmp_path)
    ids = _fill(svc, 2)
    victim = next(s for s in svc.store.groups() if s.group_id == ids[0])
    (credit,) = step(svc, P.CreditRequest(server_id="s", max_credits=1)).credits
    started = svc.ledger.started
    # a group logged before its lease closed (no state record follows: a crash), undecodable
    svc.wal.append_group(f"s-{credit.lease_id}", b"\xc1" * 16)
    svc.wal.close()
    _make_undecodable(svc.wal.dir, victim.ref)

    restarted = _start(tmp_path)
    assert [s.group_id for s in restarted.store.groups()] == ids[1:]
    assert (restarted.instruments.counts["groups_dropped_unreadable"] == 2
            and restarted.ledger.in_flight == 0)  # the open lease came back too
    reissued = [(victim.prompt_index, victim.epoch), (credit.prompt_index, credit.epoch)]
    assert list(restarted.ledger.reissue) == reissued
    assert restarted.ledger.started == started - 2
    assert (f"seg-{victim.ref.segment:012d}.wal" in caplog.text
            and f"offset {victim.ref.offset}" in caplog.text)
    batch = _ask(restarted, n=1)
    assert [g.group_id for g in batch.groups] == ids[1:]
    _ask(restarted, ack=batch.batch_id, n=1)  # the other group of that segment is consumed too
    restarted.wal.close()

    again = _start(tmp_path)  # dropped once only; its segment is gone, with its read-only fd
    assert again.instruments.counts["groups_dropped_unreadable"] == 0
    assert list(again.ledger.reissue) == reissued and again.ledger.started == started - 2
    assert victim.ref.segment not in again.wal.segments()
    again.wal.close()


def test_a_flood_of_undecodable_frames_costs_one_log_line_and_is_counted_in_full(tmp_path, caplog):
    svc = _start(tmp_path)
    try:
        with caplog.at_level("WARNING", logger=svc.log.name):
            for _ in range(1000):  # what the transport hands over for a frame that does not decode
                svc.handle(b"peer", b"req",
                           P.ProtocolError("not a msgpack frame (ExtraData)", "frame"), b"\x93x")
                svc.settle()
        lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
        assert len(lines) == 1
        assert svc.metrics.registry.get_sample_value("areal_buffer_rejected_total",
                                                     {"reason": "decode"}) == 1000
    finally:
        svc.stop()
