"""A WAL written by an earlier version of the buffer recovers to the same state (tests/fixtures/wal_old/).

The fixture was written by the buffer as it was before its WAL was rewritten: four groups accepted
for prompts 0-3 of six leased (L0-L5), the batch of prompts 0 and 1 handed out and acknowledged,
version 1 published, a clean stop; 1 KiB segments, so the log rotated and holds checkpoints and
change records; its groups are of protocol version 1, before loss masks, and read back as every
token generated. A ``python -m buffer`` started on a copy must serve what that state implies, over
the wire only (this test must not depend on the buffer's internals).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from areal_like import protocol as P
from areal_like.config import BufferConfig, RunConfig, SecurityConfig, TaskConfig, to_yaml
from areal_like.dealer import Client
from areal_like.distributed import free_port
from areal_like.trajectory import Trajectory, as_f32, as_i32

PLAIN = SecurityConfig(curve=False)  # the daemons here talk to this test's plain sockets (CURVE: test_security)

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "wal_old"
TIMEOUT_S = 60.0


def _group(lease_id: str, k: int) -> P.TrajectoryGroup:
    """The content the fixture's groups were written with (derived from the prompt index)."""
    trajs = [Trajectory.of(prompt_ids=as_i32([k, k + 1]), output_ids=as_i32(np.arange(k, k + 5 + i)),
                             behav_logp=as_f32(np.full(5 + i, -0.5 * (i + 1))), versions=as_i32(np.zeros(5 + i)),
                             reward=float(i), finish_reason="stop") for i in range(2)]
    return P.TrajectoryGroup(group_id=f"s0-{lease_id}", server_id="s0", lease_id=lease_id, prompt_index=k, epoch=0,
                             trajectories=trajs)


def test_a_wal_written_by_the_old_buffer_recovers(tmp_run_dir, spawn_python):
    shutil.copytree(FIXTURE, tmp_run_dir / "wal")
    cfg = RunConfig(run_dir=str(tmp_run_dir), security=PLAIN, task=TaskConfig(num_prompts=100), buffer=BufferConfig(
        address=f"tcp://127.0.0.1:{free_port()}", pub_address=f"tcp://127.0.0.1:{free_port()}",
        max_staleness=4, groups_per_step=2, segment_bytes=1024))
    (tmp_run_dir / "config.yaml").write_text(to_yaml(cfg))
    spawn_python("buffer", ["--config-file", tmp_run_dir / "config.yaml"], capture=False)
    client = Client(cfg.buffer.address, timeout_s=TIMEOUT_S)
    try:
        s = client.request(P.StatsRequest()).values
        assert (s["policy_version"], s["cursor_index"], s["cursor_epoch"]) == (1, 6, 0)
        assert (s["stored"], s["in_transit"], s["in_flight"], s["started"], s["reissue_queue"]) == (2, 0, 2, 6, 0)
        assert s["wal_corrupt_records"] == 0
        client.request(P.Register(server_id="s0", engine_url="http://x", policy_version=1))
        for consumed in ((0, "L0"), (3, "L3")):  # acked before: duplicates, stored once
            assert client.request(_group(consumed[1], consumed[0])).status == "duplicate"
        assert client.request(_group("L4", 4)).status == "accepted"  # a restored lease is still valid
        batch = client.request(P.BatchRequest(n_groups=3, trainer_version=1, wait_s=5))
        assert [g.group_id for g in batch.groups] == ["s0-L2", "s0-L3", "s0-L4"]
        for got in batch.groups:
            want = _group(got.lease_id, got.prompt_index)
            for a, b in zip(got.trajectories, want.trajectories, strict=True):
                np.testing.assert_array_equal(a.output_ids, b.output_ids)
                np.testing.assert_array_equal(a.behav_logp, b.behav_logp)
                assert a.loss_mask.tolist() == [1] * len(b.output_ids)  # stored at version 1: all generated
                assert (a.reward, a.finish_reason) == (b.reward, b.finish_reason)
        assert client.request(P.CreditRequest(server_id="s0", max_credits=1)).credits[0].prompt_index == 6
    finally:
        client.close()
    assert spawn_python.cleanup() is None
