"""Prefill and decode for any causal LM through its own forward (what ``fastpath`` does not cover),
with ``fastpath``'s signatures. Masks are plain additive 4D tensors ``[B, 1, Q, K]``; a sliding
window is a mask too (a key at most ``window - 1`` positions before its query, as transformers'
``sliding_window_overlay``): one tensor when every layer attends alike (Mistral's
``sliding_window``), a dict by layer type when the config mixes them (Gemma 3, GPT-OSS), which
only such models' forwards accept (Llama's ``create_causal_mask`` takes no dict).
"""

from __future__ import annotations

import torch

from areal_like.weights.hf import SLIDING, layer_windows
from rollout_server.engine.host import to_device
from rollout_server.engine.kv import SlotKV


def _mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask [B, 1, Q, K] from a boolean ``allowed`` [B, Q, K]."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


SERVED_LAYER_TYPES = {"full_attention", SLIDING}


def _masks(config, keys: torch.Tensor, queries: torch.Tensor, allowed: torch.Tensor,
           dtype: torch.dtype):
    """The forward's ``attention_mask``: ``allowed`` [B, Q, K] (causal, in-sequence) narrowed to
    each window, key positions ``keys`` [1|B, 1, K] against query positions ``queries``
    [B, Q, 1]."""
    def windowed(window):
        return _mask(allowed if window is None else allowed & (keys > queries - window), dtype)
    windows = layer_windows(config)
    if isinstance(windows, dict):
        return {t: windowed(w) for t, w in windows.items()}
    return windowed(windows)


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
        mask = _masks(model.config, pos[None, None, :], pos[None, :, None], allowed, dtype)
        out = model(input_ids=ids, attention_mask=mask,
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
    mask = _masks(model.config, keys[None, None, :], pos[:, None, None], allowed, kv.dtype)
    return model(input_ids=ids[:, None], attention_mask=mask,
                 position_ids=pos[:, None],
                 past_key_values=kv, use_cache=True, logits_to_keep=1).logits[:, -1]
