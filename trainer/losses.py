"""Policy-loss kernels: pure functions, tensors in, ``(loss, stats)`` out,
and their table ``KERNELS``.

Formulas, sources and the three log-prob streams: ``trainer/LOSSES.md`` (section numbers below).
Invariants:
- Nothing but ``logp`` receives a gradient.
- Log-ratios are clamped to +-LOG_RATIO_BOUND before ``exp``; sequence sums after summing.
- With the minibatch-global ``n_tokens_global`` / ``n_seqs_global`` the per-call losses and stats
  SUM to the whole-minibatch ones (``_max`` stats: max); ``finalize_stats`` derives ``ess_ratio``.
- No torch.distributed, no logging; nothing outside ``KERNELS`` tests a kernel's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from areal_like.settings.loss_schema import (
    DecoupledPPOConfig,
    GSPOConfig,
    IcePopConfig,
    LossConfig,
    MISConfig,
    OAPLConfig,
    TISConfig,
    VCPOConfig,
    VESPOConfig,
)
from trainer.advantages import (
    AdvantageInputs,
    Advantages,
    estimator_advantages,
    oapl_advantages,
    vcpo_step_advantages,
)

# accumulate_stats, finalize_stats: re-exported for the trainer
from trainer.loss_terms import (  # noqa: F401
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


@dataclass(frozen=True)
class LossInputs:
    """One call's rows (``[B, T]``; ``advantages`` may be ``[B]``)
    and the knobs every kernel shares."""

    logp: Tensor
    prox_logp: Tensor | None
    behav_logp: Tensor
    advantages: Tensor
    mask: Tensor  # float, detached
    cfg: LossConfig
    n_tokens_global: float | None = None
    n_seqs_global: float | None = None

    def counts(self) -> tuple[float, float]:
        """(tokens, sequences) that normalise this call:
        the minibatch's when given, else its own."""
        return norms(self.mask, self.n_tokens_global, self.n_seqs_global)

    def aggregate(self, mat: Tensor, mode: str | None = None) -> Tensor:
        """``mat`` reduced by ``mode`` (default ``trainer.loss.agg``) with the global counts."""
        return aggregate(mat, self.mask, mode or self.cfg.agg, n_tokens_global=self.n_tokens_global,
                         n_seqs_global=self.n_seqs_global, scale_factor=self.cfg.loss_scale_factor)

    def valid(self) -> Tensor:
        """[B] 1.0 for the sequences with at least one valid token."""
        return (self.mask.sum(-1) > 0).float()


# ---------------------------------------------------------------- PPO family (sections 2, 4, 5, 6)
def clip_loss(adv: Tensor, ratio: Tensor, eps_low: float,
              eps_high: float | None) -> tuple[Tensor, Tensor]:
    """max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) per token,
    and where the clipped term won."""
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - eps_low, 1.0 + (eps_low if eps_high is None else eps_high))
    return torch.maximum(l1, l2), (l2 > l1).float()


def ppo_token_loss(x: LossInputs) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-clip per-token loss ``[B, T]`` (section 2),
    plus float masks of clipped / dual-clipped tokens.

    r = exp(clamp(logp - sg prox)); l = max(-A r, -A clip(r, 1-eps, 1+eps_high)); where A < 0 and
    ``dual_clip`` = c is set: l = min(l, -A c). Gradient -A r where unclipped, 0 where clipped.
    """
    c, mask = x.cfg, x.mask
    adv = token_adv(x.advantages, mask)
    ratio = torch.exp(log_ratio(x.logp, x.prox_logp.detach(), mask))
    loss, clipped = clip_loss(adv, ratio, c.eps_clip, c.eps_clip_high)
    clipped = clipped * mask
    dual = torch.zeros_like(clipped)
    if c.dual_clip is not None:
        bound = -adv * c.dual_clip
        hit = (adv < 0) & (loss > bound)  # at r = c exactly nothing clips: the full gradient
        loss, dual = torch.where(hit, bound, loss), hit.float() * mask
    return loss, clipped, dual


def _ppo_stats(clipped: Tensor, dual: Tensor, n_tok: float) -> Stats:
    return {"clip_frac": clipped.sum() / n_tok, "dual_clip_frac": dual.sum() / n_tok}


def _is_ratio(x: LossInputs, level: str) -> tuple[Tensor, Tensor, Tensor]:
    """rho = pi_prox / pi_behav (a constant). Returns (rho per token [B, T], raw rho at its level
    ([B, T] or [B]), validity of that level's entries). Sequence level: exp of the clamped sum."""
    prox, behav, mask = x.prox_logp.detach(), x.behav_logp.detach(), x.mask
    if level == "token":
        rho = torch.exp(log_ratio(prox, behav, mask)) * mask
        return rho, rho, mask
    rho_seq = torch.exp(seq_log_ratio(prox, behav, mask))
    return rho_seq[:, None] * mask, rho_seq, x.valid()


def ppo_loss(x: LossInputs, _params: None = None) -> tuple[Tensor, Stats]:
    """PPO-clip with optional dual clip (section 2); GRPO is this with group-relative advantages."""
    mat, clipped, dual = ppo_token_loss(x)
    return x.aggregate(mat), _ppo_stats(clipped, dual, x.counts()[0])


def weighted_ppo_loss(x: LossInputs, level: str, keep: Callable[[Tensor], Tensor],
                      truncate_at: float | None = None) -> tuple[Tensor, Stats]:
    """PPO per-token loss (after clip and dual clip) times a constant IS weight
    from rho = pi_prox/pi_behav.

    ``level``: token rho, or the sequence product rho_i on every token of the sequence. The weight
    is rho where ``keep(rho)`` and 0 elsewhere (a rejected entry keeps its place in the
    denominator, so the global counts stay valid), or, with ``truncate_at`` = C, min(rho, C)
    (``keep`` then only tells the ``truncated_frac`` stat). Stats ``is_weight_*`` describe the raw
    rho, before cap or mask, at that level.
    """
    mat, clipped, dual = ppo_token_loss(x)
    rho, rho_raw, valid = _is_ratio(x, level)
    kept = keep(rho_raw)
    kept_tok = kept[:, None].expand_as(x.mask) if kept.dim() == 1 else kept
    w = (rho.clamp(max=truncate_at) if truncate_at is not None
         else torch.where(kept_tok, rho, torch.zeros_like(rho)))
    n_tok, n_seq = x.counts()
    n_level = n_tok if level == "token" else n_seq
    stats = _ppo_stats(clipped, dual, n_tok)
    stats["truncated_frac" if truncate_at is not None else "masked_frac"] = (
        ((~kept).float() * valid).sum() / n_level)
    stats.update(weight_stats(rho_raw, valid, n_level))
    return x.aggregate(mat * w), stats


def decoupled_ppo_loss(x: LossInputs, p: DecoupledPPOConfig) -> tuple[Tensor, Stats]:
    """AReaL (section 4): tokens with rho <= cap keep weight rho,
    the others are dropped (not truncated)."""
    return weighted_ppo_loss(x, "token", lambda rho: rho <= (torch.inf if p.cap is None else p.cap))


def tis_loss(x: LossInputs, p: TISConfig) -> tuple[Tensor, Stats]:
    """TIS (section 5): weight min(rho, cap), truncated from above only."""
    return weighted_ppo_loss(x, p.level, lambda rho: rho <= p.cap, truncate_at=p.cap)


def mis_loss(x: LossInputs, p: MISConfig) -> tuple[Tensor, Stats]:
    """Seq-MIS (section 6): the sequence weight rho_i kept inside [low, high], else 0."""
    return weighted_ppo_loss(x, "sequence", lambda rho: (rho >= p.low) & (rho <= p.high))


def icepop_loss(x: LossInputs, p: IcePopConfig) -> tuple[Tensor, Stats]:
    """IcePop (section 6): each token's rho kept inside [low, high], else 0."""
    return weighted_ppo_loss(x, "token", lambda rho: (rho >= p.low) & (rho <= p.high))


# ---------------------------------------------------------------- GSPO (section 3)
def gspo_loss(x: LossInputs, p: GSPOConfig) -> tuple[Tensor, Stats]:
    """GSPO (section 3): clipped geometric-mean sequence ratio s_i,
    token view with per-token gradient.

    log s_it = sg[log s_i] + logp_t - sg[logp_t]: value log s_i, gradient 1 per token, so each
    token's gradient is -A s_i and the sequence gets the exact gradient of its objective.
    Aggregation is always seq-mean-token-mean (verl forces it).
    """
    mask = x.mask
    log_s = masked_diff(x.logp, x.prox_logp.detach(), mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    lp = torch.where(mask > 0, x.logp.float(), torch.zeros_like(mask))
    s = torch.exp((log_s.detach()[:, None] + lp - lp.detach()).clamp(max=GSPO_LOG_RATIO_MAX))
    mat, clipped = clip_loss(token_adv(x.advantages, mask), s, p.eps_clip, p.eps_clip_high)
    n_tok, n_seq = x.counts()
    seq_ratio = torch.exp(log_s.detach().clamp(max=GSPO_LOG_RATIO_MAX))
    stats = {"clip_frac": (clipped * mask).sum() / n_tok,
             "seq_ratio_mean": (seq_ratio * x.valid()).sum() / n_seq}
    return x.aggregate(mat, "seq-mean-token-mean"), stats


# ---------------------------------------------------------------- VESPO (section 7)
def vespo_phi(log_w: Tensor, positive: Tensor, *, k_pos: float = 2.0, lambda_pos: float = 3.0,
              k_neg: float = 3.0, lambda_neg: float = 2.0) -> Tensor:
    """VESPO kernel phi(W) = W^k exp(lambda (1 - W)), (k, lambda) by the sign of the advantage.

    phi(1) = 1 (on-policy keeps full weight), phi -> 0 as W -> 0 and W -> inf; nan/inf -> 0.
    """
    k = torch.where(positive, torch.full_like(log_w, k_pos), torch.full_like(log_w, k_neg))
    lam = torch.where(positive, torch.full_like(log_w, lambda_pos),
                      torch.full_like(log_w, lambda_neg))
    lam = lam.clamp(min=VESPO_LAMBDA_MIN)
    w = torch.exp(log_w).clamp(min=VESPO_W_MIN)
    log_phi = lam + k * torch.log(w) - lam * w
    return torch.nan_to_num(torch.exp(log_phi), nan=0.0, posinf=0.0, neginf=0.0)


def vespo_loss(x: LossInputs, p: VESPOConfig) -> tuple[Tensor, Stats]:
    """VESPO (section 7): REINFORCE with the sequence weight reshaped by phi(W),
    W = pi_theta/pi_behav.

    log W_i = clamp(sum_t clamp(sg logp - old)) with old = behav (fully async), or old = prox plus
    the folded sum_t clamp(prox - behav) when ``prox_logp`` is given (verl's sync path): both give
    W = pi_theta/pi_behav. Per-token clamps before the sum, as in the VESPO code. Loss matrix
    -phi_i A_it logp_it; only its gradient is meaningful.
    """
    mask, lp_d, behav = x.mask, x.logp.detach(), x.behav_logp.detach()
    if x.prox_logp is None:
        log_w = log_ratio(lp_d, behav, mask).sum(-1)
    else:  # verl's rollout-IS weight, folded in
        prox = x.prox_logp.detach()
        log_w = (log_ratio(lp_d, prox, mask) + log_ratio(prox, behav, mask)).sum(-1)
    log_w = clamped(log_w)
    phi = vespo_phi(log_w, seq_adv(x.advantages, mask) >= 0, k_pos=p.k_pos, lambda_pos=p.lambda_pos,
                    k_neg=p.k_neg, lambda_neg=p.lambda_neg)
    lp = torch.where(mask > 0, x.logp.float(), torch.zeros_like(mask))
    n_seq, valid = x.counts()[1], x.valid()
    stats = weight_stats(torch.exp(log_w), valid, n_seq)
    stats["vespo_phi_mean"] = (phi * valid).sum() / n_seq
    return x.aggregate(-phi[:, None] * token_adv(x.advantages, mask) * lp), stats


# ------------------------------------------------------------ VCPO (section 8) and OAPL (section 9)
def vcpo_is_weights(old_logp: Tensor, behav_logp: Tensor, mask: Tensor, *,
                    cap: float = 8.0) -> tuple[Tensor, Tensor]:
    """VCPO sequence IS weights (section 8, step 1):
    w_i = exp(clamp(sum_t (old - behav))), w~ = min(w, cap).

    ``old`` is the current policy detached (``prox_logp`` when the trainer has it). Constants, [B].
    """
    w = torch.exp(seq_log_ratio(old_logp.detach(), behav_logp.detach(), mask))
    return w, w.clamp(max=cap)


def vcpo_loss(x: LossInputs, p: VCPOConfig) -> tuple[Tensor, Stats]:
    """VCPO policy loss (section 8, steps 2 and 5): -(1/B) sum_i A_i w~_i (1/L_i) sum_t logp_it.

    ``advantages`` must be the OPOB advantages (R_i - b*_g)/sigma_g (``vcpo_step_advantages``, on
    the whole minibatch). Plain REINFORCE (no ratio, no clip), seq-mean-token-mean always. The ESS
    learning-rate scale comes with those advantages, or from ``finalize_stats`` -> ``ess_ratio``.
    """
    old = x.logp.detach() if x.prox_logp is None else x.prox_logp
    w, w_clip = vcpo_is_weights(old, x.behav_logp, x.mask, cap=p.cap)
    lp = torch.where(x.mask > 0, x.logp.float(), torch.zeros_like(x.mask))
    mat = -w_clip[:, None] * token_adv(x.advantages, x.mask) * lp
    n_seq, valid = x.counts()[1], x.valid()
    stats = weight_stats(w, valid, n_seq)
    stats["truncated_frac"] = ((w > p.cap).float() * valid).sum() / n_seq
    return x.aggregate(mat, "seq-mean-token-mean"), stats


def oapl_loss(x: LossInputs, p: OAPLConfig) -> tuple[Tensor, Stats]:
    """OAPL (section 9; the form is a reconstruction, the defaults are the published ones).

    L = (1/B) sum_i (beta2 * Delta_i - A*_i)^2, Delta_i = sum_t (logp - behav) (sequence log-ratio
    to the lagged inference policy, no IS, no clamp: the regression pulls large ratios back) and
    A*_i = R_i - V_hat(x_g), the ``advantages`` (``oapl_advantages``, whole minibatch).
    Mean over sequences.
    """
    delta = masked_diff(x.logp, x.behav_logp.detach(), x.mask).sum(-1)
    valid = x.valid()
    resid = p.beta2 * delta - seq_adv(x.advantages, x.mask)
    _, n_seq = norms(x.mask, None, x.n_seqs_global)
    stats = {"oapl_delta_mean": (delta.detach() * valid).sum() / n_seq,
             "oapl_residual_sq_mean": (resid.detach() ** 2 * valid).sum() / n_seq}
    return (resid * resid * valid).sum() / n_seq, stats


# ---------------------------------------------------------------- the critic (section 10)
def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               clip: float | None, n_tokens_global: float | None = None) -> tuple[Tensor, Stats]:
    """The critic's clipped value loss (PPO2, as verl and OpenRLHF): token-mean of
    0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2); ``clip`` None: 0.5 (V - R)^2.
    Only ``values`` gets a gradient; ``n_tokens_global``: the minibatch's valid tokens (None: this
    call's), so the per-call losses sum to the minibatch's."""
    m = mask.detach().float()
    n_tok, _ = norms(m, n_tokens_global, None)
    v = torch.where(m > 0, values.float(), torch.zeros_like(m))
    ret = torch.where(m > 0, returns.detach().float(), torch.zeros_like(m))
    sq = (v - ret) ** 2
    if clip is None:
        per_tok, clipped = sq, torch.zeros_like(sq)
    else:
        old = torch.where(m > 0, old_values.detach().float(), torch.zeros_like(m))
        sq_clip = (old + (v - old).clamp(-clip, clip) - ret) ** 2
        per_tok, clipped = torch.maximum(sq, sq_clip), (sq_clip > sq).float()
    loss = 0.5 * (per_tok * m).sum() / n_tok
    stats = {"value_loss": loss.detach(), "value_clip_frac": (clipped * m).sum() / n_tok,
             "value_mean": (v.detach() * m).sum() / n_tok,
             "return_mean": (ret * m).sum() / n_tok}
    return loss, stats


# ---------------------------------------------------------------- the table
@dataclass(frozen=True)
class Kernel:
    """A policy-loss kernel: everything the trainer needs to know about it, in one entry."""

    name: str  # trainer.loss.kernel
    # the trainer recomputes pi_prox at the start of the step (else prox_logp is None)
    needs_prox: bool
    # per minibatch (whole groups), before its loss
    advantages: Callable[[AdvantageInputs, Any], Advantages]
    loss: Callable[[LossInputs, Any], tuple[Tensor, Stats]]  # per micro-batch call
    # its own knobs: the section trainer.loss.<name> (None: only the shared ones)
    config: type | None
    # advantages depend on the weights each minibatch starts from (vcpo's score norms): computed per
    # minibatch; otherwise once on the whole batch (REINFORCE++ whitens over the whole batch)
    per_minibatch: bool = False
    # a row whose every advantage is 0 adds exactly 0 to the loss and its gradient, and no row's
    # loss depends on another's: such rows need not be computed (trainer/step.py trained_rows)
    zero_at_zero_advantage: bool = False


# The others than the PPO family and GSPO take pi_behav as their anchor (vespo, vcpo's old = the
# current policy detached, oapl's lagged policy) and use prox_logp only when it is given.
KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("ppo", True, estimator_advantages, ppo_loss, None, zero_at_zero_advantage=True),
    Kernel("decoupled_ppo", True, estimator_advantages, decoupled_ppo_loss, DecoupledPPOConfig,
           zero_at_zero_advantage=True),
    Kernel("tis", True, estimator_advantages, tis_loss, TISConfig, zero_at_zero_advantage=True),
    Kernel("mis", True, estimator_advantages, mis_loss, MISConfig, zero_at_zero_advantage=True),
    Kernel("icepop", True, estimator_advantages, icepop_loss, IcePopConfig,
           zero_at_zero_advantage=True),
    Kernel("gspo", True, estimator_advantages, gspo_loss, GSPOConfig, zero_at_zero_advantage=True),
    Kernel("vespo", False, estimator_advantages, vespo_loss, VESPOConfig,
           zero_at_zero_advantage=True),
    Kernel("vcpo", False, vcpo_step_advantages, vcpo_loss, VCPOConfig, per_minibatch=True),
    Kernel("oapl", False, oapl_advantages, oapl_loss, OAPLConfig),
)}


def compute_policy_loss(
    cfg: LossConfig, *, logp: Tensor, prox_logp: Tensor | None, behav_logp: Tensor,
    advantages: Tensor,
    mask: Tensor, n_tokens_global: float | None = None, n_seqs_global: float | None = None,
    ref_logp: Tensor | None = None, entropy: Tensor | None = None,
) -> tuple[Tensor, Stats]:
    """One entry point for every kernel: ``(loss, stats)`` for this call's rows ([B, T];
    ``advantages`` may be [B], from the kernel's ``advantages`` rule). ``n_tokens_global`` /
    ``n_seqs_global``: the minibatch's counts (None: this call's own); ``ref_logp`` required when
    ``cfg.kl_coef`` > 0; ``entropy`` only for its stat. Stats are detached and summable."""
    k = KERNELS[cfg.kernel]  # cfg.kernel is one of LOSS_KINDS (LossConfig checks it)
    if k.needs_prox and prox_logp is None:
        raise ValueError(f"loss kernel {k.name!r} needs prox_logp "
                         "(recompute it, or pass behav_logp for bypass mode)")
    x = LossInputs(logp, prox_logp, behav_logp, advantages, mask.detach().float(), cfg,
                   n_tokens_global,
                   n_seqs_global)
    loss, stats = k.loss(x, cfg.params)
    return _add_common(loss, stats, x, ref_logp, entropy)


def _add_common(loss: Tensor, stats: Stats, x: LossInputs, ref_logp: Tensor | None,
                entropy: Tensor | None) -> tuple[Tensor, Stats]:
    """KL-to-reference term, mismatch KL, entropy and loss stats shared by every kernel."""
    n_tok, _ = x.counts()
    stats = {k: v.detach().float() for k, v in stats.items()}
    stats["policy_loss"] = loss.detach()
    if x.cfg.kl_coef:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = kl_penalty(x.logp, ref_logp, x.mask, estimator=x.cfg.kl_estimator)
        loss = loss + x.cfg.kl_coef * x.aggregate(kl)
        stats["kl_ref"] = (kl.detach() * x.mask).sum() / n_tok
    old = x.logp.detach() if x.prox_logp is None else x.prox_logp
    stats.update(mismatch_stats(old, x.behav_logp, x.mask, n_tok))
    if entropy is not None:
        stats["entropy"] = (entropy.detach().float() * x.mask).sum() / n_tok
    stats["loss"] = loss.detach()
    return loss, stats
