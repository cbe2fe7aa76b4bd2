"""Build or load the Hugging Face causal LM that both the engine and the trainer run.

``build_model(cfg)`` loads ``cfg.path`` (a local directory; hub ids are refused: nothing is
downloaded at run time) or builds a Qwen2 from the config fields with a fixed init seed, so every
process that builds "the same" tiny model gets bit-identical weights. Imports torch lazily.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from areal_like.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def qwen2_config(cfg: ModelConfig, tokenizer=None):
    """The Qwen2 config of a model built from ``cfg``; its bos/eos/pad ids are the tokenizer's
    (``tokenizer``, default ``load_tokenizer(cfg)``), so generation stops where the tokenizer ends."""
    from transformers import Qwen2Config

    from areal_like.tokenizer import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    return Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_model(cfg: ModelConfig, device: str = "cpu", dtype: str | None = None):
    """The model in eval mode on ``device`` with parameters in ``dtype`` (default cfg.dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dt = torch_dtype(dtype or cfg.dtype)
    if cfg.path:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.path!r} is not a local model directory (no config.json); "
                              "models are never downloaded at run time")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, attn_implementation=cfg.attn_implementation)
    else:
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.init_seed)
        model = AutoModelForCausalLM.from_config(qwen2_config(cfg), dtype=dt,
                                                 attn_implementation=cfg.attn_implementation)
        torch.random.set_rng_state(rng_state)
    return model.to(device).eval()


def state_checksum(model_or_state) -> float:
    """Order-independent float64 checksum of every parameter (weights-equal checks across processes)."""
    import torch

    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    total = 0.0
    for i, (name, t) in enumerate(sorted(state.items())):
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        total += float(t.detach().to(torch.float64).sum()) * (1 + (i % 7) * 1e-3)
    return total
