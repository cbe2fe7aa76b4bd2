"""kill -9 of the buffer daemon twice while three producers stream: every acked group is handed
out once, intact; the prompt cursor neither repeats nor skips; a torn last record is skipped; a
second buffer on the same WAL is refused while the first runs.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from areal_like.net.dealer import Client
from areal_like.net.distributed import free_port
from areal_like.net.transport import TransportTimeout
from areal_like.settings.config import (
    BufferConfig,
    ModelConfig,
    RunConfig,
    SecurityConfig,
    TaskConfig,
    to_yaml,
)
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32

# the daemons here talk to this test's plain sockets (CURVE: test_security)
PLAIN = SecurityConfig(curve=False)

N_PRODUCERS = 3
GROUPS_PER_PRODUCER = 50
KILL_AFTER_ACKS = (30, 100)  # total acks seen before each kill -9 (of 150)
TIMEOUT_S = 60.0  # whole-phase deadlines; generous for a loaded machine
PRODUCER_REQUEST_S = 1.5  # a dead buffer is noticed this fast; a live one answers in milliseconds

PRODUCER = """
import sys
sys.path.insert(0, {here!r})
from test_buffer_crash import produce
produce(*sys.argv[1:])
"""


def group_for(credit: P.Credit, server_id: str) -> P.TrajectoryGroup:
    """Content derived from the prompt index, so the test can verify it after the crashes."""
    k = credit.prompt_index
    trajs = [Trajectory.of(prompt_ids=as_i32([k, k + 1]),
                          output_ids=as_i32(np.arange(k, k + 6 + i)),
                          behav_logp=as_f32(np.full(6 + i, -0.25 * i)),
                          versions=as_i32(np.zeros(6 + i)),
                          reward=float(i), finish_reason="stop") for i in range(2)]
    return P.TrajectoryGroup(group_id=f"{server_id}-{credit.lease_id}", server_id=server_id,
                             lease_id=credit.lease_id, prompt_index=k, epoch=credit.epoch,
                             trajectories=trajs)


def produce(address: str, server_id: str, out_path: str, target: str) -> None:
    """A fake rollout server: register, lease, send, keep every group until acked."""
    client = Client(address, timeout_s=PRODUCER_REQUEST_S)
    out = open(out_path, "a")
    unacked: list[P.TrajectoryGroup] = []
    acked, registered = 0, False
    while acked < int(target):
        try:
            if not registered:
                client.request(P.Register(server_id=server_id, engine_url="http://x",
                                          policy_version=0))
                registered = True
            if not unacked:
                credits = client.request(P.CreditRequest(server_id=server_id, max_credits=3))
                # the buffer restarted: register again
                registered = credits.reason != "unknown_server"
                unacked = [group_for(c, server_id) for c in credits.credits]
                if not unacked:
                    time.sleep(0.05)
                continue
            ack = client.request(unacked[0])
        except TransportTimeout:
            continue  # the buffer is down or restarting: re-send the same group
        out.write(json.dumps({"group_id": ack.ref, "status": ack.status, "reason": ack.reason,
                              "prompt": unacked[0].prompt_index}) + "\n")
        out.flush()
        unacked.pop(0)
        acked += ack.status in ("accepted", "duplicate")
    client.close()


def stored_groups(address: str, timeout_s: float) -> list:
    """Every group the buffer at ``address`` stores, taken in one batch as the trainer would."""
    trainer = Client(address, timeout_s=timeout_s)
    try:
        stored = trainer.request(P.StatsRequest()).values["stored"]
        if stored == 0:  # a BatchRequest asks for at least one group
            return []
        return trainer.request(P.BatchRequest(n_groups=stored, trainer_version=0,
                                              wait_s=1.0)).groups
    finally:
        trainer.close()


def read_acks(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        if p.exists():
            rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


def test_kill9_mid_stream_loses_and_duplicates_nothing(tmp_run_dir, spawn_python, wait_until):
    # token ids are derived from prompt indices up to ~150: a vocabulary that covers them
    cfg = RunConfig(run_dir=str(tmp_run_dir), security=PLAIN, task=TaskConfig(num_prompts=100_000),
                    model=ModelConfig(vocab_size=1024), buffer=BufferConfig(
        address=f"tcp://127.0.0.1:{free_port()}", pub_address=f"tcp://127.0.0.1:{free_port()}",
        max_staleness=10_000, groups_per_step=1, capacity=10_000, lease_timeout_s=3.0,
        segment_bytes=16_384))
    config_file = tmp_run_dir / "config.yaml"
    config_file.write_text(to_yaml(cfg))

    def start_buffer():
        return spawn_python("buffer", ["--config-file", config_file], capture=False)

    buffer = start_buffer()
    outs = [tmp_run_dir / f"acks-{i}.jsonl" for i in range(N_PRODUCERS)]
    producers = [spawn_python(PRODUCER.format(here=str(Path(__file__).parent)),
                              [cfg.buffer.address, f"p{i}", outs[i], GROUPS_PER_PRODUCER],
                              capture=False)
                 for i in range(N_PRODUCERS)]
    for threshold in KILL_AFTER_ACKS:
        wait_until(lambda: len(read_acks(outs)) >= threshold, TIMEOUT_S, what=f"{threshold} acks")
        spawn_python.kill9(buffer)  # mid-stream: producers have groups in flight
        time.sleep(0.3)
        buffer = start_buffer()  # same run_dir, same addresses
    for p in producers:
        p.wait(timeout=TIMEOUT_S * 2)
        assert p.returncode == 0

    # a second buffer on the same WAL (same run_dir, other addresses) exits 3 naming the holder;
    # the restarts above show that after a kill -9 a new one starts
    other = copy.deepcopy(cfg)
    other.buffer.address, other.buffer.pub_address = (f"tcp://127.0.0.1:{free_port()}",
                                                      f"tcp://127.0.0.1:{free_port()}")
    (tmp_run_dir / "other.yaml").write_text(to_yaml(other))
    second = spawn_python("buffer", ["--config-file", tmp_run_dir / "other.yaml"])
    _, err = second.communicate(timeout=TIMEOUT_S)
    assert second.returncode == 3, err[-2000:]
    assert f"is in use by another buffer (pid {buffer.pid})" in err, err[-2000:]

    acks = read_acks(outs)
    acked = {r["group_id"] for r in acks if r["status"] in ("accepted", "duplicate")}
    assert len(acked) == N_PRODUCERS * GROUPS_PER_PRODUCER
    groups = stored_groups(cfg.buffer.address, TIMEOUT_S)
    delivered = [g.group_id for g in groups]
    assert len(delivered) == len(set(delivered)), "a group was stored twice"
    assert set(delivered) == acked, "an acked group was lost (or an unacked one appeared)"
    for g in groups:
        expected = group_for(P.Credit(lease_id=g.lease_id, prompt_index=g.prompt_index, epoch=0,
                                      deadline_s=0),
                             g.server_id)
        for got, want in zip(g.trajectories, expected.trajectories, strict=True):
            np.testing.assert_array_equal(got.output_ids, want.output_ids)
            np.testing.assert_array_equal(got.behav_logp, want.behav_logp)

    assert spawn_python.cleanup() is None  # SIGTERM: graceful stop, WAL closed
    from buffer.service import BufferService

    svc = BufferService.from_run(cfg)
    svc.recover()
    ledger = svc.ledger
    assert ledger.epoch == 0
    prompts = [g.prompt_index for g in groups] + [x.prompt_index for x in ledger.leases.values()] \
        + [i for i, _ in ledger.reissue]
    assert sorted(prompts) == list(range(ledger.next_index)), (
        "the cursor repeated or skipped a prompt")
    assert len(svc.store) == 0  # everything was consumed, and the consumption was durable
    svc.wal.close()

    # a crash mid-write leaves a torn record at the end of the newest segment: skipped, not fatal
    newest = max(Path(cfg.resolve_path(cfg.buffer.wal_dir)).glob("seg-*.wal"))
    with open(newest, "ab") as f:
        f.write((1000).to_bytes(4, "little") + b"\x00\x00\x00\x00" + b"torn")
    svc = BufferService.from_run(cfg)
    svc.recover()
    assert svc.wal.corrupt_records == 1 and svc.ledger.next_index == ledger.next_index
    svc.wal.close()


# a producer started by hand: python test_buffer_crash.py ADDRESS ID OUT N
if __name__ == "__main__":
    produce(*sys.argv[1:])
    os._exit(0)
