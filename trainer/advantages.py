"""Advantage estimators and the per-minibatch baselines of VCPO and OAPL: pure tensor functions.

Formulas: ``trainer/LOSSES.md`` sections 1, 8, 9, 10 (GAE for the critic) and 11
(distillation); the three functions before GAE are the ``advantages`` rules of
``trainer/losses.py``'s ``KERNELS``. Invariants: computed on whole groups before any split into
micro-batches; constants for the loss (no gradient); estimators return
[N, T], zero on padding. No torch.distributed, no logging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from areal_like.settings.loss_schema import ESTIMATORS, OAPLConfig, VCPOConfig

GRPO_EPS = 1e-6  # verl: added to the unbiased group std
WHITEN_EPS = 1e-8  # verl masked_whiten: added to the variance
VCPO_EPS = 1e-8  # VCPO: OPOB denominator eps and the "std too small to divide" threshold


def group_index(group_ids: Tensor | Sequence) -> Tensor:
    """Dense group index [N] (0..G-1) from integer tensor ids or a sequence of hashable ids."""
    if isinstance(group_ids, Tensor):
        return torch.unique(group_ids, return_inverse=True)[1].long()
    seen: dict = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in group_ids], dtype=torch.long)


def _group_sums(values: Tensor, idx: Tensor) -> Tensor:
    """Per group (``idx`` [N]) the sum of ``values`` [N, ...] over its rows."""
    return torch.zeros(int(idx.max()) + 1, *values.shape[1:], dtype=values.dtype,
                       device=values.device).index_add_(0, idx, values)


def group_stats(rewards: Tensor, group_ids: Tensor | Sequence, *,
                unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-response group mean, std and size [N]. Groups of size 1 get mean 0 and std 1 (verl)."""
    r = rewards.detach().double()
    idx = group_index(group_ids).to(r.device)
    n = _group_sums(torch.ones_like(r), idx)
    mean = _group_sums(r, idx) / n
    sq = _group_sums((r - mean[idx]) ** 2, idx)
    var = sq / (n - 1).clamp(min=1) if unbiased else sq / n
    single = n < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(var), var.sqrt())
    return mean[idx], std[idx], n[idx]


def whiten(values: Tensor, mask: Tensor, *, eps: float = WHITEN_EPS) -> Tensor:
    """Token-weighted global whitening (verl ``masked_whiten``): (x - mean) / sqrt(var + eps)
    over the valid tokens, Bessel-corrected variance; padding stays 0."""
    m = mask.double()
    x = values.double()
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


def compute_advantages(estimator: str, rewards: Tensor, group_ids: Tensor | Sequence,
                       mask: Tensor) -> Tensor:
    """Outcome-reward advantages [N, T] (fp32) for one of ``ESTIMATORS``.

    grpo: (R - mean_g) / (std_g + 1e-6), unbiased std; drgrpo: R - mean_g;
    rloo: G/(G-1) (R - mean_g) (= R - mean of the others; G = 1 gives R); reinforce_pp_baseline:
    R - mean_g broadcast to tokens, then whitened over all valid tokens of the minibatch;
    reinforce_pp: R (gamma = 1 return) broadcast, then the same whitening.
    """
    m = mask.detach().double()
    r = rewards.detach().double().to(m.device)
    if estimator in ("grpo", "drgrpo", "rloo", "reinforce_pp_baseline"):
        mean, std, n = group_stats(r, group_ids, unbiased=True)
    if estimator == "grpo":
        adv = (r - mean) / (std + GRPO_EPS)
    elif estimator == "drgrpo":
        adv = r - mean
    elif estimator == "rloo":
        adv = torch.where(n > 1, n / (n - 1).clamp(min=1) * (r - mean), r)
    elif estimator == "reinforce_pp_baseline":
        adv = whiten((r - mean)[:, None] * m, m)
    elif estimator == "reinforce_pp":
        adv = whiten(r[:, None] * m, m)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    adv = adv[:, None] * m if adv.dim() == 1 else adv
    return adv.float()


# ---------------------------------------------------------------- VCPO (LOSSES.md section 8)
def vcpo_advantages(
    rewards: Tensor, is_weights: Tensor, grad_sq_norms: Tensor, group_ids: Tensor | Sequence, *,
    weight_mode: str = "readme", is_cap: float = 8.0, norm_by_std: bool = True,
) -> Tensor:
    """VCPO advantages [N] with the off-policy optimal baseline (OPOB) per prompt group (section 8).

    b*_g = sum_i c_i R_i / (sum_i c_i + 1e-8) with the c_i divided by their group's largest first,
    A_i = (R_i - b*_g) / sigma_g (population std; no division when sigma_g <= 1e-8 or not
    ``norm_by_std``); c_i = w_i^2 ||g_i||^2 (``readme``) or min(w_i, is_cap)^2 w_i^2 ||g_i||^2
    (``code``), w_i unclipped, g_i = grad sum_t logp_it.
    """
    r = rewards.detach().double()
    w = is_weights.detach().double().to(r.device)
    g2 = grad_sq_norms.detach().double().to(r.device)
    if weight_mode == "readme":
        c = w * w * g2
    elif weight_mode == "code":
        c = w.clamp(max=is_cap) ** 2 * w * w * g2
    else:
        raise ValueError(f"unknown vcpo baseline weight {weight_mode!r}; choose readme or code")
    idx = group_index(group_ids).to(r.device)
    # scale-free: else weights of e^-10 each would be swamped by the eps
    c_max = torch.zeros(int(idx.max()) + 1, dtype=c.dtype,
                        device=c.device).scatter_reduce(0, idx, c, "amax")
    c = c / c_max.clamp(min=torch.finfo(c.dtype).tiny)[idx]
    b = _group_sums(c * r, idx) / (_group_sums(c, idx) + VCPO_EPS)
    adv = r - b[idx]
    if norm_by_std:
        _, std, _ = group_stats(r, idx, unbiased=False)
        adv = torch.where(std > VCPO_EPS, adv / std, adv)
    return adv.float()


def vcpo_ess_lr_scale(is_weights: Tensor, *, base: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """ESS-guided step size (sqrt rule): returns (lr multiplier, ESS, ESS / B).

    ESS = (sum w)^2 / sum w^2 over the GLOBAL minibatch (unclipped w); multiplier
    sqrt(min(1, (ESS/B) / base)). Computed in float64 after dividing by max w (ESS is scale-free).
    """
    w = is_weights.detach().double()
    w = w / w.max().clamp(min=1e-300)
    ess = w.sum() ** 2 / (w * w).sum().clamp(min=1e-300)
    ratio = ess / w.numel()
    return torch.sqrt(torch.clamp(ratio / base, max=1.0)), ess, ratio


# ------------------------------------------------------- OAPL (LOSSES.md section 9, reconstruction)
def oapl_targets(rewards: Tensor, group_ids: Tensor | Sequence, *, beta_v: float = 1.0) -> Tensor:
    """Regression targets A*_i = R_i - V_hat(x_g) [N],
    V_hat = beta_v (logsumexp_j(R_j/beta_v) - log G).

    RECONSTRUCTION (LOSSES.md section 9, UNCERTAIN): the soft value of the lagged inference
    policy's samples.
    """
    r = rewards.detach().double()
    idx = group_index(group_ids).to(r.device)
    n_groups = int(idx.max()) + 1
    z = r / beta_v
    zmax = torch.full((n_groups,), -torch.inf, dtype=r.dtype,
                      device=r.device).scatter_reduce(0, idx, z, "amax")
    sums = _group_sums(torch.exp(z - zmax[idx]), idx)
    counts = _group_sums(torch.ones_like(r), idx)
    v = beta_v * (zmax + torch.log(sums) - torch.log(counts))
    return (r - v[idx]).float()


# ----------------------------------------------------------- GAE for PPO with a critic (section 10)
def token_rewards(outcome: Tensor, mask: Tensor, *, process: Tensor | None = None,
                  kl: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """Token-level rewards [N, T] (fp64): ``outcome`` [N] on each row's last valid token, plus
    ``process`` [N, T] (a process reward at each step's last token, 0 elsewhere), minus
    ``kl_coef`` * ``kl`` [N, T] on every valid token (classic RLHF's per-token KL penalty).
    Rows without a valid token get nothing."""
    m = mask.detach().double()
    n, t = m.shape
    r = torch.zeros(n, t, dtype=torch.float64, device=m.device)
    has = m.sum(-1) > 0
    last = (t - 1 - (m > 0).flip(-1).double().argmax(-1)).clamp(min=0)
    rows = torch.arange(n, device=m.device)
    r[rows[has], last[has]] = outcome.detach().double().to(m.device)[has]
    if process is not None:
        r = r + process.detach().double().to(m.device) * m
    if kl_coef and kl is not None:
        r = r - kl_coef * torch.nan_to_num(kl.detach().double().to(m.device)) * m
    return r


def adaptive_lambda(lengths: Tensor, alpha: float = 0.05) -> Tensor:
    """VAPO's length-adaptive GAE lambda per row [N]: 1 - 1/(alpha l), l = the response's valid
    length, clamped to [0, 1] (l <= 1/alpha gives 0: one-step TD)."""
    ell = lengths.detach().double().clamp(min=1.0)
    return (1.0 - 1.0 / (alpha * ell)).clamp(0.0, 1.0)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float,
        lam: float | Tensor) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's valid tokens (fp64), returns
    (advantages, returns) [N, T], 0 on invalid tokens:
    delta_t = r_t + gamma V_{t'} - V_t, A_t = delta_t + gamma lam A_{t'}, t' the next valid token
    (V and A past the last valid token are 0: the episode ends), returns = A + V. ``lam``: one
    number or one per row [N]. Tokens with mask 0 inside a row (a multi-turn context) are skipped:
    neither a step of the recursion nor a reward."""
    m = mask.detach() > 0
    r = rewards.detach().double()
    v = values.detach().double().to(r.device)
    n, t_max = r.shape
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=r.device).expand(n)
    adv = torch.zeros_like(r)
    last = torch.zeros(n, dtype=torch.float64, device=r.device)
    next_v = torch.zeros_like(last)
    for t in range(t_max - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        cur = delta + gamma * lam_t * last
        last = torch.where(m[:, t], cur, last)
        next_v = torch.where(m[:, t], v[:, t], next_v)
        adv[:, t] = torch.where(m[:, t], cur, torch.zeros_like(cur))
    return adv, (adv + v) * m


# ---------------------------------------------------------- a kernel's advantages for one minibatch
@dataclass(frozen=True)
class AdvantageInputs:
    """One minibatch (whole groups) as a kernel's ``advantages`` rule sees it."""

    rewards: Tensor  # [N]
    group_ids: Tensor | Sequence  # [N]
    mask: Tensor  # [N, T]
    estimator: str  # trainer.estimator, for the kernels that use one
    # VCPO: (w_i, ||grad sum_t logp_it||^2) [N] at the weights this minibatch starts from
    score_terms: Callable[[], tuple[Tensor, Tensor]] | None = None


class Advantages(NamedTuple):
    """Advantages [N, T] of a minibatch, the factor on this optimizer step's LR,
    and stats to log."""

    values: Tensor
    lr_scale: float = 1.0
    stats: dict[str, float] = {}


def estimator_advantages(a: AdvantageInputs, _params: object = None) -> Advantages:
    """``trainer.estimator``'s advantages (section 1):
    the rule of every kernel but vcpo and oapl."""
    return Advantages(compute_advantages(a.estimator, a.rewards, a.group_ids, a.mask))


def oapl_advantages(a: AdvantageInputs, params: OAPLConfig) -> Advantages:
    """OAPL's regression targets R - V_hat on every token (section 9),
    V_hat at temperature ``beta1``."""
    m = a.mask.detach().float()
    return Advantages(
        oapl_targets(a.rewards, a.group_ids, beta_v=params.beta1).to(m.device)[:, None] * m)


def vcpo_step_advantages(a: AdvantageInputs, params: VCPOConfig) -> Advantages:
    """VCPO's OPOB advantages on every token and its ESS learning-rate scale (section 8)."""
    if a.score_terms is None:
        raise ValueError("vcpo advantages need the per-trajectory score terms "
                         "(see trainer/LOSSES.md section 8)")
    w, g2 = a.score_terms()
    adv = vcpo_advantages(a.rewards, w, g2, a.group_ids, weight_mode=params.baseline_weight,
                          is_cap=params.cap)
    scale, ess, _ = vcpo_ess_lr_scale(w, base=params.ess_base)
    m = a.mask.detach().float()
    stats = {"vcpo_lr_scale": float(scale), "vcpo_ess": float(ess),
             "vcpo_grad_sq_norm_mean": float(g2.mean())}
    return Advantages(adv.to(m.device)[:, None] * m, float(scale), stats)


# ------------------------------------------------ on-policy distillation (LOSSES.md section 11)
def distill_advantages(task: Tensor, teacher_logp: Tensor, behav_logp: Tensor, mask: Tensor,
                       has_teacher: Tensor, *, kl_weight: float,
                       task_reward_weight: float, group_ids: Tensor | None = None) -> Tensor:
    """Advantages [N, T] (fp32) of on-policy distillation: on each sampled token
    ``task_reward_weight * A_task + kl_weight * (log pi_teacher - log pi_behav)`` (the negative
    reverse KL's per-token estimate, the student's log-prob being the engine's behaviour log-prob);
    a row without the teacher's log-probs (``has_teacher`` [N] false) keeps ``A_task`` alone.
    With ``group_ids`` [N] (``distill.kl_baseline=group``) the KL term less its mean over the
    group's tokens with a teacher's log-prob at the same position (a baseline: the group's samples
    answer one prompt); a token alone at its position then gets 0. 0 off ``mask``."""
    m = mask.detach().double()
    a = task.detach().double().to(m.device)
    kl = (teacher_logp.detach().double() - behav_logp.detach().double()).to(m.device)
    if group_ids is not None:
        on = m * has_teacher.to(m.device)[:, None].double()
        idx = group_index(group_ids.to(m.device)).to(m.device)
        kl = kl - (_group_sums(kl * on, idx) / _group_sums(on, idx).clamp(min=1.0))[idx]
    mixed = task_reward_weight * a + kl_weight * kl
    return (torch.where(has_teacher.to(m.device)[:, None], mixed, a) * m).float()
