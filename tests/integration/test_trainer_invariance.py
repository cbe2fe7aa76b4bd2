"""Invariance: the same batch gives the same loss and the same updated weights (1e-5) with
micro-batch sizes 1, 2 and 4, and with 1 rank versus 2 FSDP2 ranks (gloo, real processes).

The worker half of this file runs as ``python test_trainer_invariance.py OUT [RANK WORLD PORT]``;
the 2-rank run uses the torchrun environment (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), the
1-rank run the plain single-process path (a world-size-1 gloo group).
AdamW's first step is lr * g / (|g| + eps): with the default eps it is sign(g) and float rounding
of near-zero gradients would flip whole updates, so the workers use eps=1e-3 (linear in g).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = [  # (name, overrides); every case runs with micro-batch sizes 1, 2, 4 on 1 rank and 2 on 2 ranks
    ("decoupled_ppo", ["trainer.loss.kernel=decoupled_ppo", "trainer.loss.agg=token-mean"]),
    ("grpo_seqmean_2mb", ["trainer.loss.kernel=ppo", "trainer.loss.agg=seq-mean-token-mean",
                          "trainer.num_minibatches=2"]),
    ("drgrpo_tokensum_norm", ["trainer.loss.kernel=ppo", "trainer.estimator=drgrpo",
                              "trainer.loss.agg=seq-mean-token-sum-norm"]),  # C = task.max_new_tokens
    ("vcpo", ["trainer.loss.kernel=vcpo", "trainer.loss.agg=seq-mean-token-mean"]),
]
MICRO_BATCH_SIZES = (1, 2, 4)
WORKER_TIMEOUT_S = 240  # two cold torch+transformers imports on a loaded 2-core machine, plus the steps


def synthetic_groups(n_groups: int = 4, group_size: int = 4, seed: int = 0, version: int = 0):
    import numpy as np

    from areal_like.protocol import TrajectoryGroup
    from areal_like.trajectory import Trajectory

    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        trajs = []
        for _ in range(group_size):
            p, t = int(rng.integers(2, 7)), int(rng.integers(1, 9))
            trajs.append(Trajectory.of(prompt_ids=rng.integers(4, 100, p), output_ids=rng.integers(4, 100, t),
                                    behav_logp=-rng.random(t) * 5, versions=np.full(t, version, np.int32),
                                    reward=float(rng.integers(0, 2)), finish_reason="stop"))
        groups.append(TrajectoryGroup(group_id=f"g{g}", server_id="s", lease_id=str(g), prompt_index=g, epoch=0,
                                      trajectories=trajs))
    return groups


def worker(out: str, mbs_list: list[int]) -> None:
    import torch

    torch.set_num_threads(1)
    from areal_like.config import load_config
    from trainer.data import groups_to_batch
    from trainer.model import build_policy, full_state_dict, init_distributed, leave_distributed
    from trainer.step import StepSettings, recompute_prox_logp, train_step

    batch = groups_to_batch(synthetic_groups())
    results = {}
    for name, overrides in CASES:
        for mbs in mbs_list:
            cfg = load_config(["trainer.lr=1e-2", f"trainer.micro_batch_size={mbs}", "trainer.grad_clip=1e9",
                               *overrides])
            rank, _ = init_distributed(cfg.trainer)
            policy = build_policy(cfg.model, cfg.trainer, adam_eps=1e-3)
            results.setdefault("init", full_state_dict(policy.model))
            s = StepSettings.from_config(cfg)
            stats = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
            results[(name, mbs)] = {"loss": stats["loss"], "grad_norm": stats["grad_norm"],
                                    "state": full_state_dict(policy.model)}
    if rank == 0:
        torch.save(results, out)
    leave_distributed()


def _spawn(out: Path, mbs: list[int], rank: int | None = None, world: int = 1, port: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, __file__, str(out), ",".join(map(str, mbs))], env=env,
                            cwd=Path(__file__).resolve().parents[2])


def test_loss_and_weights_invariant_to_microbatch_size_and_ranks(tmp_path):
    import torch

    from areal_like.distributed import free_port
    from tests.conftest import wait_all

    port = free_port()
    procs = [_spawn(tmp_path / "one.pt", list(MICRO_BATCH_SIZES)),
             _spawn(tmp_path / "two.pt", [2], rank=0, world=2, port=port),
             _spawn(tmp_path / "unused.pt", [2], rank=1, world=2, port=port)]
    wait_all(procs, WORKER_TIMEOUT_S)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name, _ in CASES:
        ref = one[(name, 1)]
        others = [(f"mbs={m}", one[(name, m)]) for m in MICRO_BATCH_SIZES[1:]] + [("2 ranks", two[(name, 2)])]
        for label, got in others:
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), (name, label)
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), (name, label)
            for key, w in ref["state"].items():
                torch.testing.assert_close(got["state"][key], w, rtol=0, atol=1e-5, msg=f"{name} {label} {key}")
        # the comparison is not vacuous: the step moved the weights by far more than the tolerance
        moved = max(float((w - one["init"][k]).abs().max()) for k, w in ref["state"].items())
        assert moved > 1e-3, (name, moved)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(sys.argv[1], [int(x) for x in sys.argv[2].split(",")])
