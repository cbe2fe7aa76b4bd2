"""Shared terms of the policy-loss kernels (formulas: ``trainer/LOSSES.md`` section 0).

Invariants: log-ratios are clamped to +-LOG_RATIO_BOUND before any ``exp``, padding gives 0;
every stat is a sum divided by a normaliser passed in (``_max`` keys combine by max); nothing
carries a gradient except through ``kl_penalty``'s ``logp``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from areal_like.settings.config import AGG_MODES

# verl's SAFETY_BOUND: exp(20) ~ 4.9e8 is far past any cap, so clamping only touches tokens that
# are clipped or masked anyway, and keeps exp() finite in fp32.
LOG_RATIO_BOUND = 20.0
# verl low_var_kl clamps the k3 estimate: a single token must not dominate the KL term.
K3_BOUND = 10.0

Stats = dict[str, Tensor]

# ---------------------------------------------------------------- helpers and aggregation
def clamped(x: Tensor) -> Tensor:
    return x.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def norms(mask: Tensor, n_tokens_global: float | None,
          n_seqs_global: float | None) -> tuple[float, float]:
    n_tok = float(mask.sum()) if n_tokens_global is None else float(n_tokens_global)
    n_seq = float((mask.sum(-1) > 0).sum()) if n_seqs_global is None else float(n_seqs_global)
    return max(n_tok, 1.0), max(n_seq, 1.0)


def aggregate(
    loss_mat: Tensor, mask: Tensor, mode: str, *, n_tokens_global: float | None = None,
    n_seqs_global: float | None = None, scale_factor: float | None = None,
) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar (LOSSES.md section 0, verl ``agg_loss``).

    token-mean: sum(m*l) / n_tokens; seq-mean-token-mean: sum_i(sum_t m*l / L_i) / n_seqs;
    seq-mean-token-sum: sum(m*l) / n_seqs; seq-mean-token-sum-norm: sum(m*l) / C with
    C = ``scale_factor`` or the padded width T (verl; pass a constant C for split invariance).
    Counts default to this call's mask; pass the minibatch-global ones when micro-batching.
    """
    mask = mask.to(loss_mat.dtype)
    masked = torch.where(mask > 0, loss_mat * mask, torch.zeros_like(loss_mat))
    n_tok, n_seq = norms(mask, n_tokens_global, n_seqs_global)
    if mode == "token-mean":
        return masked.sum() / n_tok
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / n_seq
    if mode == "seq-mean-token-sum":
        return masked.sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / float(scale_factor if scale_factor is not None else mask.shape[-1])
    raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {AGG_MODES}")


def token_adv(advantages: Tensor, mask: Tensor) -> Tensor:
    adv = advantages.detach().float()
    return adv[:, None].expand(mask.shape) if adv.dim() == 1 else adv


def seq_adv(advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence advantage [B]: the mean over valid tokens (outcome rewards are constant)."""
    adv = advantages.detach().float()
    if adv.dim() == 1:
        return adv
    return (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def masked_diff(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """a - b in fp32 on valid tokens, exactly 0 on padding (whatever, nan included, is there)."""
    return torch.where(mask > 0, a.float() - b.float(), torch.zeros_like(mask))


def log_ratio(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Token log-ratio a - b, clamped to +-LOG_RATIO_BOUND, 0 on padding."""
    return clamped(masked_diff(a, b, mask))


def seq_log_ratio(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Log of the sequence ratio [B]: the per-token differences summed, THEN clamped (verl)."""
    return clamped(masked_diff(a, b, mask).sum(-1))


def weight_stats(w: Tensor, valid: Tensor, n: float, prefix: str = "is_weight") -> Stats:
    """Sum-reducible mean and mean-square of an IS weight over the valid entries, plus its max."""
    w, valid = w.detach().float(), valid.float()
    wmax = torch.where(valid > 0, w, torch.zeros_like(w)).max()  # weights are >= 0; no host sync
    return {
        f"{prefix}_mean": (w * valid).sum() / n,
        f"{prefix}_sq_mean": (w * w * valid).sum() / n,
        f"{prefix}_max": wmax,
    }


def finalize_stats(stats: Stats) -> Stats:
    """Add derived stats after summing (``_max``: max-ing) the per-call stats over calls and ranks.

    ``ess_ratio`` = ESS / n = mean(w)^2 / mean(w^2) (VCPO's rho_ess when w are its sequence
    weights).
    """
    out = dict(stats)
    if "is_weight_mean" in stats and "is_weight_sq_mean" in stats:
        out["ess_ratio"] = (stats["is_weight_mean"] ** 2
                            / stats["is_weight_sq_mean"].clamp(min=1e-30))
    return out


def accumulate_stats(total: Stats, stats: Stats) -> Stats:
    """Combine two calls' stats: max for keys ending in ``_max``, sum otherwise."""
    out = dict(total)
    for k, v in stats.items():
        if k not in out:
            out[k] = v.detach()
        else:
            out[k] = (torch.maximum(out[k], v.detach()) if k.endswith("_max")
                      else out[k] + v.detach())
    return out


# ---------------------------------------------------------------- shared stats
def mismatch_stats(old_logp: Tensor, behav_logp: Tensor, mask: Tensor, n_tok: float) -> Stats:
    """Trainer/engine mismatch KL(pi_behav || pi_old) estimated on the engine's own samples.

    ``mismatch_kl`` is Schulman's k3 (http://joschu.net/blog/kl-approx.html) with
    log r = old - behav: r - 1 - log r, unbiased and >= 0 per token; ``mismatch_kl_k1`` is the
    plain k1 = behav - old. Token means, normalised by ``n_tok`` (sum-reducible).
    """
    with torch.no_grad():
        log_r = log_ratio(old_logp.detach(), behav_logp.detach(), mask)
        k3 = (torch.exp(log_r) - 1.0 - log_r) * mask
        return {"mismatch_kl": k3.sum() / n_tok, "mismatch_kl_k1": (-log_r * mask).sum() / n_tok}


def kl_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor, *, estimator: str = "k3") -> Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate ``[B, T]`` with gradient through ``logp``.

    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1, clamped to
    +-K3_BOUND (verl ``kl_penalty`` low_var_kl). Log-ratios are clamped to +-LOG_RATIO_BOUND first.
    """
    d = log_ratio(logp, ref_logp.detach(), mask)  # logp - ref
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return (torch.exp(-d) + d - 1.0).clamp(-K3_BOUND, K3_BOUND)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")
