"""The KL-to-reference term as the trainer applies it: ``compute_policy_loss`` (the call
``trainer.step.forward_backward`` makes) with ``kl_coef`` > 0 adds exactly ``kl_coef`` times the
aggregated estimate, with the estimator's gradient, against values computed by hand.

Vector: two sequences, log pi_theta - log pi_ref per valid token d = [0.5, 0, -0.25 | -2]; the
fourth column of row 0 and the second of row 1 are padding holding nan / garbage.
  k1 = d:                      [0.5, 0, -0.25, -2]            token mean -0.4375
  k2 = d^2 / 2:                [0.125, 0, 0.03125, 2]         token mean  0.5390625
  k3 = e^-d + d - 1:           [0.1065306597, 0, 0.0340254167, 4.3890560989] token mean 1.1324030438
  d k3 / d d = 1 - e^-d:       [0.3934693403, 0, -0.2840254167, -6.3890560989]
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from areal_like.settings.config import LossConfig, load_config
from trainer.losses import compute_policy_loss
from trainer.step import StepSettings

NAN = float("nan")
LOGP = [[-1.0, -2.0, -0.5, NAN], [-3.0, NAN, NAN, NAN]]
REF = [[-1.5, -2.0, -0.25, 7.0], [-1.0, 3.0, NAN, NAN]]
MASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
ADV = [[0.7, 0.7, 0.7, 0.7], [-1.2, -1.2, -1.2, -1.2]]
COEF = 0.5

TOKEN_MEAN = {"k1": -0.4375, "k2": 0.5390625, "k3": 1.1324030438327564}
# at the 4 valid tokens
DK_DD = {"k1": [1.0, 1.0, 1.0, 1.0], "k2": [0.5, 0.0, -0.25, -2.0],
         "k3": [0.3934693402873666, 0.0, -0.2840254166877415, -6.38905609893065]}
VALID = [(0, 0), (0, 1), (0, 2), (1, 0)]


def _loss(kl_coef: float, estimator: str = "k3", agg: str = "token-mean"):
    logp = torch.tensor(LOGP, requires_grad=True)
    # ratio e^0.1: inside the clip, so the PPO term is smooth
    prox = torch.nan_to_num(torch.tensor(LOGP)) - 0.1
    loss, stats = compute_policy_loss(
        LossConfig(kernel="ppo", agg=agg, kl_coef=kl_coef, kl_estimator=estimator), logp=logp,
        prox_logp=prox, behav_logp=prox, advantages=torch.tensor(ADV), mask=torch.tensor(MASK),
        ref_logp=torch.tensor(REF))
    loss.backward()
    return loss.detach(), logp.grad, stats


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_adds_the_estimate_times_coef_to_loss_and_gradient(estimator):
    off, grad_off, stats_off = _loss(0.0)
    on, grad_on, stats = _loss(COEF, estimator)
    assert "kl_ref" not in stats_off  # no reference term without kl_coef
    assert float(stats["kl_ref"]) == pytest.approx(TOKEN_MEAN[estimator], rel=1e-6)
    assert float(on - off) == pytest.approx(COEF * TOKEN_MEAN[estimator], rel=1e-6)
    # the kernel's part is untouched
    assert float(stats["policy_loss"]) == pytest.approx(float(off), rel=1e-6)
    assert float(stats["loss"]) == pytest.approx(float(on), rel=1e-6)
    extra = grad_on - grad_off
    for (i, j), slope in zip(VALID, DK_DD[estimator]):
        assert float(extra[i, j]) == pytest.approx(COEF * slope / 4, rel=1e-5, abs=1e-7), (i, j)
    # padding gets nothing
    assert float(extra[0, 3]) == 0.0 and float(extra[1, 1:].abs().sum()) == 0.0


def test_kl_follows_the_aggregation_mode():
    # seq-mean-token-mean: row 0's mean k3 (0.1405560764 / 3) and row 1's (4.3890560989), averaged
    off, _, _ = _loss(0.0, agg="seq-mean-token-mean")
    on, _, stats = _loss(COEF, agg="seq-mean-token-mean")
    assert float(on - off) == pytest.approx(COEF * 2.217954062198721, rel=1e-6)
    # the stat is always a token mean
    assert float(stats["kl_ref"]) == pytest.approx(TOKEN_MEAN["k3"], rel=1e-6)


def test_kl_is_zero_when_policy_equals_reference():
    logp = torch.tensor([[-0.3, -2.5, -7.0]])
    for est in ("k1", "k2", "k3"):
        _, stats = compute_policy_loss(LossConfig(kernel="ppo", kl_coef=1.0, kl_estimator=est),
                                       logp=logp, prox_logp=logp, behav_logp=logp,
                                       advantages=torch.ones(1, 3), mask=torch.ones(1, 3),
                                       ref_logp=logp.clone())
        assert float(stats["kl_ref"]) == 0.0 and float(stats["loss"]) == float(stats["policy_loss"])


def test_step_settings_pass_kl_to_the_loss_and_it_needs_a_reference():
    run = load_config(["trainer.loss.kl_coef=0.05", "trainer.loss.kl_estimator=k2"])
    s = StepSettings.from_config(run)
    cfg = s.loss_config(SimpleNamespace(mask=torch.ones(2, 6)))  # what train_step hands every call
    assert cfg.kl_coef == 0.05 and cfg.kl_estimator == "k2"  # Dr.GRPO's C: test_step_advantages
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logp"):
        compute_policy_loss(cfg, logp=torch.zeros(1, 2), prox_logp=torch.zeros(1, 2),
                            behav_logp=torch.zeros(1, 2), advantages=torch.ones(1, 2),
                            mask=torch.ones(1, 2))
