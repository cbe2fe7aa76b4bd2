"""Trainer guards: re-push when engines are behind, the consume-time staleness check."""

import numpy as np
import pytest
import torch

from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory
from tests.helpers_trainer import BufferStandIn


def _group(version: int, gid: str = "g0") -> P.TrajectoryGroup:
    traj = Trajectory.of(prompt_ids=np.array([1, 5, 6], np.int32),
                        output_ids=np.array([7, 2], np.int32),
                        behav_logp=np.array([-1.0, -0.5], np.float32),
                        versions=np.full(2, version, np.int32),
                        reward=1.0, finish_reason="stop")
    return P.TrajectoryGroup(group_id=gid, server_id="s", lease_id="l", prompt_index=0, epoch=0,
                             trajectories=[traj, traj])


class StandIn(BufferStandIn):
    """A buffer that has no data until the trainer re-pushes (the stale engine catches up)."""

    def __init__(self, address: str, engine_version: int):
        self.engine_version, self.roster_requests = engine_version, 0
        super().__init__(address)

    def answer(self, m):
        if isinstance(m, P.BatchRequest):
            fresh = self.engine_version >= m.trainer_version
            return P.Batch(groups=[_group(m.trainer_version)] if fresh else [],
                           trainer_version=m.trainer_version, reason="" if fresh else "no data",
                           batch_id="b1" if fresh else "")
        self.roster_requests += 1
        return P.Roster(members=[P.RosterEntry(server_id="s", engine_url="http://x", engine_ranks=1,
                                               policy_version=self.engine_version)],
                        policy_version=3)


@pytest.mark.parametrize("engine_version, pushes", [(0, [3]), (5, [])])
def test_no_data_and_an_engine_behind_triggers_a_repush_and_a_current_one_none(
        free_port, monkeypatch, engine_version, pushes):
    import trainer.data as data

    monkeypatch.setattr(data, "RESYNC_CHECK_S", 0.2)
    address = f"tcp://127.0.0.1:{free_port()}"
    # the trainer is at 3; a restarted engine serves 0, a current one 5 (ahead: data flows)
    buffer = StandIn(address, engine_version=engine_version)
    source = data.BatchSource(address, 1, wait_s=0.05, buffer_timeout_s=30, rank=0)
    pushed = []

    def repush():
        pushed.append(3)
        buffer.engine_version = 3  # the re-push brought the engine to the trainer's version

    source.on_stall = repush
    try:
        batch = source.next_batch(3)
        assert pushed == pushes and batch is not None and batch.n_seqs == 2
        assert buffer.roster_requests >= len(pushes)
    finally:
        source.close()
        buffer.close()


def test_consume_time_staleness_assertion():
    from areal_like.daemon import StartRefused
    from trainer.data import groups_to_batch
    from trainer.loop import StaleDataError, assert_fresh

    batch = groups_to_batch([_group(3, "a"), _group(1, "b")])
    assert_fresh(batch, version=5, max_staleness=4)  # 5 - 1 = 4 <= 4
    with pytest.raises(StaleDataError, match="staleness 4 > max_staleness 3") as refused:
        assert_fresh(batch, version=5, max_staleness=3)
    # a buffer restarted by hand with a larger bound: one line naming the key, exit 2 (no restart
    # that would be handed the same groups), not a crash's traceback
    assert isinstance(refused.value, StartRefused) and "buffer.max_staleness" in str(refused.value)
    assert torch.equal(batch.head_versions, torch.tensor([3, 1]))


def test_only_rank_0_says_which_engines_the_first_push_served(tmp_path, monkeypatch, caplog):
    """Another rank's report names no engines: it said "to no engines yet" beside rank 0's."""
    import logging
    from types import SimpleNamespace

    from areal_like.settings.config import load_config
    from trainer.loop import Trainer
    from trainer.weight_sync import SyncReport

    monkeypatch.setenv("RANK", "1")
    trainer = Trainer.from_run(load_config([f"run_dir={tmp_path}"]))
    trainer.engines = SimpleNamespace(after_step=lambda version: SyncReport(version=version))
    trainer.guard_logprobs = lambda sync: None
    caplog.set_level(logging.INFO, logger=trainer.log.name)
    trainer.initial_push()
    assert not [r for r in caplog.records if "serving policy_version" in r.getMessage()]
