"""GAE, returns, token rewards, VAPO's adaptive lambda and the clipped value loss
(trainer/LOSSES.md section 10) against vectors computed by hand from the formulas."""

import pytest
import torch

from trainer.advantages import adaptive_lambda, gae, token_rewards
from trainer.losses import value_loss


@pytest.mark.parametrize("r, v, m, gamma, lam, adv, ret", [
    # gamma 0.9, lambda 0.5: t2 delta = 1 - 0.8 = 0.2, A2 = 0.2; t1 delta = 0.9 * 0.8 - 0.2 = 0.52,
    # A1 = 0.52 + 0.45 * 0.2 = 0.61; t0 delta = 0.9 * 0.2 - 0.5 = -0.32, A0 = -0.32 + 0.45 * 0.61
    ([[0, 0, 1, 0]], [[0.5, 0.2, 0.8, 9]], [[1, 1, 1, 0]], 0.9, 0.5,
     [[-0.0455, 0.61, 0.2, 0]], [[0.4545, 0.81, 1.0, 0]]),
    # the middle token is context; gamma = lambda = 1 (Monte Carlo): A_t = G_t - V_t
    ([[0, 0, 1]], [[0.5, 7, 0.8]], [[1, 0, 1]], 1.0, 1.0, [[0.5, 0, 0.2]], [[1.0, 0, 1.0]]),
    # a lambda per row: 0 is one-step TD (A0 = 0.5 - 0.25), 1 gives A0 = 1 - 0.25
    ([[0, 1], [0, 1]], [[0.25, 0.5], [0.25, 0.5]], [[1, 1], [1, 1]], 1.0, [0.0, 1.0],
     [[0.25, 0.5], [0.75, 0.5]], None),
])
def test_gae_hand_vectors(r, v, m, gamma, lam, adv, ret):
    r, v, m = (torch.tensor(x, dtype=torch.float32) for x in (r, v, m))
    lam = torch.tensor(lam) if isinstance(lam, list) else lam
    got_adv, got_ret = gae(r, v, m, gamma=gamma, lam=lam)
    torch.testing.assert_close(got_adv, torch.tensor(adv, dtype=torch.float64))
    if ret is not None:
        torch.testing.assert_close(got_ret, torch.tensor(ret, dtype=torch.float64))


def test_adaptive_lambda_vapo():
    # 1 - 1/(0.05 l): l = 40 -> 0.5, l = 100 -> 0.8, l = 10 -> -1 clamped to 0, l = 2000 -> 0.99
    lam = adaptive_lambda(torch.tensor([40, 100, 10, 2000]), 0.05)
    torch.testing.assert_close(lam, torch.tensor([0.5, 0.8, 0.0, 0.99], dtype=torch.float64))


def test_token_rewards_outcome_process_and_kl():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    process = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 5.0], [0.0, 0.0, 0.4], [1.0, 1.0, 1.0]])
    r = token_rewards(torch.tensor([2.0, -1.0, 3.0]), mask, process=process, kl=kl, kl_coef=0.5)
    # row 0: [0.5 - 0.05, 2 - 0.1, 0]; row 1: [0, 0, -1 - 0.2]; row 2: no valid token, nothing
    torch.testing.assert_close(r, torch.tensor([[0.45, 1.9, 0.0], [0.0, 0.0, -1.2],
                                                [0.0, 0.0, 0.0]], dtype=torch.float64))


def test_value_loss_clipped_hand_vector():
    # tok0: (1 - 2)^2 = 1 vs clipped V 0.5 + 0.2 = 0.7: (0.7 - 2)^2 = 1.69 -> 1.69, gradient 0
    # tok1: (0 - 1)^2 = 1 vs clipped 0.3: 0.49 -> 1, gradient 0.5 * 2 (0 - 1) / 2 = -0.5
    # tok2 padding (any value)
    v = torch.tensor([[1.0, 0.0, float("nan")]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 3.0]])
    ret = torch.tensor([[2.0, 1.0, 4.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = value_loss(v, old, ret, m, clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, -0.5, 0.0]]))
    assert stats["value_clip_frac"].item() == pytest.approx(0.5)
    unclipped, _ = value_loss(v, old, ret, m, clip=None)
    assert unclipped.item() == pytest.approx(0.5)


def test_value_loss_calls_sum_to_the_minibatch():
    torch.manual_seed(0)
    v, old, ret = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    m = (torch.rand(4, 5) > 0.3).float()
    whole, _ = value_loss(v, old, ret, m, clip=0.1)
    n = float(m.sum())
    parts = sum(value_loss(v[i:i + 2], old[i:i + 2], ret[i:i + 2], m[i:i + 2], clip=0.1,
                           n_tokens_global=n)[0] for i in (0, 2))
    torch.testing.assert_close(parts, whole)
