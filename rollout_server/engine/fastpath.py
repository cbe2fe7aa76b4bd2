"""Prefill and decode for Llama-family decoders (Qwen2, Qwen3, Llama) written against the model's
own submodules (ENGINE.md, "Forward passes"): every projection, norm, MLP and the rotary table are
called as modules, so a weight load is seen by the next step with nothing cached here; decode
attention is two batched matmuls over the slot cache, grouped query heads as rows (no repeat_kv).

Invariant: same math as the model's forward (tests/unit/test_engine_fastpath.py). ``supports``
accepts only transformers' own classes of these families, unmodified; anything else uses the
model's own forward (padded.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rollout_server.engine.host import to_device
from rollout_server.engine.kv import SlotKV

FAMILIES = ("qwen2", "qwen3", "llama")  # the same decoder layer up to q/k norms and biases


def _stock_classes(model_type: str) -> tuple[type, type, type, type]:
    """transformers' (CausalLM, Model, DecoderLayer, Attention) classes of one family."""
    import importlib
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}[model_type]
    return tuple(getattr(mod, prefix + part)
                 for part in ("ForCausalLM", "Model", "DecoderLayer", "Attention"))


def _untouched(module: torch.nn.Module, cls: type) -> bool:
    """``module`` runs exactly ``cls.forward``: no subclass, patched forward or forward hooks."""
    return (type(module) is cls and "forward" not in vars(module) and not module._forward_hooks
            and not module._forward_pre_hooks)


def supports(model) -> bool:
    """True if ``model`` is a stock full-attention Llama-family causal LM. Exact classes, not
    ``model_type``: remote code or a subclass can keep the name and change the math."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if cfg is None or inner is None or getattr(cfg, "model_type", None) not in FAMILIES:
        return False
    if set(getattr(cfg, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return False
    lm_cls, model_cls, layer_cls, attn_cls = _stock_classes(cfg.model_type)
    if not (_untouched(model, lm_cls) and _untouched(inner, model_cls)):
        return False
    layers = list(inner.layers)
    return len(layers) == cfg.num_hidden_layers and all(
        _untouched(layer, layer_cls) and _untouched(layer.self_attn, attn_cls) for layer in layers)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention_inputs(attn, x: torch.Tensor, kv_heads: int, dim: int, cos, sin):
    """q [N, kv_heads, G, D], k and v [N, kv_heads, D] for activations ``x`` [N, hidden], rotary
    applied."""
    n = x.shape[0]
    q = attn.q_proj(x).view(n, kv_heads, -1, dim)
    k = attn.k_proj(x).view(n, kv_heads, dim)
    v = attn.v_proj(x).view(n, kv_heads, dim)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over head_dim before rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = q * cos[:, None, None] + _rotate_half(q) * sin[:, None, None]
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    return q, k, v


def prefill(model, kv: SlotKV, seqs: list[list[int]], first_slot: int) -> torch.Tensor:
    """Prefill ``seqs[i]`` into slot ``first_slot + i``, packed without padding (attention per
    sequence); returns each one's last logits."""
    inner = model.model
    device = inner.embed_tokens.weight.device
    lens = [len(s) for s in seqs]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    # token ids, positions and each sequence's last row, sent without waiting (host.py)
    ids, pos = to_device([[t for s in seqs for t in s], [i for n in lens for i in range(n)]],
                         torch.long, device)
    last = to_device([a + n - 1 for a, n in zip(starts, lens)], torch.long, device)
    _, kv_heads, dim = kv.shape
    h = inner.embed_tokens(ids)  # [T, hidden]
    cos, sin = inner.rotary_emb(h, pos[None])
    cos, sin = cos[0], sin[0]  # [T, D]
    for idx, layer in enumerate(inner.layers):
        attn = layer.self_attn
        q, k, v = _attention_inputs(attn, layer.input_layernorm(h), kv_heads, dim, cos, sin)
        q = q.flatten(1, 2)  # [T, heads, D], head = kv_head * G + g
        K, V = kv.K[idx], kv.V[idx]
        o = torch.empty_like(q)
        for i, (a, n) in enumerate(zip(starts, lens)):
            slot = first_slot + i
            K[slot, :, :n] = k[a:a + n].transpose(0, 1)
            V[slot, :, :n] = v[a:a + n].transpose(0, 1)
            o[a:a + n] = F.scaled_dot_product_attention(
                q[a:a + n].transpose(0, 1)[None], K[slot, :, :n][None],
                V[slot, :, :n][None], is_causal=True,
                scale=attn.scaling, enable_gqa=True)[0].transpose(0, 1)
        h = h + attn.o_proj(o.flatten(1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h[last]))


def decode(model, kv: SlotKV, ids: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """One decode step over slots ``[0, B)``: row i feeds token ``ids[i]`` at position ``pos[i]``;
    returns the logits ``[B, vocab]``."""
    inner = model.model
    B = ids.shape[0]
    h = inner.embed_tokens(ids)  # [B, hidden]
    cos, sin = inner.rotary_emb(h, pos[:, None])
    cos, sin = cos[:, 0], sin[:, 0]  # [B, D]
    keys = torch.arange(kv_len, device=ids.device)
    neg = torch.finfo(h.dtype).min
    _, kv_heads, dim = kv.shape
    # [B * kv_heads, 1, L], built once per step: the scores' additive mask, broadcast over G
    mask = torch.zeros(B, kv_len, dtype=h.dtype, device=h.device).masked_fill_(
        keys[None, :] > pos[:, None], neg)[:, None].expand(B, kv_heads, kv_len).reshape(
        B * kv_heads, 1, kv_len)
    # Flat row of each (slot, kv_head, pos) in a [slots * kv_heads * capacity, D] view of a
    # layer's cache.
    heads = torch.arange(kv_heads, device=ids.device)
    write = ((torch.arange(B, device=ids.device)[:, None] * kv_heads + heads) * kv.capacity
             + pos[:, None]).view(-1)
    for idx, layer in enumerate(inner.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = _attention_inputs(attn, x, kv_heads, dim, cos, sin)  # q [B, kv_heads, G, D]
        K, V = kv.K[idx], kv.V[idx]
        K.view(-1, dim).index_copy_(0, write, k.reshape(-1, dim))
        V.view(-1, dim).index_copy_(0, write, v.reshape(-1, dim))
        # [B * kvh, G, L]: mask + scaling * q K^T in one GEMM (the cache rows are strided views)
        keys_t = K[:B, :, :kv_len].flatten(0, 1).transpose(1, 2)  # [B * kvh, D, L]
        scores = torch.baddbmm(mask, q.flatten(0, 1), keys_t, alpha=attn.scaling)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        # [B, heads * D], head = kv_head * G + g
        o = torch.bmm(probs, V[:B, :, :kv_len].flatten(0, 1)).reshape(B, -1)
        h = h + attn.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))
