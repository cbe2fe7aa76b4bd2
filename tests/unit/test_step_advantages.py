"""What each optimizer step of ``trainer/step.py`` hands the kernels: Dr.GRPO's constant C,
advantages over the whole batch (REINFORCE++ whitening) and VCPO's per-trajectory score norms under
FSDP2.

The last test runs the real FSDP2 model sharded over two gloo ranks (spawned processes, a loopback
port)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from areal_like.settings.config import load_config
from areal_like.wire.protocol import TrajectoryGroup
from areal_like.wire.trajectory import Trajectory
from trainer.data import groups_to_batch
from trainer.step import (
    StepSettings,
    batch_advantages,
    batch_logp,
    minibatches,
    output_logp,
    sequence_score_terms,
)


def _groups(rewards: list[list[float]], lengths: list[list[int]]) -> list[TrajectoryGroup]:
    groups = []
    for g, (rs, ls) in enumerate(zip(rewards, lengths)):
        trajs = [Trajectory.of(prompt_ids=np.array([5, 6, 7]), output_ids=np.arange(10, 10 + n),
                            behav_logp=np.full(n, -1.0), versions=np.zeros(n, np.int32), reward=r,
                            finish_reason="stop") for r, n in zip(rs, ls)]
        groups.append(TrajectoryGroup(group_id=f"g{g}", server_id="s", lease_id=str(g),
                                      prompt_index=g, epoch=0, trajectories=trajs))
    return groups


def test_drgrpo_constant_is_the_task_max_new_tokens():
    cfg = load_config(["trainer.loss.kernel=ppo", "trainer.estimator=drgrpo",
                       "trainer.loss.agg=seq-mean-token-sum-norm", "task.max_new_tokens=16"])
    s = StepSettings.from_config(cfg)
    short = groups_to_batch(_groups([[1.0, 0.0]], [[2, 3]]))  # padded width 3
    long = groups_to_batch(_groups([[1.0, 0.0]], [[2, 7]]))  # padded width 7
    assert s.loss_config(short).loss_scale_factor == 16.0
    # not the batch's width: the scale no longer moves
    assert s.loss_config(long).loss_scale_factor == 16.0
    pinned = StepSettings.from_config(load_config(["trainer.loss.agg=seq-mean-token-sum-norm",
                                                   "trainer.loss.loss_scale_factor=4"]))
    assert pinned.loss_config(long).loss_scale_factor == 4.0  # a configured C wins


def test_reinforce_pp_whitens_over_the_whole_batch():
    # Two minibatches of one group each; each group's rewards are constant ([1, 1] and [0, 0]), so
    # whitening each minibatch alone would give 0 everywhere. Over the whole batch (4 one-token
    # responses): mean 0.5, Bessel variance (4 * 0.25) / 3 = 1/3, so
    # A = +-0.5 * sqrt(3) = +-0.866025.
    cfg = load_config(["trainer.loss.kernel=ppo", "trainer.estimator=reinforce_pp",
                       "trainer.num_minibatches=2"])
    s = StepSettings.from_config(cfg)
    batch = groups_to_batch(_groups([[1.0, 1.0], [0.0, 0.0]], [[1, 1], [1, 1]]))
    assert len(minibatches(batch, s.num_minibatches)) == 2
    adv = batch_advantages(batch, s)
    h = 0.5 * math.sqrt(3.0)
    torch.testing.assert_close(adv.values[:, 0], torch.tensor([h, h, -h, -h]), rtol=1e-5, atol=1e-6)
    vcpo = StepSettings.from_config(load_config(["trainer.loss.kernel=vcpo",
                                                 "trainer.loss.agg=seq-mean-token-mean"]))
    # VCPO's depend on each minibatch's starting weights
    assert batch_advantages(batch, vcpo) is None


def _vcpo_norms_rank(rank: int, port: int) -> None:
    """One rank of the two-rank check below (run by ``torch.multiprocessing.spawn``)."""
    from datetime import timedelta

    from trainer.model import build_policy, leave_distributed

    torch.set_num_threads(1)
    torch.manual_seed(0)  # both ranks build the same model
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        cfg = load_config(["trainer.loss.kernel=vcpo", "trainer.loss.agg=seq-mean-token-mean"])
        policy = build_policy(cfg.model, cfg.trainer)
        s = StepSettings.from_config(cfg)
        batch = groups_to_batch(_groups([[1.0, 0.0]], [[3, 5]]))
        # Reference: each trajectory's squared score norm from a plain backward on both ranks (FSDP
        # averages the identical gradients), every local shard read after it, summed over ranks.
        expected = torch.zeros(2, dtype=torch.float64)
        for j in range(2):
            mb = batch.select([j])
            policy.optimizer.zero_grad(set_to_none=True)
            (output_logp(policy.model, mb, s.temperature) * mb.mask).sum().backward()
            expected[j] = sum(float(p.grad.to_local().double().pow(2).sum())
                              for p in policy.model.parameters())
        dist.all_reduce(expected)
        policy.optimizer.zero_grad(set_to_none=True)
        # a no-grad pass leaves the root's parameters unsharded
        batch_logp(policy.model, batch, s, policy.device)
        # the state this test is about
        assert not all(hasattr(p, "to_local") for p in policy.model.parameters())
        _, g2 = sequence_score_terms(policy, batch, torch.arange(2), s)
        torch.testing.assert_close(g2, expected, rtol=1e-6, atol=0.0)
        leave_distributed()
    finally:
        # a failed assertion: leave at once (the other rank may never reach a barrier)
        if dist.is_initialized():
            dist.destroy_process_group()


def test_vcpo_score_norms_after_a_no_grad_pass():
    """Two FSDP2 ranks (gloo, loopback): after a no-grad pass leaves some parameters unsharded,
    VCPO's per-trajectory squared score norms still equal a plain backward's. An exception on either
    rank fails the test (``spawn`` re-raises it here)."""
    import torch.multiprocessing as mp

    from areal_like.net.distributed import free_port

    mp.spawn(_vcpo_norms_rank, args=(free_port(),), nprocs=2, join=True)
