"""Per-token log-probabilities and entropies from logits: pure, fp32, memory-conscious.

Convention shared with the engines (areal_like/DESIGN.md section 2): logp[t] = log_softmax(logits_t / temperature)
[token_t], the temperature-scaled distribution WITHOUT top-p/top-k truncation, so ``logp``,
``prox_logp`` and the engine's ``behav_logp`` are comparable.

Why fp32: bf16 keeps 8 mantissa bits; a log-softmax taken in bf16 on logits of scale ~5 is off
by ~0.03 nats per token on average (0.1 at worst, measured), the same order as the
trainer/engine mismatch the off-policy kernels correct for. Every step here upcasts the logits
chunk to fp32 first (trainer/LOSSES.md section 0, rule 2; https://fengyao.notion.site/off-policy-rl
shows how such numeric mismatch alone biases RL).

Memory: an fp32 copy of [B, T, V] logits is large (V ~ 150k). ``token_logprobs`` works on row
chunks of at most CHUNK_BYTES of fp32 and its custom backward recomputes the softmax chunk by
chunk, so neither pass holds more than one fp32 chunk beyond the logits themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

# fp32 working set per chunk: big enough that per-chunk overhead is negligible, small next to
# the logits of any real batch.
CHUNK_BYTES = 256 * 2**20


def _rows_per_chunk(vocab: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab))


def _work_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 input (gradcheck)


class _TokenLogprob(torch.autograd.Function):
    """log_softmax(x / temperature)[token] with a chunked, recomputing backward:
    d logp / d x_v = (1[v = token] - softmax_v) / temperature."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, rows: int) -> Tensor:
        flat, tok = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        wd = _work_dtype(logits)
        out = torch.empty(flat.shape[0], dtype=wd, device=logits.device)
        for s in range(0, flat.shape[0], rows):
            x = flat[s : s + rows].to(wd, copy=True).div_(temperature)  # one fp32 chunk, never a view of logits
            out[s : s + rows] = x.gather(-1, tok[s : s + rows]).squeeze(-1) - torch.logsumexp(x, dim=-1)
        ctx.save_for_backward(logits, tokens)
        ctx.temperature, ctx.rows = temperature, rows
        return out.view(tokens.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, tokens = ctx.saved_tensors
        flat, tok = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        wd = _work_dtype(logits)
        g_flat = grad_out.reshape(-1, 1).to(wd)
        grad = torch.empty_like(flat)
        for s in range(0, flat.shape[0], ctx.rows):
            x = flat[s : s + ctx.rows].to(wd, copy=True).div_(ctx.temperature)
            g = g_flat[s : s + ctx.rows]
            gx = torch.softmax(x, dim=-1).mul_(-g)
            del x
            gx.scatter_add_(-1, tok[s : s + ctx.rows], g)
            grad[s : s + ctx.rows] = gx.div_(ctx.temperature)
        return grad.view(logits.shape), None, None, None


def token_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, *, chunk_bytes: int = CHUNK_BYTES
) -> Tensor:
    """log pi(token_t | prefix) [B, T] in fp32 (fp64 for fp64 logits) from logits [B, T, V] (any float dtype) and tokens [B, T].

    ``logits[:, t]`` must be the logits that predicted ``tokens[:, t]`` (shift before calling).
    Differentiable w.r.t. ``logits``; the gradient has the logits' dtype.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    rows = _rows_per_chunk(logits.shape[-1], chunk_bytes)
    return _TokenLogprob.apply(logits, tokens.long(), float(temperature), rows)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, *, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """Entropy [B, T] (fp32, nats) of softmax(logits / temperature), chunked over rows.

    Differentiable through plain autograd (each chunk's fp32 softmax is kept for backward); for
    a stat only, call it under ``torch.no_grad()``.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    rows = _rows_per_chunk(logits.shape[-1], chunk_bytes)
    parts = []
    for s in range(0, flat.shape[0], rows):
        x = flat[s : s + rows].to(_work_dtype(logits)) / temperature
        logp = torch.log_softmax(x, dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts).view(logits.shape[:-1])
