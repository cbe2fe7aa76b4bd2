"""Attention over packed sequences on CPU: SDPA run one sequence at a time.

transformers 5.19 keeps a packed row's sequences apart on SDPA by a dense ``[L, L]`` block-diagonal
mask built from the restarting ``position_ids``; SDPA then computes all ``L^2`` scores, masked or
not, so a micro-batch of n sequences of length l costs ``(n l)^2`` where the padded layout costs
``n l^2`` (measured on ``model=small``: the packed step slower than the padded one). This
attention function, registered as ``sdpa_packed`` and given the sequences' boundaries
(``cu_seq_lens_q``, the keyword flash-attention's variable-length path reads), runs causal SDPA on
each sequence's slice instead: ``sum(l_i^2)``, no mask read. Without boundaries (the padded layout,
generation) it is transformers' SDPA, unchanged.

On GPU set ``model.attn_implementation=flash_attention_2``: the same boundaries drive its
variable-length kernel; the trainer only swaps ``sdpa`` for ``sdpa_packed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "sdpa_packed"


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                scaling: float | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """``query`` [1, H, L, D], ``key``/``value`` [1, H_kv, L, D]; returns [1, L, H, D] as
    transformers' attention functions do. ``cu_seq_lens_q`` [n + 1]: sequence i is tokens
    ``cu[i]:cu[i + 1]`` of the row; the (block-diagonal) ``attention_mask`` is then not read."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    outs = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                           dropout_p=dropout, is_causal=True, scale=scaling,
                                           enable_gqa=True)
            for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # for the unpacked fallback
