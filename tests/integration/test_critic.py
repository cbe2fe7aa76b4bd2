"""PPO with a critic through the trainer's own entry points (trainer/critic.py, one rank in this
process); the eta = 0 reference is written from trainer/LOSSES.md section 10."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer_invariance import synthetic_groups  # noqa: E402

from areal_like.daemon import StartRefused  # noqa: E402
from areal_like.settings.config import load_config  # noqa: E402
from tests.helpers_trainer import full_state_dict  # noqa: E402
from trainer.checkpoint import load_checkpoint, save_checkpoint, state_checksums  # noqa: E402
from trainer.critic import (  # noqa: E402
    build_critic,
    critic_advantages,
    critic_values,
    train_critic,
)
from trainer.data import TrainBatch, groups_to_batch  # noqa: E402
from trainer.model import build_policy, init_distributed  # noqa: E402
from trainer.step import StepSettings, batch_logp, minibatches, train_step  # noqa: E402

BASE = ["loss=ppo_critic", "trainer.micro_batch_size=4", "trainer.pack_sequences=false",
        "trainer.lr=1e-3", "trainer.critic.lr=1e-3"]


def build(*overrides: str, adam_eps: float = 1e-8):
    cfg = load_config([*BASE, *overrides])
    init_distributed(cfg.trainer)
    torch.manual_seed(0)
    return cfg, build_policy(cfg.model, cfg.trainer, adam_eps=adam_eps), build_critic(
        cfg.model, cfg.trainer, adam_eps=adam_eps)


def ppo_critic_step(cfg, policy, critic, batch: TrainBatch) -> dict:
    """What ``Trainer.critic_step`` runs (one minibatch: pi_prox is the forward's own)."""
    s = StepSettings.from_config(cfg)
    values = critic_values(critic, batch, s.micro_batch_size)
    adv, returns = critic_advantages(cfg.trainer.critic, batch, values)
    stats = train_step(policy, batch, s, None, None, advantages=adv)
    return stats | train_critic(critic, batch, values, returns, minibatches(batch, 1),
                                s.micro_batch_size)


def on_policy(policy, batch: TrainBatch, cfg) -> TrainBatch:
    """``batch`` as if sampled by ``policy`` now (eta = 0): its behaviour log-probs are the
    policy's."""
    s = StepSettings.from_config(cfg)
    batch.behav_logp = batch_logp(policy.model, batch, s, policy.device) * batch.mask
    return batch


def test_critic_gradients_reach_only_the_critic():
    cfg, policy, critic = build()
    batch = groups_to_batch(synthetic_groups())
    policy_before, critic_before = full_state_dict(policy.model), full_state_dict(critic.model)
    s = StepSettings.from_config(cfg)
    values = critic_values(critic, batch, s.micro_batch_size)
    adv, returns = critic_advantages(cfg.trainer.critic, batch, values)
    assert not adv.requires_grad and not returns.requires_grad
    for _ in range(2):  # the zero head first, then the backbone through it
        train_critic(critic, batch, values, returns, minibatches(batch, 1), s.micro_batch_size)
    assert all(p.grad is None for p in policy.model.parameters())
    assert all(torch.equal(policy_before[k], v) for k, v in full_state_dict(policy.model).items())
    moved = {k for k, v in full_state_dict(critic.model).items()
             if not torch.equal(critic_before[k], v)}
    assert "head.weight" in moved and any(k.startswith("backbone.model.layers") for k in moved)
    assert not any("lm_head" in k for k in moved)  # unused and frozen
    critic.optimizer.zero_grad(set_to_none=True)
    critic_mid = full_state_dict(critic.model)
    train_step(policy, batch, s, None, None, advantages=adv)
    assert all(p.grad is None for p in critic.model.parameters())
    assert all(torch.equal(critic_mid[k], v) for k, v in full_state_dict(critic.model).items())
    assert any(not torch.equal(policy_before[k], v)
               for k, v in full_state_dict(policy.model).items())


def toy_batch(rewards: list[float], t: int = 3) -> TrainBatch:
    """Prompts [5 + 2k, 6 + 2k] with reward ``rewards[k]``; every output ``t`` tokens of 40."""
    n = len(rewards)
    ids = torch.tensor([[5 + 2 * k, 6 + 2 * k] + [40] * t for k in range(n)])
    return TrainBatch(input_ids=ids, prompt_lens=torch.full((n,), 2),
                      output_lens=torch.full((n,), t), behav_logp=torch.zeros(n, t),
                      mask=torch.ones(n, t), rewards=torch.tensor(rewards),
                      group_ids=torch.arange(n), head_versions=torch.zeros(n, dtype=torch.long))


def test_critic_learns_the_values_of_a_toy_task():
    # gamma 0.5, lambda 1: V(s_t) = R * 0.5^(2 - t) on a 3-token response: [R/4, R/2, R]
    cfg, _, critic = build("trainer.critic.gamma=0.5", "trainer.critic.value_clip=null",
                           "trainer.critic.lr=3e-3")
    rewards = [1.0, -1.0, 0.5, 0.0]
    batch = toy_batch(rewards)
    target = torch.tensor(rewards)[:, None] * torch.tensor([0.25, 0.5, 1.0])
    for _ in range(150):
        values = critic_values(critic, batch, 4)
        _, returns = critic_advantages(cfg.trainer.critic, batch, values)
        torch.testing.assert_close(returns, target)  # lambda 1: the discounted Monte Carlo return
        train_critic(critic, batch, values, returns, [torch.arange(4)], 4)
    learned = critic_values(critic, batch, 4)
    assert (learned - target).abs().max() < 0.05, learned


def test_checkpoint_round_trip_continues_both_models_exactly(tmp_path):
    cfg, policy, critic = build()
    first = on_policy(policy, groups_to_batch(synthetic_groups(seed=1)), cfg)
    ppo_critic_step(cfg, policy, critic, first)
    path = save_checkpoint(tmp_path, policy, 1, critic=critic)
    second = groups_to_batch(synthetic_groups(seed=2))
    ppo_critic_step(cfg, policy, critic, second)
    want = full_state_dict(policy.model), full_state_dict(critic.model)

    _, policy2, critic2 = build()
    assert load_checkpoint(path, policy2, critic2)[0] == 1
    saved = torch.load(path / "meta.pt", weights_only=False)["checksums"]
    assert state_checksums(policy2, critic2) == saved
    ppo_critic_step(cfg, policy2, critic2, groups_to_batch(synthetic_groups(seed=2)))
    got = full_state_dict(policy2.model), full_state_dict(critic2.model)
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        assert all(torch.equal(w[k], g[k]) for k in w)

    _, policy3, _ = build()
    with pytest.raises(StartRefused, match="saved with a critic"):
        load_checkpoint(path, policy3)


def reference_ppo_step(cfg, policy, critic, batch: TrainBatch) -> None:
    """Synchronous PPO with a critic, from the formulas (eta = 0, one minibatch, decoupled PPO
    whose ratios are all 1): plain forwards, GAE per row, whitening, AdamW."""
    c, t = cfg.trainer.critic, cfg.task.temperature
    ids, p_len, mask = batch.input_ids, batch.prompt_lens, batch.mask
    n, t_max = mask.shape
    pos = (p_len[:, None] - 1 + torch.arange(t_max)).clamp(max=ids.shape[1] - 2)
    logits = policy.model(input_ids=ids).logits.float() / t
    logits = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
    logp = torch.log_softmax(logits, -1).gather(2, ids.gather(1, pos + 1)[..., None]).squeeze(-1)
    hidden = critic.model.backbone.get_decoder()(input_ids=ids).last_hidden_state
    v = critic.model.head(hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1])))
    v = v.squeeze(-1)
    adv = torch.zeros(n, t_max, dtype=torch.float64)
    ret = torch.zeros(n, t_max, dtype=torch.float64)
    for i in range(n):
        steps = [j for j in range(t_max) if mask[i, j] > 0]
        a_next = v_next = 0.0
        g = 0.0
        for k, j in enumerate(reversed(steps)):
            r = float(batch.rewards[i]) if k == 0 else 0.0
            vj = float(v[i, j].detach())
            a_next = r + c.gamma * v_next - vj + c.gamma * c.lambda_actor * a_next
            g = r + c.gamma * g  # lambda_critic 1: the Monte Carlo return
            adv[i, j], ret[i, j], v_next = a_next, g, vj
    m = mask > 0
    a = adv[m]
    adv[m] = (a - a.mean()) / torch.sqrt(a.var() + 1e-8)
    n_tok = float(mask.sum())
    ratio = torch.exp(logp - logp.detach())
    (-(adv.float() * ratio * mask).sum() / n_tok).backward()
    torch.nn.utils.clip_grad_norm_(policy.model.parameters(), cfg.trainer.grad_clip)
    policy.optimizer.step()
    (0.5 * (((v - ret.float()) ** 2) * mask).sum() / n_tok).backward()
    torch.nn.utils.clip_grad_norm_(critic.model.parameters(), c.grad_clip)
    critic.optimizer.step()


# Adam's eps 1 and learning rate 1: the first step is about the gradient itself, not its sign
# (Adam's first step is lr * g / (|g| + eps)), so a wrong scale shows too
SYNC = ("trainer.critic.warmup_steps=0", "trainer.lr=1", "trainer.critic.lr=1")


def test_eta_zero_equals_a_synchronous_ppo_step():
    cfg, policy, critic = build(*SYNC, adam_eps=1.0)
    batch = on_policy(policy, groups_to_batch(synthetic_groups(seed=3)), cfg)
    before = full_state_dict(policy.model), full_state_dict(critic.model)
    ppo_critic_step(cfg, policy, critic, batch)
    _, ref_policy, ref_critic = build(*SYNC, adam_eps=1.0)
    reference_ppo_step(cfg, ref_policy, ref_critic, batch)
    for model, ref, start in ((policy, ref_policy, before[0]), (critic, ref_critic, before[1])):
        got, want = full_state_dict(model.model), full_state_dict(ref.model)
        assert max(float((got[k] - start[k]).abs().max()) for k in got) > 1e-2  # it moved
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
