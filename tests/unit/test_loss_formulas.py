"""Every kernel against the formulas of trainer/LOSSES.md re-derived in plain numpy, loss and
gradient w.r.t. logp, in every aggregation mode, on one ragged batch: lengths 5, 1, 3, 0 and 2,
nan in the padding, a zero, positive and negative advantages, ratios inside and outside the trust
region and the IS bands. test_losses.py has the single-case vectors and the split invariance; this
checks the kernels where the aggregation and the lengths differ, and that a row with A = 0 adds
exactly nothing under huge log-ratios (``Kernel.zero_at_zero_advantage``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from areal_like.settings.config import AGG_MODES, LOSS_KINDS, LossConfig
from areal_like.settings.loss_schema import GSPOConfig
from trainer.losses import KERNELS, compute_policy_loss

RNG = np.random.default_rng(0)
M = (np.arange(5)[None] < np.array([5, 1, 3, 0, 2, 4])[:, None]).astype(float)
PROX = np.log(RNG.uniform(0.05, 0.95, M.shape))
LOGP = PROX + 0.4 * RNG.standard_normal(M.shape)
BEHAV = PROX + 0.6 * RNG.standard_normal(M.shape)
A_SEQ = np.array([1.0, -2.0, 0.0, 1.0, -0.5, 0.7])
A = A_SEQ[:, None] * M
VALID = M.sum(-1) > 0
C = 7.0  # loss_scale_factor
MT = torch.tensor(M, dtype=torch.float32)


def agg(mat, grad, mode):
    """(loss, d loss / d logp) of LOSSES.md section 0 for a per-token loss and its derivative."""
    mat, grad = np.where(M > 0, mat, 0.0), np.where(M > 0, grad, 0.0)
    length = np.maximum(M.sum(-1), 1)[:, None]
    div = {"token-mean": M.sum(), "seq-mean-token-mean": VALID.sum() * length,
           "seq-mean-token-sum": VALID.sum(), "seq-mean-token-sum-norm": C}[mode]
    return (mat / div).sum(), grad / div


def ppo(el=0.2, eh=0.2, c=None):
    """Section 2: loss max(-A r, -A clip(r)), min with -A c where A < 0; gradient -A r unclipped."""
    r = np.exp(np.where(M > 0, LOGP - PROX, 0))
    l1, l2 = -A * r, -A * np.clip(r, 1 - el, 1 + eh)
    mat, grad = np.maximum(l1, l2), np.where(l1 >= l2, -A * r, 0.0)
    if c is not None:
        hit = (A < 0) & (mat > -A * c)
        mat, grad = np.where(hit, -A * c, mat), np.where(hit, 0.0, grad)
    return mat, grad


def seq_sum(x):
    return np.where(M > 0, x, 0).sum(-1)


RHO = np.exp(np.where(M > 0, PROX - BEHAV, 0))  # token rho = pi_prox / pi_behav
RHO_SEQ = np.exp(seq_sum(PROX - BEHAV))[:, None]


def expected(kind, mode):
    if kind == "ppo":
        mat, grad = ppo(eh=0.28, c=3.0)
        return agg(mat, grad, mode)
    mat, grad = ppo()
    weights = {"decoupled_ppo": np.where(RHO <= 1.5, RHO, 0), "tis": np.minimum(RHO_SEQ, 2.0),
               "mis": np.where((RHO_SEQ >= 0.5) & (RHO_SEQ <= 2.0), RHO_SEQ, 0),
               "icepop": np.where((RHO >= 0.5) & (RHO <= 5.0), RHO, 0)}
    if kind in weights:
        return agg(mat * weights[kind], grad * weights[kind], mode)
    if kind == "gspo":  # section 3: -A s_i per token, s_i the geometric mean, seq-mean-token-mean
        s = np.exp(seq_sum(LOGP - PROX) / np.maximum(M.sum(-1), 1))[:, None]
        l1, l2 = -A * s, -A * np.clip(s, 0.9, 1.15)
        return agg(np.maximum(l1, l2), np.where(l1 >= l2, -A * s, 0.0), "seq-mean-token-mean")
    if kind == "vespo":  # section 7: -phi(W) A logp, W = pi_theta / pi_behav over the sequence
        w = np.exp(seq_sum(LOGP - BEHAV))
        k, lam = np.where(A_SEQ >= 0, 2.0, 3.0), np.where(A_SEQ >= 0, 3.0, 2.0)
        phi = (w**k * np.exp(lam * (1 - w)))[:, None]
        return agg(-phi * A * LOGP, -phi * A, mode)
    if kind == "vcpo":  # section 8: -min(w, 8) A mean_t logp, w = prox / behav over the sequence
        w = np.minimum(RHO_SEQ, 8.0)
        return agg(-w * A * LOGP, -w * A, "seq-mean-token-mean")
    # oapl, section 9: mean over sequences of (beta2 Delta - A)^2, Delta = sum_t (logp - behav)
    resid = (0.5 * seq_sum(LOGP - BEHAV) - A_SEQ) * VALID
    return (resid**2).sum() / VALID.sum(), (resid / VALID.sum())[:, None] * M


HP = dict(dual_clip=3.0, eps_clip_high=0.28, loss_scale_factor=C,
          decoupled_ppo={"cap": 1.5}, tis={"level": "sequence"},
          gspo=GSPOConfig(eps_clip=0.1, eps_clip_high=0.15), oapl={"beta2": 0.5})


def config(kind, mode):
    hp = {k: v for k, v in HP.items() if k not in ("dual_clip", "eps_clip_high") or kind == "ppo"}
    for name in ("decoupled_ppo", "tis", "oapl"):
        hp[name] = type(getattr(LossConfig(), name))(**HP[name])
    return LossConfig(kernel=kind, agg=mode, **hp)


def padded(x):
    return torch.tensor(np.where(M > 0, x, np.nan), dtype=torch.float32)


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_kernel_matches_its_formula_in_every_aggregation_mode(kind, mode):
    logp = padded(LOGP).requires_grad_(True)
    loss, _ = compute_policy_loss(config(kind, mode), logp=logp, prox_logp=padded(PROX),
                                  behav_logp=padded(BEHAV), advantages=torch.tensor(A).float(),
                                  mask=MT)
    loss.backward()
    want_loss, want_grad = expected(kind, mode)
    np.testing.assert_allclose(float(loss.detach()), want_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(logp.grad.double().numpy(), want_grad, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kind", [k for k in LOSS_KINDS if KERNELS[k].zero_at_zero_advantage])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_a_zero_advantage_adds_exactly_nothing(kind, mode):
    # log-ratios far past every clamp, both ways, against prox and behav
    shift = torch.tensor([[30.0, -30.0, 1e4, -1e4, 5.0]]).expand(6, 5) * MT
    logp = (padded(PROX) + shift).requires_grad_(True)
    loss, _ = compute_policy_loss(config(kind, mode), logp=logp, prox_logp=padded(PROX),
                                  behav_logp=padded(PROX) - shift, advantages=torch.zeros(6, 5),
                                  mask=MT)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not logp.grad.any()
