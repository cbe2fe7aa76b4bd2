"""Prefill and decode for any causal LM through its own forward (what ``fastpath`` does not cover),
with ``fastpath``'s signatures. Masks are plain additive 4D tensors ``[B, 1, Q, K]`` (every layer is
full attention): a per-layer-type dict is not understood by Llama's ``create_causal_mask``.
"""

from __future__ import annotations

import torch

from rollout_server.engine.host import to_device
from rollout_server.engine.kv import SlotKV


def _mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask [B, 1, Q, K] from a boolean ``allowed`` [B, Q, K]."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def prefill(model, kv: SlotKV, seqs: list[list[int]], first_slot: int) -> torch.Tensor:
    """Last-position logits [k, vocab] of ``seqs``, their KV written into slots
    ``[first_slot, first_slot + k)``."""
    device, dtype = kv.device, kv.dtype
    k = len(seqs)
    L = max(map(len, seqs))
    lens = to_device([len(s) for s in seqs], torch.long, device)
    ids = to_device([s + [0] * (L - len(s)) for s in seqs], torch.long, device)  # right-padded
    pos = torch.arange(L, device=device)
    allowed = ((pos[None, None, :] <= pos[None, :, None])
               & (pos[None, None, :] < lens[:, None, None]))
    kv.set_rows(slice(first_slot, first_slot + k), L)
    head = model.get_output_embeddings().register_forward_pre_hook(_last_positions(lens - 1))
    try:
        out = model(input_ids=ids, attention_mask=_mask(allowed, dtype),
                    position_ids=pos[None].expand(k, L), past_key_values=kv, use_cache=True)
    finally:
        head.remove()
    return out.logits[:, -1]


def _last_positions(last: torch.Tensor):
    """A pre-hook for the LM head: only row i's hidden state at ``last[i]`` reaches it ([k, 1, H])
    (a 2-D ``logits_to_keep`` means per-row positions only from transformers 5.23 on)."""
    def hook(_head, args):
        return (args[0][torch.arange(len(last), device=last.device), last][:, None], *args[1:])
    return hook


def decode(model, kv: SlotKV, ids: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Logits [B, vocab] of one token per row (``ids`` [B]) at positions ``pos`` [B] of slots
    ``[0, B)``."""
    keys = torch.arange(kv_len, device=kv.device)
    allowed = keys[None, None, :] <= pos[:, None, None]
    kv.set_rows(slice(0, len(ids)), kv_len, write_pos=pos)
    return model(input_ids=ids[:, None], attention_mask=_mask(allowed, kv.dtype),
                 position_ids=pos[:, None],
                 past_key_values=kv, use_cache=True, logits_to_keep=1).logits[:, -1]
