"""Attention over packed sequences on CPU: SDPA run one sequence at a time (``sdpa_packed``).

transformers' SDPA keeps packed sequences apart by a dense ``[L, L]`` mask and computes all
``L^2`` scores; given the boundaries (``cu_seq_lens_q``, as flash-attention's varlen kernel reads
them) this runs causal SDPA per sequence, sequences of one length batched: ``sum(l_i^2)``. Without
boundaries it is transformers' SDPA, unchanged. On GPU use ``flash_attention_2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "sdpa_packed"


def _causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            scaling: float | None) -> torch.Tensor:
    """Causal SDPA of sequences of one length, [m, H, l, D] -> [m, H, l, D]."""
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                          enable_gqa=True)


def _stack(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row positions ``idx`` [m, l] of ``t`` [1, H, L, D] as a batch [m, H, l, D] (a copy)."""
    return t[0][:, idx].transpose(0, 1)


def length_groups(bounds: list[int]) -> list[torch.Tensor]:
    """Per length, the row positions [m, l] of the sequences ``bounds[i]:bounds[i + 1]`` of that
    length: one SDPA call per length (a call per sequence was 36 % slower than padded on CPU)."""
    by_len: dict[int, list[int]] = {}
    for lo, hi in zip(bounds, bounds[1:]):
        by_len.setdefault(hi - lo, []).append(lo)
    return [torch.tensor(starts)[:, None] + torch.arange(n) for n, starts in by_len.items()]


class _SegmentedAttention(torch.autograd.Function):
    """Causal SDPA on each sequence of the row (batched by length) into one [1, L, H, D] output;
    backward recomputes each group's attention from q, k, v, so the attention output is held once
    per layer, as on the padded path (trainer/MEMORY.md section 1)."""

    @staticmethod
    def forward(ctx, query, key, value, groups: list[torch.Tensor], scaling: float | None):
        b, h, n, d = query.shape
        out = query.new_empty(b, n, h, d)
        for idx in groups:
            o = _causal(_stack(query, idx), _stack(key, idx), _stack(value, idx), scaling)
            out[0, idx.flatten()] = o.transpose(1, 2).reshape(-1, h, d)
        ctx.save_for_backward(query, key, value)
        ctx.groups, ctx.scaling = groups, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value = ctx.saved_tensors
        grads = [torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)]
        for idx in ctx.groups:
            with torch.enable_grad():
                qkv = [_stack(t, idx).detach().requires_grad_() for t in (query, key, value)]
                o = _causal(*qkv, ctx.scaling)
                part = torch.autograd.grad(o, qkv, grad_out[0, idx].transpose(1, 2))
            for g, p in zip(grads, part):
                g[0][:, idx.flatten()] = p.transpose(0, 1).reshape(g.shape[1], -1, g.shape[3])
        return *grads, None, None


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                scaling: float | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; with ``cu_seq_lens_q`` (sequence i is tokens
    ``cu[i]:cu[i + 1]`` of the row) the ``attention_mask`` is not read."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("packed attention has no attention dropout (the backward recomputes it)")
    bounds = cu_seq_lens_q.tolist()
    if len(bounds) == 2:  # one sequence: SDPA's own output, no copy
        return _causal(query, key, value, scaling).transpose(1, 2), None
    groups = [idx.to(query.device) for idx in length_groups(bounds)]
    return _SegmentedAttention.apply(query, key, value, groups, scaling), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # for the unpacked fallback
