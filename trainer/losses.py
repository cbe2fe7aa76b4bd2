"""Policy-loss kernels: pure functions, tensors in, ``(loss, stats)`` out.

Formulas, sources and defaults: ``trainer/LOSSES.md`` (the section numbers below refer to it).

The three log-probability streams (all ``[B, T]``, per response token, fp32 math):
- ``logp``: current policy pi_theta, the only input that carries gradient;
- ``prox_logp``: pi_prox, recomputed by the trainer with the weights held at the start of the step;
- ``behav_logp``: pi_behav (mu), what the inference engine sampled with.
The off-policy ratio factorises as pi_theta/pi_behav = (pi_theta/pi_prox) * (pi_prox/pi_behav):
the first factor carries the gradient and is clipped (trust region), the second is a constant
importance weight that each kernel caps, truncates, masks or reshapes differently.

Invariants:
- Nothing but ``logp`` receives a gradient: prox/behav/ref log-probs, advantages, IS weights,
  masks and kernels are detached here, whatever the caller passes.
- Log-ratios are clamped to +-LOG_RATIO_BOUND before ``exp``; sequence sums are clamped after summing.
- Normalisers are arguments. With ``n_tokens_global`` / ``n_seqs_global`` (and a fixed
  ``scale_factor``) computed over the whole minibatch, the per-call losses of any split into
  micro-batches (whole sequences per call) SUM to the whole-minibatch loss. Stats follow the same
  rule: every stat sums over calls except those ending in ``_max`` (take the max); call
  ``finalize_stats`` on the reduced dict to derive ``ess_ratio``.
- No torch.distributed, no logging, no config objects.
"""

from __future__ import annotations

import math
from dataclasses import fields

import torch
from torch import Tensor

from areal_like.config import AGG_MODES, LOSS_KINDS, LossConfig
from trainer.loss_terms import (  # noqa: F401  (re-exported: the public surface of the kernels)
    LOG_RATIO_BOUND,
    Stats,
    accumulate_stats,
    aggregate,
    clamped,
    finalize_stats,
    kl_penalty,
    log_ratio,
    masked_diff,
    mismatch_stats,
    norms,
    seq_adv,
    seq_log_ratio,
    token_adv,
    weight_stats,
)

# GSPO clamps its token-view log-ratio from above only (verl compute_policy_loss_gspo).
GSPO_LOG_RATIO_MAX = 10.0
# VESPO numerics (FloyedShen/VESPO core_algos.py): floor on W before log and on lambda.
VESPO_W_MIN = 1e-8
VESPO_LAMBDA_MIN = 1e-4

# hparams accepted by compute_policy_loss: the fields of LossConfig (one source of defaults).
HPARAM_DEFAULTS = {f.name: f.default for f in fields(LossConfig) if f.name not in ("kind", "agg")}


# ---------------------------------------------------------------- PPO family (sections 2, 4, 5, 6)
def ppo_token_loss(
    logp: Tensor, prox_logp: Tensor, advantages: Tensor, mask: Tensor, *,
    eps_clip: float, eps_clip_high: float | None = None, dual_clip: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-clip per-token loss ``[B, T]`` (section 2), plus float masks of clipped / dual-clipped tokens.

    r = exp(clamp(logp - sg prox)); l = max(-A r, -A clip(r, 1-eps, 1+eps_high)); where A < 0 and
    ``dual_clip`` = c is set: l = min(l, -A c). Gradient -A r where unclipped, 0 where clipped.
    """
    adv = token_adv(advantages, mask)
    ratio = torch.exp(log_ratio(logp, prox_logp.detach(), mask))
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - eps_clip, 1.0 + eps_high)
    loss = torch.maximum(l1, l2)
    clipped = (l2 > l1).float() * mask
    dual = torch.zeros_like(clipped)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual = ((adv < 0) & (loss > bound)).float() * mask
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    return loss, clipped, dual


def _ppo_stats(clipped: Tensor, dual: Tensor, n_tok: float) -> Stats:
    return {"clip_frac": clipped.sum() / n_tok, "dual_clip_frac": dual.sum() / n_tok}


def _is_ratio(prox_logp: Tensor, behav_logp: Tensor, mask: Tensor, level: str) -> tuple[Tensor, Tensor, Tensor]:
    """rho = pi_prox / pi_behav (a constant). Returns (rho per token [B, T], raw rho at its level
    ([B, T] or [B]), validity of that level's entries). Sequence level: exp of the clamped sum."""
    if level == "token":
        rho = torch.exp(log_ratio(prox_logp.detach(), behav_logp.detach(), mask)) * mask
        return rho, rho, mask
    if level == "sequence":
        rho_seq = torch.exp(seq_log_ratio(prox_logp.detach(), behav_logp.detach(), mask))
        return rho_seq[:, None] * mask, rho_seq, (mask.sum(-1) > 0).float()
    raise ValueError(f"unknown IS level {level!r}; choose token or sequence")


def ppo_clip_loss(
    logp: Tensor, prox_logp: Tensor, advantages: Tensor, mask: Tensor, *,
    eps_clip: float = 0.2, eps_clip_high: float | None = None, dual_clip: float | None = None,
    agg: str = "token-mean", n_tokens_global: float | None = None, n_seqs_global: float | None = None,
    scale_factor: float | None = None,
) -> tuple[Tensor, Stats]:
    """PPO-clip with optional dual clip (section 2); GRPO is this with group-relative advantages."""
    mat, clipped, dual = ppo_token_loss(logp, prox_logp, advantages, mask, eps_clip=eps_clip,
                                        eps_clip_high=eps_clip_high, dual_clip=dual_clip)
    loss = aggregate(mat, mask, agg, n_tokens_global=n_tokens_global, n_seqs_global=n_seqs_global,
                     scale_factor=scale_factor)
    n_tok, _ = norms(mask, n_tokens_global, n_seqs_global)
    return loss, _ppo_stats(clipped, dual, n_tok)


def weighted_ppo_loss(
    logp: Tensor, prox_logp: Tensor, behav_logp: Tensor, advantages: Tensor, mask: Tensor, *,
    weight: str, level: str = "token", cap: float | None = None, low: float = 0.0, high: float = math.inf,
    eps_clip: float = 0.2, eps_clip_high: float | None = None, dual_clip: float | None = None,
    agg: str = "token-mean", n_tokens_global: float | None = None, n_seqs_global: float | None = None,
    scale_factor: float | None = None,
) -> tuple[Tensor, Stats]:
    """PPO per-token loss (after clip and dual clip) times a constant IS weight from rho = pi_prox/pi_behav.

    ``weight`` picks the weight (every rejected token or sequence keeps its place in the
    denominator with weight 0, so the caller's global counts stay valid):
    - ``"decoupled"`` (AReaL, section 4): rho where rho <= ``cap`` (None: no cap), else 0 (dropped, not truncated).
    - ``"truncate"`` (TIS, section 5): min(rho, ``cap``), truncated from above only.
    - ``"band"`` (Seq-MIS / IcePop, section 6): rho where ``low`` <= rho <= ``high``, else 0.
    ``level``: token rho, or the sequence product rho_i broadcast over the sequence's tokens.
    Stats ``is_weight_*`` describe the raw rho (before cap or mask) at that level.
    """
    mat, clipped, dual = ppo_token_loss(logp, prox_logp, advantages, mask, eps_clip=eps_clip,
                                        eps_clip_high=eps_clip_high, dual_clip=dual_clip)
    rho, rho_raw, valid = _is_ratio(prox_logp, behav_logp, mask, level)
    if weight == "decoupled":
        keep = rho_raw <= cap if cap is not None else torch.ones_like(rho_raw, dtype=torch.bool)
    elif weight == "band":
        keep = (rho_raw >= low) & (rho_raw <= high)
    elif weight == "truncate":
        keep = rho_raw <= cap  # only for the stat: truncated entries are kept at weight cap
    else:
        raise ValueError(f"unknown IS weight rule {weight!r}")
    keep_tok = keep[:, None].expand_as(mask) if keep.dim() == 1 else keep
    w = rho.clamp(max=cap) if weight == "truncate" else torch.where(keep_tok, rho, torch.zeros_like(rho))
    loss = aggregate(mat * w, mask, agg, n_tokens_global=n_tokens_global, n_seqs_global=n_seqs_global,
                     scale_factor=scale_factor)
    n_tok, n_seq = norms(mask, n_tokens_global, n_seqs_global)
    n_level = n_tok if level == "token" else n_seq
    frac_name = "truncated_frac" if weight == "truncate" else "masked_frac"
    stats = _ppo_stats(clipped, dual, n_tok)
    stats[frac_name] = ((~keep).float() * valid).sum() / n_level
    stats.update(weight_stats(rho_raw, valid, n_level))
    return loss, stats


def gspo_loss(
    logp: Tensor, prox_logp: Tensor, advantages: Tensor, mask: Tensor, *,
    eps_clip: float = 3e-4, eps_clip_high: float | None = 4e-4,
    n_tokens_global: float | None = None, n_seqs_global: float | None = None,
) -> tuple[Tensor, Stats]:
    """GSPO (section 3): clipped geometric-mean sequence ratio s_i, token view with per-token gradient.

    log s_it = sg[log s_i] + logp_t - sg[logp_t]: value log s_i, gradient 1 per token, so each
    token's gradient is -A s_i and the sequence gets the exact gradient of its objective.
    Aggregation is always seq-mean-token-mean (verl forces it).
    """
    log_s = masked_diff(logp, prox_logp.detach(), mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    lp = torch.where(mask > 0, logp.float(), torch.zeros_like(mask))
    log_s_tok = log_s.detach()[:, None] + lp - lp.detach()
    s = torch.exp(log_s_tok.clamp(max=GSPO_LOG_RATIO_MAX))
    adv = token_adv(advantages, mask)
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high
    l1 = -adv * s
    l2 = -adv * s.clamp(1.0 - eps_clip, 1.0 + eps_high)
    loss = aggregate(torch.maximum(l1, l2), mask, "seq-mean-token-mean",
                     n_tokens_global=n_tokens_global, n_seqs_global=n_seqs_global)
    n_tok, n_seq = norms(mask, n_tokens_global, n_seqs_global)
    valid = (mask.sum(-1) > 0).float()
    stats = {"clip_frac": ((l2 > l1).float() * mask).sum() / n_tok,
             "seq_ratio_mean": (torch.exp(log_s.detach().clamp(max=GSPO_LOG_RATIO_MAX)) * valid).sum() / n_seq}
    return loss, stats


def vespo_phi(log_w: Tensor, positive: Tensor, *, k_pos: float = 2.0, lambda_pos: float = 3.0,
              k_neg: float = 3.0, lambda_neg: float = 2.0) -> Tensor:
    """VESPO kernel phi(W) = W^k exp(lambda (1 - W)), (k, lambda) by the sign of the advantage.

    phi(1) = 1 (on-policy keeps full weight), phi -> 0 as W -> 0 and W -> inf; nan/inf -> 0.
    """
    k = torch.where(positive, torch.full_like(log_w, k_pos), torch.full_like(log_w, k_neg))
    lam = torch.where(positive, torch.full_like(log_w, lambda_pos), torch.full_like(log_w, lambda_neg))
    lam = lam.clamp(min=VESPO_LAMBDA_MIN)
    w = torch.exp(log_w).clamp(min=VESPO_W_MIN)
    log_phi = lam + k * torch.log(w) - lam * w
    return torch.nan_to_num(torch.exp(log_phi), nan=0.0, posinf=0.0, neginf=0.0)


def vespo_loss(
    logp: Tensor, behav_logp: Tensor, advantages: Tensor, mask: Tensor, *, prox_logp: Tensor | None = None,
    k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0,
    agg: str = "token-mean", n_tokens_global: float | None = None, n_seqs_global: float | None = None,
    scale_factor: float | None = None,
) -> tuple[Tensor, Stats]:
    """VESPO (section 7): REINFORCE with the sequence weight reshaped by phi(W), W = pi_theta/pi_behav.

    log W_i = clamp(sum_t clamp(sg logp - old)) with old = behav (fully async), or old = prox plus
    the folded sum_t clamp(prox - behav) when ``prox_logp`` is given (verl's sync path): both give
    W = pi_theta/pi_behav. Per-token clamps before the sum, as in the VESPO code. Loss matrix
    -phi_i A_it logp_it; only its gradient is meaningful.
    """
    lp_d = logp.detach()
    if prox_logp is None:
        log_w = log_ratio(lp_d, behav_logp.detach(), mask).sum(-1)
    else:
        fold = log_ratio(prox_logp.detach(), behav_logp.detach(), mask)  # verl rollout-IS weight, folded in
        log_w = (log_ratio(lp_d, prox_logp.detach(), mask) + fold).sum(-1)
    log_w = clamped(log_w)
    phi = vespo_phi(log_w, seq_adv(advantages, mask) >= 0, k_pos=k_pos, lambda_pos=lambda_pos,
                    k_neg=k_neg, lambda_neg=lambda_neg)
    lp = torch.where(mask > 0, logp.float(), torch.zeros_like(mask))
    mat = -phi[:, None] * token_adv(advantages, mask) * lp
    loss = aggregate(mat, mask, agg, n_tokens_global=n_tokens_global, n_seqs_global=n_seqs_global,
                     scale_factor=scale_factor)
    _, n_seq = norms(mask, n_tokens_global, n_seqs_global)
    valid = (mask.sum(-1) > 0).float()
    stats = weight_stats(torch.exp(log_w), valid, n_seq)
    stats["vespo_phi_mean"] = (phi * valid).sum() / n_seq
    return loss, stats


def vcpo_is_weights(old_logp: Tensor, behav_logp: Tensor, mask: Tensor, *, cap: float = 8.0) -> tuple[Tensor, Tensor]:
    """VCPO sequence IS weights (section 8, step 1): w_i = exp(clamp(sum_t (old - behav))), w~ = min(w, cap).

    ``old`` is the current policy detached (``prox_logp`` when the trainer has it). Constants, [B].
    """
    w = torch.exp(seq_log_ratio(old_logp.detach(), behav_logp.detach(), mask))
    return w, w.clamp(max=cap)


def vcpo_loss(
    logp: Tensor, behav_logp: Tensor, advantages: Tensor, mask: Tensor, *, prox_logp: Tensor | None = None,
    is_cap: float = 8.0, n_tokens_global: float | None = None, n_seqs_global: float | None = None,
) -> tuple[Tensor, Stats]:
    """VCPO policy loss (section 8, steps 2 and 5): -(1/B) sum_i A_i w~_i (1/L_i) sum_t logp_it.

    ``advantages`` must be the OPOB advantages (R_i - b*_g)/sigma_g from
    ``advantages.vcpo_advantages`` (computed on the whole minibatch). Plain REINFORCE (no ratio,
    no clip), seq-mean-token-mean always. The ESS learning-rate scale comes from the summed stats
    (``finalize_stats`` -> ``ess_ratio``) or ``advantages.vcpo_ess_lr_scale`` on the global weights.
    """
    old = logp.detach() if prox_logp is None else prox_logp
    w, w_clip = vcpo_is_weights(old, behav_logp, mask, cap=is_cap)
    lp = torch.where(mask > 0, logp.float(), torch.zeros_like(mask))
    mat = -w_clip[:, None] * token_adv(advantages, mask) * lp
    loss = aggregate(mat, mask, "seq-mean-token-mean", n_tokens_global=n_tokens_global, n_seqs_global=n_seqs_global)
    _, n_seq = norms(mask, n_tokens_global, n_seqs_global)
    valid = (mask.sum(-1) > 0).float()
    stats = weight_stats(w, valid, n_seq)
    stats["truncated_frac"] = ((w > is_cap).float() * valid).sum() / n_seq
    return loss, stats


def oapl_loss(
    logp: Tensor, behav_logp: Tensor, targets: Tensor, mask: Tensor, *, beta: float = 1.0,
    n_seqs_global: float | None = None,
) -> tuple[Tensor, Stats]:
    """OAPL, RECONSTRUCTION (section 9, UNCERTAIN: check against arXiv 2602.19362 before relying on it).

    L = (1/B) sum_i (beta * Delta_i - A*_i)^2, Delta_i = sum_t (logp - behav) (sequence log-ratio
    to the lagged inference policy, no IS, no clamp: the regression pulls large ratios back) and
    A*_i = R_i - V_hat(x_g) from ``advantages.oapl_targets`` (whole minibatch). Mean over sequences.
    """
    delta = masked_diff(logp, behav_logp.detach(), mask).sum(-1)
    valid = (mask.sum(-1) > 0).float()
    resid = beta * delta - seq_adv(targets, mask)
    _, n_seq = norms(mask, None, n_seqs_global)
    loss = (resid * resid * valid).sum() / n_seq
    stats = {"oapl_delta_mean": (delta.detach() * valid).sum() / n_seq,
             "oapl_residual_sq_mean": (resid.detach() ** 2 * valid).sum() / n_seq}
    return loss, stats


# ---------------------------------------------------------------- dispatcher
# Which kernels ratio against a recomputed pi_prox. The others use pi_behav as their anchor
# (vespo async, vcpo's old = current detached, oapl's lagged policy) and take prox_logp only if given.
KERNEL_NEEDS_PROX = {"ppo": True, "decoupled_ppo": True, "tis": True, "mis": True, "icepop": True,
                     "gspo": True, "vespo": False, "vcpo": False, "oapl": False}


def kernel_needs_prox(kind: str) -> bool:
    """Whether ``kind`` needs the trainer to recompute prox_logp at the start of the step."""
    if kind not in KERNEL_NEEDS_PROX:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")
    return KERNEL_NEEDS_PROX[kind]


def compute_policy_loss(
    kind: str, *, logp: Tensor, prox_logp: Tensor | None, behav_logp: Tensor, advantages: Tensor, mask: Tensor,
    agg: str, group_ids: object = None, rewards: Tensor | None = None, n_tokens_global: float | None = None,
    n_seqs_global: float | None = None, ref_logp: Tensor | None = None, entropy: Tensor | None = None,
    **hparams: float | str | None,
) -> tuple[Tensor, Stats]:
    """One entry point for every kernel: ``(loss, stats)`` for this call's rows.

    Args (tensors ``[B, T]`` unless noted; ``advantages`` may be ``[B]``):
        kind: one of LOSS_KINDS. ``prox_logp`` may be None when ``kernel_needs_prox(kind)`` is False.
        advantages: per-token advantages; for ``vcpo`` the OPOB advantages and for ``oapl`` the
            regression targets R - V_hat: compute them once per minibatch with
            ``advantages.kernel_advantages`` (they need whole groups, micro-batches may split them).
        agg: aggregation mode; gspo and vcpo always use seq-mean-token-mean, oapl a mean over sequences.
        group_ids, rewards: accepted for the caller's convenience and unused: everything
            group-dependent is already in ``advantages``.
        n_tokens_global, n_seqs_global: minibatch-global valid-token count and count of sequences
            with at least one valid token; None = this call's own (single-call use).
        ref_logp: reference-policy log-probs, required when ``kl_coef`` > 0.
        entropy: optional per-token entropy for the ``entropy`` stat.
        **hparams: fields of ``areal_like.config.LossConfig`` (unknown names raise TypeError).
    Returns: scalar loss (to minimise) and detached stats, summable over calls (see module doc).
    """
    unknown = set(hparams) - set(HPARAM_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown loss hyper-parameters {sorted(unknown)}; allowed: {sorted(HPARAM_DEFAULTS)}")
    if kernel_needs_prox(kind) and prox_logp is None:
        raise ValueError(f"loss kind {kind!r} needs prox_logp (recompute it, or pass behav_logp for bypass mode)")
    if agg not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {agg!r}; choose one of {AGG_MODES}")
    hp = {**HPARAM_DEFAULTS, **hparams}
    mask = mask.detach().float()
    counts = dict(n_tokens_global=n_tokens_global, n_seqs_global=n_seqs_global)
    aggs = dict(agg=agg, scale_factor=hp["loss_scale_factor"], **counts)
    clip = dict(eps_clip=hp["eps_clip"], eps_clip_high=hp["eps_clip_high"], dual_clip=hp["dual_clip"])
    ppo_args = (logp, prox_logp, behav_logp, advantages, mask)
    if kind == "ppo":
        loss, stats = ppo_clip_loss(logp, prox_logp, advantages, mask, **clip, **aggs)
    elif kind == "decoupled_ppo":
        loss, stats = weighted_ppo_loss(*ppo_args, weight="decoupled", cap=hp["behav_cap"], **clip, **aggs)
    elif kind == "tis":
        loss, stats = weighted_ppo_loss(*ppo_args, weight="truncate", level=hp["tis_level"], cap=hp["tis_cap"],
                                        **clip, **aggs)
    elif kind in ("mis", "icepop"):
        level = "sequence" if kind == "mis" else "token"
        loss, stats = weighted_ppo_loss(*ppo_args, weight="band", level=level, low=hp["mis_low"],
                                        high=hp["mis_high"], **clip, **aggs)
    elif kind == "gspo":
        loss, stats = gspo_loss(logp, prox_logp, advantages, mask, eps_clip=hp["eps_clip"],
                                eps_clip_high=hp["eps_clip_high"], **counts)
    elif kind == "vespo":
        loss, stats = vespo_loss(logp, behav_logp, advantages, mask, prox_logp=prox_logp,
                                 k_pos=hp["vespo_k_pos"], lambda_pos=hp["vespo_lambda_pos"],
                                 k_neg=hp["vespo_k_neg"], lambda_neg=hp["vespo_lambda_neg"], **aggs)
    elif kind == "vcpo":
        loss, stats = vcpo_loss(logp, behav_logp, advantages, mask, prox_logp=prox_logp,
                                is_cap=hp["vcpo_is_cap"], **counts)
    elif kind == "oapl":
        loss, stats = oapl_loss(logp, behav_logp, advantages, mask, beta=hp["oapl_beta"],
                                n_seqs_global=n_seqs_global)
    else:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")
    return _add_common(loss, stats, logp, prox_logp, behav_logp, mask, hp, aggs, ref_logp, entropy)


def _add_common(loss: Tensor, stats: Stats, logp: Tensor, prox_logp: Tensor | None, behav_logp: Tensor,
                mask: Tensor, hp: dict, aggs: dict, ref_logp: Tensor | None,
                entropy: Tensor | None) -> tuple[Tensor, Stats]:
    """KL-to-reference term, mismatch KL, entropy and loss stats shared by every kernel."""
    n_tok, _ = norms(mask, aggs["n_tokens_global"], aggs["n_seqs_global"])
    stats = {k: v.detach().float() for k, v in stats.items()}
    stats["policy_loss"] = loss.detach()
    if hp["kl_coef"]:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = kl_penalty(logp, ref_logp, mask, estimator=hp["kl_estimator"])
        loss = loss + hp["kl_coef"] * aggregate(kl, mask, aggs["agg"], n_tokens_global=aggs["n_tokens_global"],
                                                n_seqs_global=aggs["n_seqs_global"], scale_factor=aggs["scale_factor"])
        stats["kl_ref"] = (kl.detach() * mask).sum() / n_tok
    old = logp.detach() if prox_logp is None else prox_logp
    stats.update(mismatch_stats(old, behav_logp, mask, n_tok))
    if entropy is not None:
        stats["entropy"] = (entropy.detach().float() * mask).sum() / n_tok
    stats["loss"] = loss.detach()
    return loss, stats
