"""The critic on 1 and on 2 FSDP2 ranks (gloo, real processes): two PPO-with-critic steps give the
same policy and critic weights and the same stats, and a checkpoint saved on the ranks resumes the
critic exactly. The worker half of this file runs as ``python -c RUNNER test_critic_ranks.py
OUT_DIR`` (RANK/WORLD_SIZE/MASTER_* in the environment for 2 ranks)."""

from __future__ import annotations

import sys
from pathlib import Path

RUNNER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
WORKER_TIMEOUT_S = 300  # cold torch + transformers imports of three processes on 2 loaded cores


def worker(out_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer_invariance import synthetic_groups

    from areal_like.settings.config import load_config
    from tests.helpers_trainer import full_state_dict
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.critic import build_critic, critic_advantages, critic_values, train_critic
    from trainer.data import groups_to_batch
    from trainer.model import build_policy, init_distributed, leave_distributed
    from trainer.step import StepSettings, minibatches, recompute_prox_logp, train_step

    # two minibatches: pi_prox is a separate pass and the value clip can bind in the second
    cfg = load_config(["loss=ppo_critic", "trainer.micro_batch_size=2", "trainer.lr=1",
                       "trainer.critic.lr=1", "trainer.critic.warmup_steps=0",
                       "trainer.pack_sequences=false", "trainer.num_minibatches=2"])
    rank, _ = init_distributed(cfg.trainer)
    # Adam's eps 1: the first steps follow the gradient's size, not its sign (rounding-safe)
    policy = build_policy(cfg.model, cfg.trainer, adam_eps=1.0)
    critic = build_critic(cfg.model, cfg.trainer, adam_eps=1.0)
    s = StepSettings.from_config(cfg)

    def step(seed: int) -> dict:
        batch = groups_to_batch(synthetic_groups(seed=seed))
        values = critic_values(critic, batch, s.micro_batch_size)
        adv, returns = critic_advantages(cfg.trainer.critic, batch, values)
        stats = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s), None,
                           advantages=adv)
        return stats | train_critic(critic, batch, values, returns,
                                    minibatches(batch, s.num_minibatches), s.micro_batch_size)

    res = {"step1": step(1), "step2": step(2), "policy": full_state_dict(policy.model),
           "critic": full_state_dict(critic.model)}
    ckpt = save_checkpoint(out_dir / "ckpt", policy, 2, critic=critic)
    resumed = build_critic(cfg.model, cfg.trainer, adam_eps=1.0)
    load_checkpoint(ckpt, build_policy(cfg.model, cfg.trainer, adam_eps=1.0), resumed)
    res["resumed_critic"] = full_state_dict(resumed.model)
    if rank == 0:
        torch.save(res, out_dir / "res.pt")
    leave_distributed()


def test_critic_on_one_and_two_ranks(tmp_path, spawn_python, free_port):
    import torch

    one, two = spawn_python.one_and_two_ranks(RUNNER, __file__, tmp_path, free_port(),
                                              WORKER_TIMEOUT_S)
    one, two = torch.load(one / "res.pt"), torch.load(two / "res.pt")
    for key in ("loss", "critic_value_loss", "critic_value_mean", "critic_return_mean"):
        for st in ("step1", "step2"):
            assert abs(two[st][key] - one[st][key]) <= 1e-5 * (1 + abs(one[st][key])), (st, key)
    assert one["step2"]["critic_value_mean"] != 0.0  # the second step's values are learned ones
    for part in ("policy", "critic"):
        assert one[part].keys() == two[part].keys()
        for k, w in one[part].items():
            torch.testing.assert_close(two[part][k], w, rtol=0, atol=1e-5, msg=f"{part} {k}")
    for res in (one, two):
        for k, w in res["critic"].items():
            assert torch.equal(res["resumed_critic"][k], w), k


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(Path(sys.argv[2]))  # argv: -c, this file, OUT_DIR (see RUNNER)
    from areal_like.daemon import exit_process

    exit_process(0)
