"""Advantage estimators, VCPO OPOB/ESS and OAPL targets, hand-computed (trainer/LOSSES.md)."""

from __future__ import annotations

import math

import pytest
import torch

from areal_like.settings.config import ESTIMATORS
from areal_like.settings.loss_schema import OAPLConfig, VCPOConfig
from trainer.advantages import (
    VCPO_EPS,
    AdvantageInputs,
    compute_advantages,
    estimator_advantages,
    group_index,
    group_stats,
    oapl_advantages,
    oapl_targets,
    vcpo_advantages,
    vcpo_ess_lr_scale,
    vcpo_step_advantages,
)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


# Group A: R = [1, 0, 1, 1], lengths [2, 3, 1, 2]; group B: R = [0, 0, 0, 1], lengths [1, 1, 2, 2]
# (14 tokens).
REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
GROUPS = ["A"] * 4 + ["B"] * 4
LENGTHS = torch.tensor([2, 3, 1, 2, 1, 1, 2, 2])
MASK = (torch.arange(3)[None, :] < LENGTHS[:, None]).float()

EXPECTED = {
    "grpo": [0.499999, -1.499997, 0.499999, 0.499999, -0.499999, -0.499999, -0.499999, 1.499997],
    "drgrpo": [0.25, -0.75, 0.25, 0.25, -0.25, -0.25, -0.25, 0.75],
    "rloo": [1 / 3, -1.0, 1 / 3, 1 / 3, -1 / 3, -1 / 3, -1 / 3, 1.0],
    # token mean of a = -0.0357143, unbiased token var = 0.2582418 (over the 14 valid tokens)
    "reinforce_pp_baseline": [0.562236, -1.405590, 0.562236, 0.562236,
                              -0.421677, -0.421677, -0.421677, 1.546149],
    # token mean 0.5, var 0.2692308 -> +-0.963624
    "reinforce_pp": [0.963624, -0.963624, 0.963624, 0.963624,
                     -0.963624, -0.963624, -0.963624, 0.963624],
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimator_vectors(estimator):
    adv = compute_advantages(estimator, REWARDS, GROUPS, MASK)
    assert adv.shape == MASK.shape and adv.dtype == torch.float32
    # constant per response, 0 on padding
    close(adv, torch.tensor(EXPECTED[estimator])[:, None] * MASK)


def test_group_ids_as_tensor_or_strings_agree_and_an_unknown_estimator_is_refused():
    ids = torch.tensor([5, 5, 5, 5, 2, 2, 2, 2])
    close(compute_advantages("grpo", REWARDS, ids, MASK),
          compute_advantages("grpo", REWARDS, GROUPS, MASK))
    assert group_index(["x", "y", "x"]).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="unknown estimator"):
        compute_advantages("ppo", REWARDS, GROUPS, MASK)


def test_interleaved_groups_and_singletons():
    # a group of size 1 gets mean 0 and std 1 (GRPO), advantage R (RLOO, REINFORCE++-baseline
    # before whitening)
    r = torch.tensor([1.0, 3.0, 0.0, 2.0])
    g = [0, 1, 0, 2]
    m = torch.ones(4, 2)
    close(compute_advantages("grpo", r, g, m)[:, 0],
          [1 / math.sqrt(0.5) / (1 + 1e-6 / math.sqrt(0.5)) * 0.5,
           3.0 / (1 + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6), 2.0 / (1 + 1e-6)])
    close(compute_advantages("rloo", r, g, m)[:, 0], [1.0, 3.0, -1.0, 2.0])
    close(compute_advantages("drgrpo", r, g, m)[:, 0], [0.5, 3.0, -0.5, 2.0])


# ---------------------------------------------------------------- VCPO (LOSSES.md section 8)
@pytest.mark.parametrize("w,ess,ratio,scale", [
    ([1.0, 1.0, 2.0, 0.5], 3.24, 0.81, 0.9),
    ([10.0, 0.1, 0.1, 0.1], 1.060582, 0.265145, 0.514923),
])
def test_vcpo_ess_vectors(w, ess, ratio, scale):
    got_scale, got_ess, got_ratio = vcpo_ess_lr_scale(torch.tensor(w))
    close(got_ess, ess)
    close(got_ratio, ratio)
    close(got_scale, scale)


def test_vcpo_ess_extreme_weights_and_base():
    w = torch.exp(torch.tensor([20.0, -20.0, 0.0, 19.0]))
    scale, ess, ratio = vcpo_ess_lr_scale(w)
    assert torch.isfinite(scale) and 1.0 <= float(ess) <= 4.0
    close(vcpo_ess_lr_scale(torch.ones(4), base=1.0)[0], 1.0)
    # 0.81/0.5 > 1 -> capped
    close(vcpo_ess_lr_scale(torch.tensor([1.0, 1.0, 2.0, 0.5]), base=0.5)[0], 1.0)


def test_vcpo_opob_readme_vector():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    w = torch.tensor([1.0, 1.0, 2.0, 0.5])
    g2 = torch.tensor([1.0, 4.0, 1.0, 1.0])
    adv = vcpo_advantages(r, w, g2, [0, 0, 0, 0], weight_mode="readme")
    b_star = 5 / 9.25  # weights w^2 |g|^2 = [1, 4, 4, 0.25]
    close(adv, [0.918919, -1.081081, 0.918919, -1.081081])
    close(adv, (r - b_star) / 0.5)
    close(vcpo_advantages(r, w, g2, [0] * 4, norm_by_std=False), r - b_star)


def test_vcpo_opob_code_mode_and_groups():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    w = torch.tensor([1.0, 1.0, 10.0, 0.5, 3.0, 3.0])
    g2 = torch.tensor([1.0, 4.0, 1.0, 1.0, 2.0, 2.0])
    groups = [0, 0, 0, 0, 1, 1]
    adv = vcpo_advantages(r, w, g2, groups, weight_mode="code", is_cap=8.0)
    c = torch.tensor([1.0, 4.0, 64 * 100.0, 0.25 * 0.25])  # min(w, 8)^2 w^2 |g|^2
    b_star = (c * r[:4]).sum() / c.sum()
    close(adv[:4], (r[:4] - b_star) / 0.5)
    close(adv[4:], [0.0, 0.0])  # constant rewards: b* = R, sigma = 0 -> no division
    with pytest.raises(ValueError, match="baseline weight"):
        vcpo_advantages(r, w, g2, groups, weight_mode="paper")


def vcpo_two_buffer_gradient(
    seq_grads: torch.Tensor, rewards: torch.Tensor, is_weights: torch.Tensor,
    grad_sq_norms: torch.Tensor,
    group_ids: list, *, weight_mode: str = "readme", is_cap: float = 8.0,
) -> torch.Tensor:
    """The released code's one-backward-per-trajectory accumulation (buffer_R - b* buffer_1 per
    group) over token-mean score gradients ``seq_grads`` [N, D]: LOSSES.md section 8, step 5."""
    idx = group_index(group_ids).to(seq_grads.device)
    r = rewards.detach().double()
    w = is_weights.detach().double()
    w_clip = w.clamp(max=is_cap)
    c = w * w * grad_sq_norms.double() * (w_clip**2 if weight_mode == "code" else 1.0)
    _, std, _ = group_stats(r, idx, unbiased=False)
    sigma = torch.where(std > VCPO_EPS, std, torch.ones_like(std))
    total = torch.zeros(seq_grads.shape[1], dtype=torch.float64, device=seq_grads.device)
    for g in range(int(idx.max()) + 1):
        rows = (idx == g).nonzero().flatten()
        buf_r = torch.zeros_like(total)
        buf_1 = torch.zeros_like(total)
        for i in rows.tolist():  # one "backward" per trajectory
            buf_r += (r[i] / sigma[i]) * w_clip[i] * seq_grads[i].double()
            buf_1 += (1.0 / sigma[i]) * w_clip[i] * seq_grads[i].double()
        # scale-free, as vcpo_advantages
        c_g = c[rows] / c[rows].max().clamp(min=torch.finfo(c.dtype).tiny)
        b_star = (c_g * r[rows]).sum() / (c_g.sum() + VCPO_EPS)
        total += buf_r - b_star * buf_1
    return total / len(r)


def test_vcpo_two_buffer_accumulation_matches_direct_estimator():
    g = torch.Generator().manual_seed(0)
    n, d = 8, 5
    # token-mean score gradients gbar_i
    seq_grads = torch.randn(n, d, generator=g, dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    w = torch.exp(torch.randn(n, generator=g) * 1.5)
    g2 = torch.rand(n, generator=g) * 3 + 0.1
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    for mode in ("readme", "code"):
        adv = vcpo_advantages(r, w, g2, groups, weight_mode=mode, is_cap=2.0).double()
        direct = (adv[:, None] * w.double().clamp(max=2.0)[:, None] * seq_grads).sum(0) / n
        buffered = vcpo_two_buffer_gradient(seq_grads, r, w, g2, groups, weight_mode=mode,
                                            is_cap=2.0)
        close(buffered, direct, rtol=1e-6, atol=1e-9)  # advantages come back in fp32


# ------------------------------------------------------- OAPL (LOSSES.md section 9, reconstruction)
def test_oapl_targets_do_not_overflow():  # the vectors: test_losses.py::test_oapl_vector
    big = oapl_targets(torch.tensor([1e3, 0.0, 5.0]), [0, 0, 1], beta_v=1e-3)
    assert torch.isfinite(big).all()
    close(big[2], 0.0)  # a singleton group's soft value is its own reward


def test_kernel_advantage_rules():
    inputs = AdvantageInputs(REWARDS, GROUPS, MASK, "rloo")
    oapl = oapl_advantages(inputs, OAPLConfig(beta1=2.0, beta2=1e-3))
    close(oapl.values, oapl_targets(REWARDS, GROUPS, beta_v=2.0)[:, None] * MASK)
    close(estimator_advantages(inputs).values, compute_advantages("rloo", REWARDS, GROUPS, MASK))
    w, g2 = torch.full((8,), 0.5), torch.ones(8)
    vcpo = vcpo_step_advantages(AdvantageInputs(REWARDS, GROUPS, MASK, "grpo",
                                                score_terms=lambda: (w, g2)),
                                VCPOConfig())
    close(vcpo.values, vcpo_advantages(REWARDS, w, g2, GROUPS)[:, None] * MASK)
    # uniform weights: ESS = B, so the step keeps its learning rate
    assert vcpo.lr_scale == 1.0 and vcpo.stats["vcpo_ess"] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="score terms"):
        vcpo_step_advantages(inputs, VCPOConfig())


def test_vcpo_baseline_is_scale_free():
    # equal weights of e^-10 give the plain mean 0.5 (an eps added to each weight skewed it)
    r = torch.tensor([1.0, 0.0])
    w = torch.full((2,), math.exp(-10.0))
    g2 = torch.ones(2)
    for mode in ("readme", "code"):
        close(vcpo_advantages(r, w, g2, [0, 0], weight_mode=mode), [1.0, -1.0])
    # scaling every weight of a group by the same factor leaves the advantages unchanged
    w2, g22 = torch.tensor([1.0, 1.0, 2.0, 0.5]), torch.tensor([1.0, 4.0, 1.0, 1.0])
    r2 = torch.tensor([1.0, 0.0, 1.0, 0.0])
    close(vcpo_advantages(r2, w2 * math.exp(-12.0), g22, [0] * 4),
          vcpo_advantages(r2, w2, g22, [0] * 4))
